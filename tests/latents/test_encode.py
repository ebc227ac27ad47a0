"""`ldm encode`: posterior moments equal the autoencoder's, shards, resume after a kill, bad files,
flipped copies, cached text, refusal of another autoencoder, the CLI, and the torchrun split."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ldm_cli.autoencoder.load import bundle_latent_space, load_autoencoder
from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.bundle import write_bundle
from ldm_cli.cli import app
from ldm_cli.config import EncodeConfig, to_dict
from ldm_cli.data.images import DataConfig, ImageFolderDataset
from ldm_cli.data.shapes import write_shapes_dataset
from ldm_cli.diffusion.text import TextEncoderConfig, load_text_encoder
from ldm_cli.errors import DataError, IncompatibleError, RunDirError
from ldm_cli.latents import encode as encode_module
from ldm_cli.latents.dataset import LatentDataset
from ldm_cli.latents.encode import encode_dataset, plan_batches, shard_items, shards_for_rank

N_IMAGES, SIZE = 10, 16
TINY_TEXT = TextEncoderConfig(tiny=True, max_length=16)


def make_vae_bundle(directory: Path, seed: int) -> Path:
    config = AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
    torch.manual_seed(seed)
    model = AutoencoderKL(config)
    meta = {"autoencoder": to_dict(config), "latent_scale": 0.5, "latent_shift": 0.0, "resolution": SIZE}
    return write_bundle(directory, "autoencoder", {"autoencoder": model.state_dict()}, meta).path


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return make_vae_bundle(tmp_path_factory.mktemp("vae") / "bundle", seed=0)


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory) -> Path:
    return make_vae_bundle(tmp_path_factory.mktemp("vae2") / "bundle", seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), N_IMAGES, SIZE)


def make_config(folder: Path, **changes) -> EncodeConfig:
    settings = dict(data=DataConfig(path=str(folder)), text_encoder=TINY_TEXT, batch_size=3, shard_size=4, precision="fp32")
    return EncodeConfig(**{**settings, **changes})


def reference_moments(vae: Path, data: Path, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """model.encode of every image, one at a time: what the shards must hold."""
    model = load_autoencoder(vae).model
    images = ImageFolderDataset(data, SIZE, split="all")
    pixels = torch.stack([images.load(i) for i in range(len(images))])
    with torch.no_grad():
        posteriors = [model.encode((p.flip(-1) if flip else p)[None]) for p in pixels]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.logvar for p in posteriors])


def shard_arrays(out: Path, name: str) -> np.ndarray:
    index = json.loads((out / "index.json").read_text())
    return np.concatenate([np.load(out / shard["name"] / f"{name}.npy") for shard in index["shards"]])


def captions_of(data: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    return {row["file_name"]: row["text"] for row in rows}


def test_encode_stores_posterior_moments_captions_and_index(vae, data, tmp_path):
    out = tmp_path / "latents"
    index = encode_dataset(vae, make_config(data), out, device_name="cpu")

    assert index == json.loads((out / "index.json").read_text())
    assert index["format"] == "ldm-latents/1" and index["complete"] is True
    used = load_autoencoder(vae).bundle
    assert index["autoencoder"] == {"content_hash": used.content_hash, "latent_space_hash": bundle_latent_space(used), "path": str(vae.resolve())}
    assert (index["latent_scale"], index["latent_shift"], index["resolution"]) == (0.5, 0.0, SIZE)
    assert index["latent_shape"] == [4, SIZE // 2, SIZE // 2]
    assert index["count"] == N_IMAGES and index["flip"] is False and index["text"] is None
    assert index["shard_size"] == 4 and index["bad_images"] == 0 and index["bad_files"] == []
    assert index["shards"] == [{"name": "shard_00000", "count": 4}, {"name": "shard_00001", "count": 4}, {"name": "shard_00002", "count": 2}]
    assert index["source"] == str(data.resolve())

    mean, logvar = reference_moments(vae, data)
    stored_mean, stored_logvar = shard_arrays(out, "mean"), shard_arrays(out, "logvar")
    assert stored_mean.dtype == np.float32 and stored_mean.shape == (N_IMAGES, 4, 8, 8)
    np.testing.assert_allclose(stored_mean, mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(stored_logvar, logvar.numpy(), atol=1e-5)

    paths = sum((json.loads((out / s["name"] / "paths.json").read_text()) for s in index["shards"]), [])
    captions = sum((json.loads((out / s["name"] / "captions.json").read_text()) for s in index["shards"]), [])
    assert paths == [f"{i:05d}.png" for i in range(N_IMAGES)]
    assert captions == [captions_of(data)[path] for path in paths]
    assert not (out / "shard_00000" / "mean_flip.npy").exists() and not (out / "shard_00000" / "text.npy").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_dataloader_workers_give_the_same_shards(vae, data, tmp_path):
    serial = encode_dataset(vae, make_config(data), tmp_path / "serial", device_name="cpu")
    config = make_config(data, data=DataConfig(path=str(data), num_workers=2))
    assert encode_dataset(vae, config, tmp_path / "workers", device_name="cpu") == serial
    for name in ("mean", "logvar"):
        np.testing.assert_array_equal(shard_arrays(tmp_path / "workers", name), shard_arrays(tmp_path / "serial", name))


def test_killed_encode_resumes_from_the_last_complete_shard(vae, data, tmp_path, monkeypatch):
    out = tmp_path / "latents"
    real_write = encode_module.write_shard
    written = []

    def write_then_die(out_dir, number, arrays, meta):
        path = real_write(out_dir, number, arrays, meta)
        written.append(number)
        if len(written) == 2:
            raise KeyboardInterrupt  # killed right after the second shard
        return path

    monkeypatch.setattr(encode_module, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(vae, make_config(data), out, device_name="cpu")
    # the kill landed between shard 1's rename and the index update: the index lags, the directory does not
    partial = json.loads((out / "index.json").read_text())
    assert partial["complete"] is False and [s["name"] for s in partial["shards"]] == ["shard_00000"]
    assert (out / "shard_00001" / "mean.npy").is_file() and not (out / "shard_00002").exists()
    with pytest.raises(DataError, match="incomplete"):
        LatentDataset(out)

    # what a hard kill mid-shard leaves behind: a temporary directory that must never be read
    stale = out / ".tmp-shard_00002-dead"
    stale.mkdir()
    (stale / "mean.npy").write_bytes(b"half")
    before = {n: os.stat(out / f"shard_0000{n}" / "mean.npy").st_mtime_ns for n in (0, 1)}

    written.clear()
    monkeypatch.setattr(encode_module, "write_shard", lambda *args: (written.append(args[1]), real_write(*args))[1])
    index = encode_dataset(vae, make_config(data), out, device_name="cpu")
    assert written == [2]
    assert {n: os.stat(out / f"shard_0000{n}" / "mean.npy").st_mtime_ns for n in (0, 1)} == before
    assert not stale.exists() and index["complete"] is True and index["count"] == N_IMAGES

    fresh = tmp_path / "fresh"
    assert encode_dataset(vae, make_config(data), fresh, device_name="cpu") == index
    for name in ("mean", "logvar"):
        np.testing.assert_array_equal(shard_arrays(out, name), shard_arrays(fresh, name))

    # a complete dataset re-run is a no-op
    written.clear()
    assert encode_dataset(vae, make_config(data), out, device_name="cpu") == index and written == []


def test_bad_images_are_skipped_and_counted(vae, data, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in data.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "00003_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "latents"
    index = encode_dataset(vae, make_config(folder), out, device_name="cpu")

    assert index["bad_images"] == 2 and sorted(index["bad_files"]) == ["00003_corrupt.png", "empty.png"]
    assert index["count"] == N_IMAGES
    assert [s["count"] for s in index["shards"]] == [4, 3, 3]  # 12 files: the bad ones sit in shards 1 and 2
    data_set = LatentDataset(out)
    assert len(data_set) == N_IMAGES
    expected = captions_of(data)
    assert [data_set[i]["caption"] for i in range(N_IMAGES)] == [expected[f"{i:05d}.png"] for i in range(N_IMAGES)]
    np.testing.assert_allclose(shard_arrays(out, "mean"), reference_moments(vae, data)[0].numpy(), atol=1e-5)


def test_flip_stores_the_encoding_of_the_flipped_image(vae, data, tmp_path):
    out = tmp_path / "latents"
    index = encode_dataset(vae, make_config(data, flip=True), out, device_name="cpu")
    assert index["flip"] is True and index["count"] == N_IMAGES
    mean, logvar = reference_moments(vae, data, flip=True)
    np.testing.assert_allclose(shard_arrays(out, "mean_flip"), mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(shard_arrays(out, "logvar_flip"), logvar.numpy(), atol=1e-5)
    # the encoding of a flipped image is not the flipped encoding
    assert np.abs(shard_arrays(out, "mean_flip") - shard_arrays(out, "mean")[..., ::-1]).max() > 1e-3


def test_cache_text_stores_the_text_encoder_outputs(vae, data, tmp_path):
    out = tmp_path / "latents"
    index = encode_dataset(vae, make_config(data), out, cache_text=True, device_name="cpu")
    encoder = load_text_encoder(TINY_TEXT)
    assert index["text"] == {"config": to_dict(TINY_TEXT), "width": 32, "max_length": 16}

    text = shard_arrays(out, "text")
    assert text.dtype == np.float16 and text.shape == (N_IMAGES, 16, 32)
    captions = [captions_of(data)[f"{i:05d}.png"] for i in range(N_IMAGES)]
    np.testing.assert_allclose(text.astype(np.float32), encoder.encode(captions).numpy(), atol=1e-2, rtol=1e-3)
    uncond = np.load(out / "text_uncond.npy")
    assert uncond.dtype == np.float16 and uncond.shape == (1, 16, 32)
    np.testing.assert_allclose(uncond.astype(np.float32), encoder.encode([""]).numpy(), atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("memo_size", [2, 4096])
def test_cached_text_of_repeated_captions_is_each_captions_own(vae, data, tmp_path, monkeypatch, memo_size):
    # three captions over ten images, three a batch: repeats within a batch, across batches, and (memo 2) after eviction
    repeated = tmp_path / "repeated"
    repeated.mkdir()
    captions = ["a red circle", "a blue square on a white background", "a green cross"]
    rows = []
    for i, name in enumerate(sorted(captions_of(data))):
        (repeated / name).write_bytes((data / name).read_bytes())
        rows.append(json.dumps({"file_name": name, "text": captions[(i * i) % 3]}))
    (repeated / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(encode_module, "TEXT_MEMO_SIZE", memo_size)
    out = tmp_path / "latents"
    encode_dataset(vae, make_config(repeated), out, cache_text=True, device_name="cpu")

    expected = load_text_encoder(TINY_TEXT).encode([captions[(i * i) % 3] for i in range(N_IMAGES)]).numpy()
    np.testing.assert_allclose(shard_arrays(out, "text").astype(np.float32), expected, atol=1e-2, rtol=1e-3)


def test_other_autoencoder_or_settings_are_refused(vae, other_vae, data, tmp_path):
    out = tmp_path / "latents"
    encode_dataset(vae, make_config(data), out, device_name="cpu")
    ours, theirs = load_autoencoder(vae).bundle.content_hash, load_autoencoder(other_vae).bundle.content_hash

    with pytest.raises(IncompatibleError) as refused:
        encode_dataset(other_vae, make_config(data), out, device_name="cpu")
    assert ours[:12] in str(refused.value) and theirs[:12] in str(refused.value)
    with pytest.raises(IncompatibleError, match="flip: saved False, now True"):
        encode_dataset(vae, make_config(data, flip=True), out, device_name="cpu")
    with pytest.raises(IncompatibleError, match="shard_size"):
        encode_dataset(vae, make_config(data, shard_size=5), out, device_name="cpu")

    with pytest.raises(IncompatibleError) as refused:
        LatentDataset(out, expect_autoencoder_hash=theirs)
    message = str(refused.value)
    assert f"encoded with autoencoder {ours[:12]} but the model uses {theirs[:12]}" in message and "ldm encode --vae" in message
    assert len(LatentDataset(out, expect_autoencoder_hash=ours)) == N_IMAGES

    not_latents = tmp_path / "other"
    not_latents.mkdir()
    (not_latents / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a latent dataset"):
        encode_dataset(vae, make_config(data), not_latents, device_name="cpu")


def test_cli_encode_end_to_end(vae, other_vae, data, tmp_path):
    out = tmp_path / "latents"
    arguments = ["encode", "--vae", str(vae), "--data", str(data), "--out", str(out), "--device", "cpu", "--cache-text", "--flip",
                 "batch_size=4", "shard_size=4", "precision=fp32", "text_encoder=tiny", "text_encoder.max_length=16"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert f"({N_IMAGES} items)" in result.output
    data_set = LatentDataset(out)
    assert len(data_set) == 2 * N_IMAGES and data_set[0]["text"].shape == (16, 32)
    assert data_set.text_info["config"]["tiny"] is True

    arguments[2] = str(other_vae)
    result = CliRunner().invoke(app, arguments)
    assert isinstance(result.exception, IncompatibleError)


def test_shards_are_split_between_processes_without_overlap():
    for world_size in (1, 2, 3):
        shares = [shards_for_rank(7, rank, world_size) for rank in range(world_size)]
        assert sorted(sum(shares, [])) == list(range(7))
        assert all(share == list(range(rank, 7, world_size)) for rank, share in enumerate(shares))
    assert shards_for_rank(1, 1, 2) == []


def test_batches_stay_inside_their_shard():
    assert shard_items(2, 4, 10) == range(8, 10)
    batches = plan_batches([0, 2], shard_size=4, num_items=10, batch_size=3)
    assert batches == [[0, 1, 2], [3], [8, 9]]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(vae, data, tmp_path):
    single = tmp_path / "single"
    encode_dataset(vae, make_config(data), single, device_name="cpu")
    out = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ldm_cli.cli", "encode", "--vae", str(vae), "--data", str(data), "--out", str(out), "--device", "cpu",
               "batch_size=3", "shard_size=4", "precision=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("latent dataset:") == 1  # the summary from rank 0 only
    assert len(re.findall(r"encode:\s+0%", finished.stderr)) == 1
    index = json.loads((out / "index.json").read_text())
    assert index == json.loads((single / "index.json").read_text())
    np.testing.assert_allclose(shard_arrays(out, "mean"), shard_arrays(single, "mean"), atol=1e-6)


def test_a_folder_whose_images_are_all_unreadable_is_an_error(vae, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"not an image")
    with pytest.raises(DataError, match="none of the 2 images in .*broken could be read.*ldm data check"):
        encode_dataset(vae, make_config(folder), tmp_path / "latents", device_name="cpu")


def test_damaged_latent_files_are_one_line_also_inside_a_dataloader_worker(vae, data, tmp_path):
    from torch.utils.data import DataLoader

    from ldm_cli.errors import one_line
    from ldm_cli.latents.dataset import collate_latents

    out = tmp_path / "latents"
    encode_dataset(vae, make_config(data), out, cache_text=True, device_name="cpu")
    uncond = out / "text_uncond.npy"
    uncond.write_bytes(uncond.read_bytes()[:-10])
    with pytest.raises(DataError, match="text_uncond.npy is damaged .*re-run `ldm encode --cache-text`"):
        LatentDataset(out).uncond_text()
    mean = out / "shard_00001" / "mean.npy"
    mean.write_bytes(mean.read_bytes()[:-64])
    loader = DataLoader(LatentDataset(out), batch_size=4, num_workers=1, collate_fn=collate_latents)
    with pytest.raises(DataError) as caught:
        list(loader)
    assert one_line(caught.value).startswith("shard ") and "shard_00001 is damaged" in one_line(caught.value)
    assert "delete it and re-run `ldm encode`" in one_line(caught.value)


def test_buckets_write_shards_per_shape_and_keep_every_photo_undistorted(vae, photos_dir, tmp_path):
    from tests.photos import BUCKET_OVERRIDES, PHOTO_SIZES

    from ldm_cli.config import load_config
    from ldm_cli.data.buckets import cover_crop
    from ldm_cli.data.images import load_image_rgb, pil_to_tensor

    config = load_config("encode", [f"data.path={photos_dir}", "data.buckets=true", *BUCKET_OVERRIDES,
                                    "text_encoder=tiny", "batch_size=3", "shard_size=2", "precision=fp32"])
    index = encode_dataset(vae, config, tmp_path / "latents", device_name="cpu")
    assert index["bucket_counts"] == [{"size": [24, 40], "count": 5}, {"size": [32, 32], "count": 3}, {"size": [40, 24], "count": 4}]
    assert index["latent_shape"] == [4, 20, 12]  # the most common bucket
    data = LatentDataset(tmp_path / "latents")
    groups = data.buckets()
    assert set(groups) == {(4, 20, 12), (4, 16, 16), (4, 12, 20)} and sorted(sum(groups.values(), [])) == list(range(12))
    for shape, items in groups.items():
        for item in items:
            assert tuple(data[item]["mean"].shape) == shape
    # an item's moments are the autoencoder's encoding of its cover-cropped photo
    item = groups[(4, 12, 20)][0]
    shard = next(s for s in index["shards"] if s["latent_shape"] == [4, 12, 20])
    name = json.loads((tmp_path / "latents" / shard["name"] / "paths.json").read_text())[0]
    assert PHOTO_SIZES[int(name[:2])][0] > PHOTO_SIZES[int(name[:2])][1]  # a landscape photo
    pixels = pil_to_tensor(cover_crop(load_image_rgb(photos_dir / name), (40, 24)))[None]
    model = load_autoencoder(vae).model
    with torch.no_grad():
        expected = model.encode(pixels).mean[0]
    torch.testing.assert_close(data[item]["mean"], expected, rtol=1e-4, atol=1e-4)
    # a re-run with other bucket settings is refused rather than mixed in
    other = load_config("encode", [f"data.path={photos_dir}", "data.buckets=true", *BUCKET_OVERRIDES, "data.max_aspect=1.5",
                                   "text_encoder=tiny", "shard_size=2"])
    with pytest.raises(IncompatibleError, match="buckets"):
        encode_dataset(vae, other, tmp_path / "latents", device_name="cpu")


def test_square_encodes_are_one_bucket(vae, data, tmp_path):
    encode_dataset(vae, make_config(data), tmp_path / "latents", device_name="cpu")
    dataset = LatentDataset(tmp_path / "latents")
    assert list(dataset.buckets()) == [(4, SIZE // 2, SIZE // 2)] and dataset.buckets()[(4, 8, 8)] == list(range(N_IMAGES))


@pytest.mark.slow
def test_torchrun_encode_exits_cleanly_every_time(vae, data, tmp_path):
    """Finished processes exit 0: two launches at once, twice over, one thread each (the load under
    which a process group left to interpreter shutdown aborted with SIGABRT)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "ldm_cli.cli", "encode", "--vae", str(vae), "--data", str(data), "--out", str(out),
                   "--device", "cpu", "batch_size=3", "shard_size=4", "precision=fp32"]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    for round_ in range(2):
        runs = [launch(tmp_path / f"out_{round_}_{i}") for i in range(2)]
        for run in runs:
            _, stderr = run.communicate(timeout=300)
            assert run.returncode == 0 and "terminate called" not in stderr, stderr[-3000:]
    assert json.loads((tmp_path / "out_1_1" / "index.json").read_text())["complete"]
