from __future__ import annotations

import errno
import json

import pytest
import torch

import ldm_cli.checkpoint as checkpoint_module
from ldm_cli.bundle import load_bundle, write_bundle
from ldm_cli.checkpoint import CheckpointManager, flatten_state, unflatten_state
from ldm_cli.errors import BundleError, LdmError


def test_bundle_round_trip_and_kind_check(tmp_path):
    weights = {"autoencoder": {"w": torch.arange(6.0).view(2, 3)}}
    bundle = write_bundle(tmp_path / "run" / "bundle", "autoencoder", weights, {"latent_scale": 0.5})
    loaded = load_bundle(tmp_path / "run")  # a run directory is accepted
    assert loaded.kind == "autoencoder" and loaded.meta["latent_scale"] == 0.5
    assert torch.equal(loaded.tensors("autoencoder")["w"], weights["autoencoder"]["w"])
    assert len(loaded.content_hash) == 64 and loaded.content_hash == bundle.content_hash
    with pytest.raises(BundleError, match="is a 'autoencoder' bundle, but this command needs a 'latent-diffusion'"):
        load_bundle(tmp_path / "run", kind="latent-diffusion")


def test_bundle_errors(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not an ldm model bundle"):
        load_bundle(tmp_path / "empty")
    bundle = write_bundle(tmp_path / "b", "autoencoder", {"autoencoder": {"w": torch.ones(3)}}, {})
    (bundle.path / "autoencoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="autoencoder.safetensors is corrupt: its sha256"):
        load_bundle(bundle.path).tensors("autoencoder")


def test_rewriting_a_bundle_replaces_it_whole(tmp_path):
    write_bundle(tmp_path / "b", "autoencoder", {"autoencoder": {"w": torch.ones(3)}}, {"v": 1})
    write_bundle(tmp_path / "b", "autoencoder", {"autoencoder": {"w": torch.zeros(3)}}, {"v": 2})
    loaded = load_bundle(tmp_path / "b")
    assert loaded.meta["v"] == 2 and loaded.tensors("autoencoder")["w"].sum() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging leftovers


def test_state_tree_round_trip_keeps_types():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tree = {"opt": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": 3, "t": (1, 2.5, None)}
    tensors, skeleton = flatten_state(tree)
    restored = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert restored["step"] == 3 and restored["t"] == (1, 2.5, None)
    assert set(restored["opt"]["state"]) == {0, 1}  # integer keys survive JSON
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(restored["opt"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_keep_last_and_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        manager.save(step, {"x": torch.full((2,), float(step))})
    assert [p.name for p in manager.all()] == ["step_0000004", "step_0000006"]
    assert manager.load()["x"][0] == 6


def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(2, {"x": torch.ones(2)})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "write_safetensors", disk_full)
    with pytest.raises(LdmError, match="No space left on device.*step_0000002 is intact"):
        manager.save(4, {"x": torch.zeros(2)})
    assert [p.name for p in manager.all()] == ["step_0000002"]
    assert not [p for p in manager.directory.iterdir() if p.name.startswith(".tmp")]
    assert torch.equal(manager.load()["x"], torch.ones(2))
