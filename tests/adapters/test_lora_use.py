"""LoRA files at use: the merge's closed form, layouts refused by name, other architectures refused by key,
`ldm sample --lora` / `<lora:…>` tags / replay, and `ldm convert --merge-lora`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_cli.adapters.files import KOHYA, PEFT, LoraSpec, read_lora_file
from ldm_cli.adapters.kohya import write_kohya_file
from ldm_cli.adapters.layers import LoraLayer
from ldm_cli.adapters.prompts import lora_specs
from ldm_cli.bundle import file_sha256, load_bundle
from ldm_cli.diffusion.load import load_latent_diffusion
from ldm_cli.errors import IncompatibleError, UsageError
from ldm_cli.sampling.metadata import PARAMETERS_KEY, read_metadata
from tests.sampling.helpers import pixels, write_tiny_latent_diffusion

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # [32, 32] (context width 32)
CONV = "down_blocks.1.resnets.0.conv1"  # [64, 32, 3, 3]
TEXT_Q = "text_model.encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_latent_diffusion(tmp_path_factory.mktemp("lora-use") / "model")


def random_layers(seed: int = 0) -> dict[str, LoraLayer]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return 0.5 * torch.randn(shape, generator=generator)

    return {
        f"unet.{ATTN}": LoraLayer(randn(2, 32), randn(32, 2), 4.0),
        f"unet.{CONV}": LoraLayer(randn(2, 32, 3, 3), randn(64, 2, 1, 1), 1.0),
        f"text_encoder.{TEXT_Q}": LoraLayer(randn(2, 32), randn(32, 2), 2.0),
    }


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora-file") / "style.safetensors"
    write_kohya_file(random_layers(), path, {"ss_network_module": "networks.lora"})
    return path


def test_spec_parses_file_and_scale():
    assert LoraSpec.parse("a/b.safetensors:0.8") == LoraSpec(Path("a/b.safetensors"), 0.8)
    assert LoraSpec.parse("b.safetensors") == LoraSpec(Path("b.safetensors"), 1.0)
    assert LoraSpec.parse("b.safetensors:-1.5e-1").scale == pytest.approx(-0.15)
    with pytest.raises(UsageError, match="FILE:SCALE"):
        LoraSpec.parse("  ")


def test_kohya_file_keys_and_merge_closed_form(model_dir, kohya_file):
    keys = load_file(str(kohya_file))
    assert f"lora_unet_{ATTN.replace('.', '_')}.lora_down.weight" in keys
    assert f"lora_te_{TEXT_Q.replace('.', '_')}.alpha" in keys
    assert keys[f"lora_unet_{CONV.replace('.', '_')}.lora_down.weight"].shape == (2, 32, 3, 3)
    lora = read_lora_file(kohya_file)
    assert lora.layout == KOHYA and len(lora.layers) == 3
    plain = load_latent_diffusion(model_dir)
    merged = load_latent_diffusion(model_dir, loras=[(lora, 0.5)])
    layers = random_layers()
    for target, weight, new in (
        (f"unet.{ATTN}", plain.unet.get_submodule(ATTN).weight, merged.unet.get_submodule(ATTN).weight),
        (f"unet.{CONV}", plain.unet.get_submodule(CONV).weight, merged.unet.get_submodule(CONV).weight),
    ):
        layer = layers[target]
        expected = weight + 0.5 * layer.alpha / 2 * (layer.up.flatten(1) @ layer.down.flatten(1)).reshape(weight.shape)
        torch.testing.assert_close(new, expected, rtol=1e-6, atol=1e-6)
    plain_text, merged_text = plain.text_encoder.model.state_dict(), merged.text_encoder.model.state_dict()
    changed = [key for key in plain_text if not torch.equal(plain_text[key], merged_text[key])]
    assert changed and all("layers.0.self_attn.q_proj.weight" in key for key in changed)


def test_peft_layout_with_metadata_alpha(model_dir, tmp_path):
    generator = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, 32, generator=generator), torch.randn(32, 2, generator=generator)
    path = tmp_path / "peft.safetensors"
    save_file({f"unet.{ATTN}.lora_A.weight": down, f"unet.{ATTN}.lora_B.weight": up}, str(path),
              metadata={"lora_adapter_metadata": '{"unet.r": 2, "unet.lora_alpha": 8, "unet.alpha_pattern": {}}'})
    lora = read_lora_file(path)
    assert lora.layout == PEFT and lora.layers[f"unet.{ATTN}"].alpha == 8
    plain, merged = load_latent_diffusion(model_dir), load_latent_diffusion(model_dir, loras=[(lora, 1.0)])
    expected = plain.unet.get_submodule(ATTN).weight + 4 * up @ down
    torch.testing.assert_close(merged.unet.get_submodule(ATTN).weight, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("down, up, layout", [
    (".lora_down.weight", ".lora_up.weight", "kohya"), (".lora_A.weight", ".lora_B.weight", "diffusers/PEFT"),
])
def test_both_layouts_pair_down_and_up_and_read_a_stored_alpha(tmp_path, down, up, layout):
    path = tmp_path / "lora.safetensors"
    weights = {"a" + down: torch.ones(4, 8), "a" + up: torch.ones(8, 4), "a.alpha": torch.tensor(2.0),
               "b" + down: torch.ones(3, 8), "b" + up: torch.ones(8, 3)}
    save_file(weights, str(path))
    layers = read_lora_file(path).layers
    assert sorted(layers) == ["a", "b"] and (layers["a"].alpha, layers["b"].alpha) == (2.0, 3.0)  # else alpha = rank
    assert layers["a"].down.shape == (4, 8) and layers["a"].up.shape == (8, 4)
    save_file({"a" + down: torch.ones(4, 8)}, str(path))
    with pytest.raises(UsageError, match=f"a{down} has no matching a{up}"):
        read_lora_file(path)
    save_file({**weights, "a.scale": torch.tensor(1.0)}, str(path))
    with pytest.raises(UsageError, match=f"unexpected key a.scale in a {layout}-layout file"):
        read_lora_file(path)


@pytest.mark.parametrize("key, kind", [
    ("lora_unet_x.hada_w1_a", "LoHa"), ("lora_unet_x.lokr_w1", "LoKr"), ("lora_unet_x.lora_mid.weight", "Tucker"),
])
def test_lycoris_types_are_refused_by_name(tmp_path, key, kind):
    path = tmp_path / "lyco.safetensors"
    save_file({key: torch.zeros(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(UsageError, match=kind):
        read_lora_file(path)


def test_lora_for_another_architecture_is_refused_with_the_first_mismatching_key(model_dir, tmp_path):
    wrong_name = tmp_path / "sdxl.safetensors"
    write_kohya_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": LoraLayer(torch.zeros(2, 32), torch.zeros(32, 2), 2),
                      "unet.input_blocks.4.1.proj_in": LoraLayer(torch.zeros(2, 32), torch.zeros(32, 2), 2)}, wrong_name, {})
    with pytest.raises(IncompatibleError, match="lora_unet_input_blocks_4_1_proj_in matches no weight"):
        load_latent_diffusion(model_dir, loras=[(read_lora_file(wrong_name), 1.0)])
    wrong_shape = tmp_path / "wider.safetensors"
    write_kohya_file({f"unet.{ATTN}": LoraLayer(torch.zeros(2, 768), torch.zeros(32, 2), 2)}, wrong_shape, {})
    with pytest.raises(IncompatibleError, match=f"layer lora_unet_{ATTN.replace('.', '_')} is"):
        load_latent_diffusion(model_dir, loras=[(read_lora_file(wrong_shape), 1.0)])


def test_prompt_tags_name_lora_files(kohya_file, tmp_path, monkeypatch):
    prompts, specs = lora_specs([f"{kohya_file}:1"], ["a cat <lora:style:0.4>", "a dog"])
    assert prompts == ["a cat", "a dog"] and specs == [LoraSpec(kohya_file, 0.4)]
    with pytest.raises(UsageError, match="one scale per LoRA"):
        lora_specs([], ["<lora:style:0.4>", "<lora:style:0.5>"])
    monkeypatch.chdir(kohya_file.parent)
    assert lora_specs([], ["x <lora:style>"])[1] == [LoraSpec(Path("style.safetensors"), 1.0)]
    with pytest.raises(UsageError, match="<lora:nothere>"):
        lora_specs([], ["<lora:nothere:1>"])


SAMPLE = ["--steps", "3", "--seed", "3", "--precision", "fp32", "--device", "cpu"]


@pytest.mark.slow
def test_sample_with_lora_records_it_replays_it_and_matches_a_merged_bundle(ldm, model_dir, kohya_file, tmp_path):
    code, out, err = ldm("sample", "--model", model_dir, "--prompt", "a red circle", "--lora", f"{kohya_file}:0.7", "--out", tmp_path / "a", *SAMPLE)
    assert code == 0, err
    image = tmp_path / "a" / "00000-3.png"
    meta = read_metadata(image)
    assert meta["loras"] == [{"name": "style", "path": str(kohya_file.resolve()), "sha256": file_sha256(kohya_file), "scale": 0.7}]
    with Image.open(image) as opened:
        parameters = opened.text[PARAMETERS_KEY]
    assert parameters.startswith("a red circle <lora:style:0.7>") and f'Lora hashes: "style: {file_sha256(kohya_file)[:12]}"' in parameters
    code, _, err = ldm("sample", "--model", model_dir, "--prompt", "a red circle", *SAMPLE, "--out", tmp_path / "plain")
    assert code == 0, err
    assert not np.array_equal(pixels(tmp_path / "plain" / "00000-3.png"), pixels(image))
    # the same LoRA as a prompt tag
    code, _, err = ldm("sample", "--model", model_dir, "--prompt", "a red circle <lora:style:0.7>", "--lora", kohya_file, *SAMPLE, "--out", tmp_path / "tag")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "tag" / "00000-3.png"), pixels(image))
    code, _, err = ldm("sample", "--replay", image, "--out", tmp_path / "replay", "--device", "cpu")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "replay" / "00000-3.png"), pixels(image))
    # baked into a new bundle: the same pixels without --lora, and the source bundle untouched
    before = load_bundle(model_dir).content_hash
    code, _, err = ldm("convert", "--from", model_dir, "--merge-lora", f"{kohya_file}:0.7", "--out", tmp_path / "merged")
    assert code == 0, err
    assert load_bundle(model_dir).content_hash == before
    assert load_bundle(tmp_path / "merged").meta["merged_loras"][0]["scale"] == 0.7
    code, _, err = ldm("sample", "--model", tmp_path / "merged", "--prompt", "a red circle", *SAMPLE, "--out", tmp_path / "m")
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "m" / "00000-3.png").astype(int) - pixels(image).astype(int)).max() <= 1


def test_bad_lora_files_are_one_line_errors_that_write_nothing(ldm, model_dir, tmp_path):
    lyco = tmp_path / "loha.safetensors"
    save_file({"lora_unet_a.hada_w1_a": torch.zeros(1)}, str(lyco))
    for lora, message in ((lyco, "LyCORIS LoHa"), (tmp_path / "none.safetensors", "not found")):
        code, _, err = ldm("sample", "--model", model_dir, "--prompt", "x", "--lora", lora, *SAMPLE, "--out", tmp_path / "out")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
