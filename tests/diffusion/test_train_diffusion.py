"""`train-diffusion` end to end on tiny pieces: resume equivalence, stage checks, DDP, bundles."""

from __future__ import annotations

import importlib.util
import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.bundle import load_bundle, write_bundle
from ldm_cli.config import load_config, to_dict
from ldm_cli.diffusion.load import load_latent_diffusion
from ldm_cli.diffusion.train import train_unet
from ldm_cli.errors import IncompatibleError, RunDirError
from ldm_cli.latents.encode import encode_dataset
from tests.conftest import TINY_UNET_OVERRIDES

TRAIN = [
    "train=diffusion_tiny",
    "train.batch_size=4",
    "train.precision=fp32",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.image_every=4",
    "train.checkpoint_every=2",
    "train.warmup_steps=2",
    "objective.validation_prompts=[a red circle]",
    "objective.validation_steps=3",
    "objective.validation_loss_timesteps=[500]",
]


@pytest.fixture(scope="module")
def latents(shapes_dir, tmp_path_factory) -> Path:
    """A random tiny autoencoder (no training needed) and the shapes set encoded with it."""
    root = tmp_path_factory.mktemp("latents")
    config = AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
    torch.manual_seed(0)
    model = AutoencoderKL(config)
    meta = {"autoencoder": to_dict(config), "latent_scale": 0.5, "latent_shift": 0.0, "resolution": 16}
    write_bundle(root / "vae", "autoencoder", {"autoencoder": model.state_dict()}, meta)
    encode_config = load_config("encode", [f"data.path={shapes_dir}", "text_encoder=tiny", "text_encoder.max_length=16"])
    encode_dataset(root / "vae", encode_config, root / "latents", cache_text=True, device_name="cpu")
    return root / "latents"


def run(latents, out, steps, extra=(), resume=False, init_from=None, vae=None):
    overrides = [*TINY_UNET_OVERRIDES, *TRAIN, f"train.max_steps={steps}", *extra]
    config = load_config("train_diffusion", overrides)
    return train_unet(config, latents, out, overrides if not resume else [f"train.max_steps={steps}"], resume=resume,
                      device_name="cpu", init_from=init_from, vae=vae)


