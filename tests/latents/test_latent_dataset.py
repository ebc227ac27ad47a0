"""Reading latents: items match the shards, flipped copies, cached text, DataLoader workers,
bounded open shards, clear errors, and the posterior sample / collate helpers."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.bundle import write_bundle
from ldm_cli.config import EncodeConfig, to_dict
from ldm_cli.data.images import DataConfig
from ldm_cli.data.shapes import write_shapes_dataset
from ldm_cli.diffusion.text import TextEncoderConfig
from ldm_cli.errors import DataError, IncompatibleError
from ldm_cli.latents.dataset import LatentDataset, collate_latents, sample_latents
from ldm_cli.latents.encode import encode_dataset

N_IMAGES, SIZE = 10, 16


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """10 images, shards of 4, with flipped copies and cached tiny-CLIP text."""
    base = tmp_path_factory.mktemp("latents")
    config = AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
    torch.manual_seed(0)
    meta = {"autoencoder": to_dict(config), "latent_scale": 0.5, "latent_shift": 0.1, "resolution": SIZE}
    vae = write_bundle(base / "vae", "autoencoder", {"autoencoder": AutoencoderKL(config).state_dict()}, meta).path
    data = write_shapes_dataset(base / "data", N_IMAGES, SIZE)
    encode_config = EncodeConfig(
        data=DataConfig(path=str(data)), text_encoder=TextEncoderConfig(tiny=True, max_length=16),
        batch_size=4, shard_size=4, flip=True, precision="fp32",
    )
    encode_dataset(vae, encode_config, base / "out", cache_text=True, device_name="cpu")
    return base / "out"


def stored(root: Path, name: str) -> np.ndarray:
    return np.concatenate([np.load(root / f"shard_0000{k}" / f"{name}.npy") for k in range(3)])


def test_items_match_the_shards(latents):
    data = LatentDataset(latents)
    assert data.count == N_IMAGES and len(data) == 2 * N_IMAGES and data.use_flip
    assert data.latent_shape == (4, 8, 8) and (data.latent_scale, data.latent_shift) == (0.5, 0.1)
    assert data.resolution == SIZE and data.autoencoder_path == (latents.parent / "vae").resolve()
    assert len(data.autoencoder_hash) == 64
    mean, logvar, text = stored(latents, "mean"), stored(latents, "logvar"), stored(latents, "text")
    mean_flip, logvar_flip = stored(latents, "mean_flip"), stored(latents, "logvar_flip")
    captions = sum((json.loads((latents / f"shard_0000{k}" / "captions.json").read_text()) for k in range(3)), [])
    for i in (0, 3, 4, 9):
        item = data[i]
        assert item["mean"].dtype == torch.float32 and item["mean"].shape == (4, 8, 8)
        assert item["index"] == i and item["caption"] == captions[i]
        np.testing.assert_array_equal(item["mean"].numpy(), mean[i])
        np.testing.assert_array_equal(item["logvar"].numpy(), logvar[i])
        assert item["text"].dtype == torch.float32 and item["text"].shape == (16, 32)
        np.testing.assert_array_equal(item["text"].numpy(), text[i].astype(np.float32))
        flipped = data[N_IMAGES + i]
        assert flipped["index"] == N_IMAGES + i and flipped["caption"] == captions[i]
        np.testing.assert_array_equal(flipped["mean"].numpy(), mean_flip[i])
        np.testing.assert_array_equal(flipped["logvar"].numpy(), logvar_flip[i])
        np.testing.assert_array_equal(flipped["text"].numpy(), text[i].astype(np.float32))
    with pytest.raises(IndexError):
        data[2 * N_IMAGES]


def test_flip_choice(latents):
    assert len(LatentDataset(latents, flip=False)) == N_IMAGES
    assert len(LatentDataset(latents, flip=True)) == 2 * N_IMAGES
    no_flip = latents.parent / "no_flip"
    shutil.copytree(latents, no_flip)
    index = json.loads((no_flip / "index.json").read_text())
    (no_flip / "index.json").write_text(json.dumps({**index, "flip": False}))
    assert len(LatentDataset(no_flip)) == N_IMAGES
    with pytest.raises(DataError, match="--flip"):
        LatentDataset(no_flip, flip=True)


def test_text_cache_info_and_unconditional_embedding(latents):
    data = LatentDataset(latents)
    assert data.text_info["width"] == 32 and data.text_info["max_length"] == 16 and data.text_info["config"]["tiny"] is True
    uncond = data.uncond_text()
    assert uncond.dtype == torch.float32 and uncond.shape == (16, 32)
    np.testing.assert_array_equal(uncond.numpy(), np.load(latents / "text_uncond.npy")[0].astype(np.float32))


def test_dataloader_workers_and_pickling(latents):
    data = LatentDataset(latents)
    direct = collate_latents([data[i] for i in range(len(data))])
    assert data._open  # memmaps are open in this process, and still the dataset pickles
    clone = pickle.loads(pickle.dumps(data))
    np.testing.assert_array_equal(clone[5]["mean"].numpy(), data[5]["mean"].numpy())

    loader = DataLoader(data, batch_size=6, num_workers=2, collate_fn=collate_latents)
    batches = list(loader)
    for key in ("mean", "logvar", "text", "index"):
        assert torch.equal(torch.cat([b[key] for b in batches]), direct[key])
    assert sum((b["caption"] for b in batches), []) == direct["caption"]


def test_open_shards_are_bounded(latents):
    data = LatentDataset(latents, max_open_shards=1)
    full = LatentDataset(latents)
    for i in (0, 9, 4, 0, 15, 2):
        assert torch.equal(data[i]["mean"], full[i]["mean"])
        assert len(data._open) == 1


def test_collate_latents_shapes(latents):
    data = LatentDataset(latents)
    batch = collate_latents([data[i] for i in (1, 2, 12)])
    assert batch["mean"].shape == (3, 4, 8, 8) and batch["logvar"].shape == (3, 4, 8, 8)
    assert batch["text"].shape == (3, 16, 32) and batch["index"].tolist() == [1, 2, 12]
    assert batch["caption"] == [data[i]["caption"] for i in (1, 2, 12)]
    plain = collate_latents([{k: v for k, v in data[i].items() if k != "text"} for i in (1, 2)])
    assert "text" not in plain


def test_sample_latents_is_the_reparameterised_gaussian():
    mean = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    logvar = torch.tensor([[0.0, 2.0], [-4.0, 1.0]])
    z = sample_latents(mean, logvar, torch.Generator().manual_seed(3))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mean + torch.exp(0.5 * logvar) * noise)

    many = sample_latents(mean.expand(20000, 2, 2), logvar.expand(20000, 2, 2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(many.mean(0), mean, atol=0.1, rtol=0)
    torch.testing.assert_close(many.std(0), torch.exp(0.5 * logvar), atol=0.05, rtol=0.03)


def test_missing_incomplete_or_damaged_latents_are_clear_errors(latents, tmp_path):
    with pytest.raises(DataError, match="does not exist.*ldm encode"):
        LatentDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a latent dataset"):
        LatentDataset(tmp_path / "empty")

    partial = tmp_path / "partial"
    shutil.copytree(latents, partial)
    index = json.loads((partial / "index.json").read_text())
    (partial / "index.json").write_text(json.dumps({**index, "complete": False, "shards": index["shards"][:1]}))
    with pytest.raises(DataError, match=r"incomplete \(1 of 3 shards\)"):
        LatentDataset(partial)

    damaged = tmp_path / "damaged"
    shutil.copytree(latents, damaged)
    np.save(damaged / "shard_00001" / "mean.npy", np.zeros((2, 4, 8, 8), np.float32))
    data = LatentDataset(damaged)
    assert data[0]["mean"].shape == (4, 8, 8)
    with pytest.raises(DataError, match="shard_00001 does not hold the 4 items"):
        data[5]

    with pytest.raises(IncompatibleError, match="re-encode"):
        LatentDataset(latents, expect_autoencoder_hash="0" * 64)
