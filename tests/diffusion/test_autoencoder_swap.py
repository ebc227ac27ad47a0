"""A decoder-only fine-tune keeps the latent space: latents and models made with the first autoencoder
decode with it, and a latent-diffusion bundle can carry it in place of its own."""

from __future__ import annotations

import pytest
import torch

from ldm_cli.autoencoder.load import bundle_latent_space, latent_space_hash, load_autoencoder, shares_latent_space
from ldm_cli.bundle import load_bundle
from ldm_cli.diffusion.load import load_latent_diffusion, replace_autoencoder
from ldm_cli.errors import IncompatibleError
from tests.sampling.helpers import write_autoencoder_variant, write_tiny_latent_diffusion


@pytest.fixture
def model(tmp_path):
    return write_tiny_latent_diffusion(tmp_path / "model")


def test_latent_space_hash_follows_the_encoder_and_scale_not_the_decoder(model, tmp_path):
    own = load_bundle(model / "autoencoder")
    tuned = load_bundle(write_autoencoder_variant(own.path, tmp_path / "tuned", "decoder"))
    other = load_bundle(write_autoencoder_variant(own.path, tmp_path / "other", "encoder"))
    assert tuned.content_hash != own.content_hash
    assert bundle_latent_space(tuned) == bundle_latent_space(own) != bundle_latent_space(other)
    weights = own.tensors("autoencoder")
    assert latent_space_hash(weights, 0.5, 0.0) != latent_space_hash(weights, 0.25, 0.0)
    recorded = {"content_hash": own.content_hash, "latent_space_hash": bundle_latent_space(own)}
    assert shares_latent_space(recorded, tuned) and not shares_latent_space(recorded, other)
    assert not shares_latent_space({"content_hash": own.content_hash}, tuned)  # without the hash: only the same bundle


def test_replace_autoencoder_carries_the_new_decoder_and_keeps_the_rest(model, tmp_path):
    before = load_bundle(model)
    unet_before = {key: value.clone() for key, value in before.tensors("unet").items()}
    tuned = write_autoencoder_variant(model / "autoencoder", tmp_path / "tuned", "decoder")
    after = replace_autoencoder(model, load_bundle(tuned))
    assert after.meta["autoencoder"]["content_hash"] == load_bundle(tuned).content_hash
    assert after.meta["unet"] == before.meta["unet"] and after.meta["text_encoder"] == before.meta["text_encoder"]
    unet_after = after.tensors("unet")
    assert unet_before.keys() == unet_after.keys() and all(torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    loaded = load_latent_diffusion(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.autoencoder.model.decode(latents), load_autoencoder(tuned).model.decode(latents))


def test_replace_autoencoder_refuses_another_encoder_and_leaves_the_bundle(model, tmp_path):
    other = write_autoencoder_variant(model / "autoencoder", tmp_path / "other", "encoder")
    before = load_bundle(model)
    with pytest.raises(IncompatibleError, match="another encoder or latent scale .* decoder-only fine-tune"):
        replace_autoencoder(model, load_bundle(other))
    assert load_bundle(model).meta == before.meta


def test_convert_vae_writes_a_copy_carrying_the_fine_tuned_decoder(model, tmp_path, ldm):
    tuned = write_autoencoder_variant(model / "autoencoder", tmp_path / "tuned", "decoder")
    code, out, err = ldm("convert", "--from", model, "--out", tmp_path / "baked", "--vae", tuned)
    assert code == 0, err
    assert load_bundle(tmp_path / "baked").meta["autoencoder"]["content_hash"] == load_bundle(tuned).content_hash
    assert load_bundle(model).meta["autoencoder"]["content_hash"] != load_bundle(tuned).content_hash  # source untouched

    other = write_autoencoder_variant(model / "autoencoder", tmp_path / "other", "encoder")
    code, out, err = ldm("convert", "--from", model, "--out", tmp_path / "refused", "--vae", other)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "another encoder or latent scale" in err
    assert not (tmp_path / "refused").exists()