def test_vae_option_carries_a_decoder_fine_tune_and_refuses_another_encoder(latents, tmp_path):
    from tests.sampling.helpers import write_autoencoder_variant

    tuned = write_autoencoder_variant(latents.parent / "vae", tmp_path / "tuned", "decoder")
    bundle = load_bundle(run(latents, tmp_path / "run", 1, vae=tuned))
    assert load_bundle(bundle.path / "autoencoder").content_hash == load_bundle(tuned).content_hash
    bundle = load_bundle(run(latents, tmp_path / "run", 2, resume=True))  # --resume without --vae keeps it
    assert load_bundle(bundle.path / "autoencoder").content_hash == load_bundle(tuned).content_hash
    (tmp_path / "run" / "autoencoder.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"autoencoder.json is damaged .*; pass --vae"):
        run(latents, tmp_path / "run", 3, resume=True)
    other = write_autoencoder_variant(latents.parent / "vae", tmp_path / "other", "encoder")
    with pytest.raises(IncompatibleError, match=r"but --vae .* with another encoder or latent scale; pass that autoencoder or a decoder-only"):
        run(latents, tmp_path / "refused", 1, vae=other)
    assert not (tmp_path / "refused").exists()


def unet_weights(run_dir):
    return load_bundle(run_dir, kind="latent-diffusion").tensors("unet")


def test_bundle_names_everything_sampling_needs(latents, tmp_path):
    bundle_path = run(latents, tmp_path / "run", 4, ["train.ema_decay=0.5"])
    model = load_latent_diffusion(bundle_path)
    meta = model.bundle.meta
    assert meta["unet"]["cross_attention_dim"] == 32  # followed the tiny text encoder
    assert meta["latent_scale"] == 0.5 and meta["resolution"] == 16
    assert meta["schedule"]["beta_schedule"] == "scaled_linear"
    assert model.text_encoder.width == 32
    assert "val_loss" in meta["validation"]
    assert (tmp_path / "run" / "images" / "step_0000004.png").is_file()
    out = model.unet(torch.randn(2, 4, 4, 4), torch.tensor([10, 900]), model.text_encoder.encode(["a", "b"]))
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()


def test_n_steps_resume_n_steps_equals_2n(latents, tmp_path):
    run(latents, tmp_path / "straight", 4, ["objective.min_snr_gamma=5.0", "objective.offset_noise=0.1"])
    run(latents, tmp_path / "resumed", 2, ["objective.min_snr_gamma=5.0", "objective.offset_noise=0.1"])
    run(latents, tmp_path / "resumed", 4, resume=True)
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def logged(run_dir: Path, name: str) -> list[float]:
    rows = csv.DictReader((run_dir / "metrics.csv").open())
    return [float(row["value"]) for row in rows if row["name"] == name]


def logged_lrs(run_dir: Path) -> list[float]:
    return logged(run_dir, "train/lr")


OPTIMIZER_CASES = [
    ("adamw", "cosine"),
    ("adafactor", "cosine_with_restarts"),
    pytest.param("adamw8bit", "linear", marks=pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")),
]


@pytest.mark.parametrize("optimizer,schedule", OPTIMIZER_CASES)
def test_every_optimizer_and_schedule_resume_exactly(latents, tmp_path, optimizer, schedule):
    extra = [f"train.optimizer={optimizer}", f"train.lr_schedule={schedule}", "train.lr_schedule_steps=4", "train.lr_cycles=2"]
    run(latents, tmp_path / "straight", 4, extra)
    run(latents, tmp_path / "resumed", 2, extra)
    run(latents, tmp_path / "resumed", 4, resume=True)
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    lrs, straight_lrs = logged_lrs(tmp_path / "resumed"), logged_lrs(tmp_path / "straight")
    assert len(lrs) == 4 and lrs == straight_lrs
    assert lrs == straight_lrs


def test_tag_augmentation_refuses_cached_text(latents, tmp_path):
    with pytest.raises(IncompatibleError, match="holds cached text embeddings .* re-encode without --cache-text"):
        run(latents, tmp_path / "run", 2, ["objective.shuffle_tags=true"])


def test_text_cache_equals_live_encoding_with_caption_dropout(latents):
    from ldm_cli.diffusion.text import TextEncoderConfig, load_text_encoder
    from ldm_cli.diffusion.train import TextConditioning
    from ldm_cli.latents.dataset import LatentDataset, collate_latents

    data = LatentDataset(latents)
    encoder = load_text_encoder(TextEncoderConfig(tiny=True, max_length=16))
    batch = collate_latents([data[i] for i in range(4)])
    keep = torch.tensor([True, False, True, True])
    cached = TextConditioning(encoder, torch.device("cpu"), data.uncond_text())(batch, keep)
    live = TextConditioning(encoder, torch.device("cpu"))({k: v for k, v in batch.items() if k != "text"}, keep)
    torch.testing.assert_close(cached, live, rtol=0, atol=5e-3)  # the cache stores float16
    torch.testing.assert_close(cached[1], encoder.encode([""])[0], rtol=0, atol=5e-3)  # dropped → empty prompt
    assert not torch.allclose(cached[0], cached[1])


def test_stage_mismatches_are_named(latents, tmp_path):
    with pytest.raises(IncompatibleError, match="unet.cross_attention_dim=64 but the text encoder's width is 32"):
        run(latents, tmp_path / "a", 1, ["unet.cross_attention_dim=64"])
    with pytest.raises(IncompatibleError, match="unet.in_channels=3 but the latents have 4"):
        run(latents, tmp_path / "b", 1, ["unet.in_channels=3"])
    with pytest.raises(IncompatibleError, match="latents are 8x8 but the U-Net downsamples by 16"):
        run(latents, tmp_path / "c", 1, [
            "unet.block_out_channels=[16,16,16,16,32]",
            "unet.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D,CrossAttnDownBlock2D,DownBlock2D]",
            "unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D,UpBlock2D,UpBlock2D,UpBlock2D]",
        ])
    assert not (tmp_path / "a").exists()  # nothing written before the checks


def test_fine_tune_from_a_bundle(latents, tmp_path):
    base = run(latents, tmp_path / "base", 2)
    tuned = run(latents, tmp_path / "tuned", 2, init_from=base)
    assert load_bundle(tuned).meta["unet"] == load_bundle(base).meta["unet"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_train(latents: Path, out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """`ldm train-diffusion` in two CPU processes under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
        "-m", "ldm_cli.cli", "train-diffusion", "--latents", str(latents), "--out", str(out), "--device", "cpu", *overrides,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_batch(latents, tmp_path):
    common = [*TINY_UNET_OVERRIDES, *TRAIN, "train.max_steps=2", "objective.caption_dropout=0.5"]
    single = load_config("train_diffusion", [*common, "train.batch_size=4"])
    train_unet(single, latents, tmp_path / "single", [*common, "train.batch_size=4"], device_name="cpu")
    result = torchrun_train(latents, tmp_path / "ddp", [*common, "train.batch_size=2"])
    # rank 0 alone prints the progress bar and the summary
    assert result.stdout.count("latent-diffusion bundle:") == 1
    assert len(re.findall(r"train-diffusion:\s+0%", result.stderr)) == 1
    single_weights, ddp_weights = unet_weights(tmp_path / "single"), unet_weights(tmp_path / "ddp")
    # Adam's m/sqrt(v) turns summation-order noise in a near-zero gradient into a step of up to lr (1e-3)
    # for that one element, so single elements get a fraction of a step; the weights as a whole must agree tightly
    for key in single_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-4, atol=3e-4, msg=lambda m: key + m)
    differences = torch.cat([(ddp_weights[key] - single_weights[key]).abs().flatten() for key in single_weights])
    assert differences.mean() < 1e-6 and (differences > 1e-5).float().mean() < 1e-3


BF16_WEIGHTS = ["train.precision=bf16", "train.bf16_weights=true", "train.ema_decay=0.5"]


@pytest.mark.slow
def test_two_processes_train_with_bf16_weights(latents, tmp_path):
    """DDP all-reduces the bf16 gradients of the bf16 U-Net; the result is single-process training up to bf16
    rounding."""
    bf16 = ["train.precision=bf16", "train.bf16_weights=true", "train.lr=1e-3"]
    common = [*TINY_UNET_OVERRIDES, *TRAIN, "train.max_steps=2", *bf16]
    initial = unet_weights(run(latents, tmp_path / "initial", 1, ["train.lr=1e-12"]))
    single = unet_weights(run(latents, tmp_path / "single", 2, bf16))
    torchrun_train(latents, tmp_path / "ddp", [*common, "train.batch_size=2"])
    ddp = unet_weights(tmp_path / "ddp")
    assert all(value.dtype == torch.float32 for value in ddp.values())
    moved = sum((single[key] - initial[key]).abs().sum() for key in initial)
    apart = sum((ddp[key] - single[key]).abs().sum() for key in initial)
    assert moved > 0 and apart < 0.1 * moved


def test_bf16_weights_resume_exactly_and_ship_float32_masters(latents, tmp_path):
    run(latents, tmp_path / "straight", 4, BF16_WEIGHTS)
    run(latents, tmp_path / "resumed", 2, BF16_WEIGHTS)
    run(latents, tmp_path / "resumed", 4, resume=True)
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    assert all(value.dtype == torch.float32 for value in straight.values())
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    # the shipped weights keep float32 detail: the masters, not bf16-rounded copies
    assert any(not torch.equal(value, value.bfloat16().float()) for value in straight.values())


def test_bf16_weights_train_like_autocast(latents, tmp_path):
    """The same arithmetic as autocast (bf16 products, float32 updates), so after a few steps the weights
    differ from autocast's by bf16 rounding, far less than the training moved them."""
    initial = unet_weights(run(latents, tmp_path / "zero", 1, ["train.lr=1e-12"]))
    autocast = unet_weights(run(latents, tmp_path / "autocast", 4, ["train.precision=bf16", "train.lr=1e-3"]))
    master = unet_weights(run(latents, tmp_path / "master", 4, ["train.precision=bf16", "train.bf16_weights=true", "train.lr=1e-3"]))
    moved = sum((autocast[key] - initial[key]).abs().sum() for key in initial)
    apart = sum((master[key] - autocast[key]).abs().sum() for key in initial)
    assert moved > 0 and apart < 0.1 * moved  # measured: 2%


NO_MASTERS = ["train.precision=bf16", "train.bf16_weights=true", "train.ema_decay=null", "train.master_weights=false",
              "train.optimizer=adafactor", "train.lr=1e-3"]


def test_bf16_weights_without_masters_train_like_masters_and_resume_exactly(latents, tmp_path):
    """adafactor on the bf16 weights with stochastic rounding: after a few steps the weights differ from
    float32 masters' by rounding, far less than training moved them; a resumed run rounds the same."""
    initial = unet_weights(run(latents, tmp_path / "zero", 1, ["train.lr=1e-12"]))
    masters = unet_weights(run(latents, tmp_path / "masters", 4, [*NO_MASTERS[:3], *NO_MASTERS[4:]]))
    straight = unet_weights(run(latents, tmp_path / "straight", 4, NO_MASTERS))
    run(latents, tmp_path / "resumed", 2, NO_MASTERS)
    resumed = unet_weights(run(latents, tmp_path / "resumed", 4, resume=True))
    # shipped in float32, holding the bf16 values trained
    assert all(value.dtype == torch.float32 and torch.equal(value, value.bfloat16().float()) for value in straight.values())
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    moved = sum((masters[key] - initial[key]).abs().sum() for key in initial)
    apart = sum((straight[key] - masters[key]).abs().sum() for key in initial)
    assert moved > 0 and apart < 0.25 * moved  # measured: 15%, the rounding noise of 4 steps
    losses, master_losses = logged(tmp_path / "straight", "train/loss"), logged(tmp_path / "masters", "train/loss")
    assert losses[-1] < losses[0] - 0.05 and losses == pytest.approx(master_losses, abs=0.01)


def test_master_weights_accumulate_gradients_in_float32():
    from ldm_cli.training.master_weights import MasterWeights

    model = torch.nn.Linear(4, 1, bias=False)
    master = MasterWeights(model)
    assert model.weight.dtype == torch.bfloat16 and master.parameters[0].dtype == torch.float32
    x = torch.ones(1, 4, dtype=torch.bfloat16)
    for scale in (1.0, 1e-3):  # a small micro-batch gradient that a bf16 sum with 1.0 would round away
        (model(x) * scale).sum().backward()
        master.gradients_to_master()
        assert model.weight.grad is None
    torch.testing.assert_close(master.parameters[0].grad, torch.full((1, 4), 1.001), rtol=0, atol=1e-6)
    with torch.no_grad():
        master.parameters[0].add_(1e-4)  # an update below a bf16 ulp of the weight
    master.copy_to_model()
    state = master.state_dict(model)
    assert torch.equal(state["weight"], master.parameters[0]) and state["weight"].dtype == torch.float32


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.precision=fp32", "train.bf16_weights=true"], "train.bf16_weights: expected false unless train.precision is bf16"),
    (["train.precision=bf16", "train.bf16_weights=true", "train.master_weights=false"],
     "train.master_weights: expected true unless train.bf16_weights=true and train.optimizer=adafactor"),
    (["train.precision=bf16", "train.master_weights=false", "train.optimizer=adafactor"], "train.master_weights: expected true"),
])
def test_bf16_weights_config_errors(overrides, message):
    from ldm_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("train_diffusion", [*TINY_UNET_OVERRIDES, *TRAIN, *overrides])


def test_bf16_weights_are_refused_for_the_autoencoder():
    from ldm_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="train.bf16_weights"):  # not a key of the autoencoder's train configs
        load_config("train_vae", ["train.bf16_weights=true"])


def test_resume_repeats_the_runs_own_group_choices_and_refuses_another_architecture(latents, tmp_path):

    run(latents, tmp_path / "run", 2)
    again = [*TINY_UNET_OVERRIDES, *TRAIN, "train.max_steps=3"]  # the original overrides (groups unet, text_encoder, train), longer
    train_unet(load_config("train_diffusion", again), latents, tmp_path / "run", again, resume=True, device_name="cpu")
    assert load_bundle(tmp_path / "run").meta["trained_steps"] == 3
    wider = [*again, "unet.block_out_channels=[16,48]", "train.max_steps=4"]
    with pytest.raises(RunDirError, match="--resume cannot change unet.block_out_channels: saved \\[16, 32\\], now \\[16, 48\\]"):
        train_unet(load_config("train_diffusion", wider), latents, tmp_path / "run", wider, resume=True, device_name="cpu")


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_process_and_saves_a_checkpoint(latents, tmp_path):
    """torchrun forwards SIGTERM to each process; they stop together at one step boundary and the main one saves."""
    import signal
    import time

    out = tmp_path / "ddp"
    overrides = [*TINY_UNET_OVERRIDES, *TRAIN, "train.max_steps=500", "train.batch_size=2", "train.checkpoint_every=1000",
                 "train.eval_every=1000", "train.image_every=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
        "-m", "ldm_cli.cli", "train-diffusion", "--latents", str(latents), "--out", str(out), "--device", "cpu", *overrides,
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        metrics = out / "metrics.csv"
        if metrics.is_file() and ",train/loss," in metrics.read_text():
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "terminated (SIGTERM) at step" in stderr, stderr[-2000:]
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and 0 < int(saved[0].name.split("_")[1]) < 500
    assert not (out / ".lock").exists()


def test_caption_memo_stays_in_host_memory(latents):
    """Embeddings memoised for 50,000 captions would fill a GPU; only each batch travels to the device."""
    from ldm_cli.diffusion.text import TextEncoderConfig, load_text_encoder
    from ldm_cli.diffusion.train import TextConditioning

    encoder = load_text_encoder(TextEncoderConfig(tiny=True, max_length=16))
    conditioning = TextConditioning(encoder, torch.device("meta"))  # stands in for a GPU
    context = conditioning({"caption": ["a red circle", "a blue square"]}, torch.ones(2, dtype=torch.bool, device="meta"))
    assert context.device.type == "meta" and context.shape == (2, 16, 32)
    assert {value.device.type for value in conditioning.memo.values()} == {"cpu"}


def test_train_step_metrics_stay_on_the_device(latents, tmp_path):
    """Reading a GPU scalar blocks until the GPU is idle: the step leaves that to the loop's log_every."""
    from ldm_cli.autoencoder.load import load_autoencoder
    from ldm_cli.diffusion.text import load_text_encoder
    from ldm_cli.diffusion.train import DiffusionTrainer, TextConditioning
    from ldm_cli.latents.dataset import LatentDataset, collate_latents
    from ldm_cli.training.distributed import DistInfo

    config = load_config("train_diffusion", [*TINY_UNET_OVERRIDES, *TRAIN, "train.grad_clip=1.0"])
    data = LatentDataset(latents)
    config.unet.cross_attention_dim = 32
    cpu = torch.device("cpu")
    conditioning = TextConditioning(load_text_encoder(config.text_encoder), cpu, data.uncond_text())
    trainer = DiffusionTrainer(config, data, load_autoencoder(data.autoencoder_path), conditioning, cpu, DistInfo())
    metrics = trainer.train_step([collate_latents([data[i] for i in range(4)])], step=0)
    assert isinstance(metrics["loss"], torch.Tensor) and metrics["loss"].dim() == 0
    assert isinstance(metrics["grad_norm"], torch.Tensor) and metrics["grad_norm"].dim() == 0
