"""Bundles refuse what would sample garbage or exhaust memory: flipped bytes, NaN weights, huge configs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from ldm_cli.autoencoder.load import load_autoencoder
from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.bundle import load_bundle, write_bundle
from ldm_cli.checkpoint import CheckpointManager
from ldm_cli.config import to_dict
from ldm_cli.errors import BundleError, one_line

TINY = AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)


def tiny_autoencoder_bundle(path):
    torch.manual_seed(0)
    model = AutoencoderKL(TINY)
    meta = {"autoencoder": to_dict(TINY), "latent_scale": 0.5, "latent_shift": 0.0, "resolution": 16}
    return write_bundle(path, "autoencoder", {"autoencoder": model.state_dict()}, meta)


def test_bytes_changed_inside_the_weights_are_refused_with_the_file_named(tmp_path):
    bundle = tiny_autoencoder_bundle(tmp_path / "vae")
    weights = bundle.path / "autoencoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:-4] = b"\x00\x00\xc0\x7f"  # a NaN poked into the last float: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="autoencoder.safetensors is corrupt: its sha256 is .*restore the file"):
        load_autoencoder(bundle.path)


def test_bytes_changed_after_a_verified_load_are_still_refused(tmp_path):
    """Verified hashes are remembered across runs, but only while the file's change stamps hold: a write
    that keeps the size and puts the mtime back still changes the ctime."""
    bundle = tiny_autoencoder_bundle(tmp_path / "vae")
    load_autoencoder(bundle.path)  # verified and remembered
    weights = bundle.path / "autoencoder.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-8:-4] = b"\x00\x00\xc0\x7f"
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(BundleError, match="autoencoder.safetensors is corrupt"):
        load_autoencoder(bundle.path)


def test_a_damaged_hash_cache_only_costs_a_rehash(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "verified-sha256.json").write_text("{not json")
    bundle = tiny_autoencoder_bundle(tmp_path / "vae")
    loaded = load_autoencoder(bundle.path)
    assert loaded.model.encoder.conv_in.weight.shape == (8, 3, 3, 3)
    remembered = json.loads((tmp_path / "cache" / "verified-sha256.json").read_text())
    assert bundle.meta["hashes"]["autoencoder"] in remembered.values()


def test_weights_load_in_the_asked_dtype(tmp_path):
    bundle = tiny_autoencoder_bundle(tmp_path / "vae")
    loaded = load_autoencoder(bundle.path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    reference = load_autoencoder(bundle.path).model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, reference[key].to(torch.bfloat16)), key


def test_a_config_claiming_huge_shapes_is_refused_before_allocating(tmp_path):
    bundle = tiny_autoencoder_bundle(tmp_path / "vae")
    meta = json.loads((bundle.path / "bundle.json").read_text())
    meta["autoencoder"]["block_out_channels"] = [32768, 65536]  # ~100 GB of float32 if built
    (bundle.path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="autoencoder weights do not match its config in bundle.json: .* is \\(8, 3, 3, 3\\) in the file, the config makes it \\(32768, 3, 3, 3\\)"):
        load_autoencoder(bundle.path)


@pytest.mark.parametrize("drop", ["hashes", "latent_scale", "autoencoder"])
def test_a_bundle_json_missing_keys_is_one_line(tmp_path, drop):
    bundle = tiny_autoencoder_bundle(tmp_path / "vae")
    meta = json.loads((bundle.path / "bundle.json").read_text())
    del meta[drop]
    (bundle.path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=f"bundle.json lacks {drop}; the bundle is incomplete"):
        load_autoencoder(bundle.path)


@pytest.mark.parametrize("poison", ["weight", "scale"])
def test_non_finite_weights_or_scale_are_never_written(tmp_path, poison):
    weights = {"w": torch.ones(3)}
    meta = {"latent_scale": 0.5}
    if poison == "weight":
        weights["w"][1] = float("nan")
    else:
        meta["latent_scale"] = float("inf")
    with pytest.raises(BundleError, match="refusing to write a bundle: (autoencoder weight w holds NaN|latent_scale is inf)"):
        write_bundle(tmp_path / "b", "autoencoder", {"autoencoder": weights}, meta)
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


def test_bundles_and_checkpoints_get_the_umask_modes(tmp_path):
    bundle = tiny_autoencoder_bundle(tmp_path / "vae")
    saved = CheckpointManager(tmp_path / "run").save(1, {"x": torch.ones(1)})
    umask = os.umask(0)
    os.umask(umask)
    for directory in (bundle.path, saved):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask
    for path in (bundle.path / "autoencoder.safetensors", saved / "state.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.slow
def test_a_disk_filling_during_a_checkpoint_save_is_one_line_and_keeps_the_previous(tmp_path):
    """A real write failure (the file-size limit stands in for a full disk): safetensors raises its own error."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from ldm_cli.checkpoint import CheckpointManager
        from ldm_cli.errors import LdmError
        manager = CheckpointManager({str(tmp_path)!r})
        manager.save(1, {{"x": torch.ones(4)}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            manager.save(2, {{"x": torch.ones(100_000)}})
        except LdmError as error:
            print("LDM", error)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("LDM could not write checkpoint at step 2") and "step_0000001 is intact" in result.stdout
    assert [p.name for p in CheckpointManager(tmp_path).all()] == ["step_0000001"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_an_error_raised_in_a_dataloader_worker_prints_as_its_own_line():
    wrapped = RuntimeError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise DataError("shard 3 is damaged")\nldm_cli.errors.DataError: shard 3 is damaged\n'
    )
    assert one_line(wrapped) == "shard 3 is damaged"
    assert one_line(ValueError("first\nsecond")) == "first"


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_truncated_or_garbled_weights_file_is_one_line(tmp_path, damage):
    from ldm_cli.bundle import read_safetensors

    bundle = tiny_autoencoder_bundle(tmp_path / "vae")
    weights = bundle.path / "autoencoder.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100] if damage == "truncated" else (10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(BundleError, match="autoencoder.safetensors is corrupt or truncated"):
        read_safetensors(weights)


def test_weights_read_equal_safetensors_own_reader(tmp_path):
    from safetensors.torch import load_file, save_file

    from ldm_cli.bundle import read_safetensors

    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "i64": torch.arange(6).reshape(2, 3),
               "empty": torch.zeros(0, 2), "scalar": torch.tensor(1.5), "bool": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "w.safetensors", metadata={"kind": "test"})
    ours, theirs = read_safetensors(tmp_path / "w.safetensors"), load_file(tmp_path / "w.safetensors")
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    cast = read_safetensors(tmp_path / "w.safetensors", dtype=torch.bfloat16)
    assert cast["f32"].dtype == torch.bfloat16 and cast["i64"].dtype == torch.int64 and cast["bool"].dtype == torch.bool


def resident_kib_of(path) -> tuple[int, int]:
    """(maps, resident KiB) of this process's memory maps of `path` (Linux's /proc/self/smaps)."""
    maps = kib = 0
    inside = False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
            maps += inside
        elif inside and line.startswith("Rss:"):
            kib += int(line.split()[1])
    return maps, kib


needs_smaps = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")


def test_read_weights_keep_their_values_when_the_file_is_replaced_deleted_or_they_are_written(tmp_path):
    from safetensors.torch import save_file

    from ldm_cli.bundle import read_safetensors

    path = tmp_path / "w.safetensors"
    original = {"a": torch.randn(1000, 300), "b": torch.randn(7)}  # "a" spans many pages, "b" shares one with it
    save_file(original, path)
    weights = read_safetensors(path)
    save_file({key: torch.zeros_like(value) for key, value in original.items()}, tmp_path / "new.safetensors")
    os.replace(tmp_path / "new.safetensors", path)
    assert all(torch.equal(weights[key], value) for key, value in original.items())
    path.unlink()
    assert all(torch.equal(weights[key], value) for key, value in original.items())
    save_file(original, path)
    weights = read_safetensors(path)
    weights["a"].add_(1)  # copy-on-write: the file, and a second read of it, keep the stored values
    assert torch.equal(weights["a"], original["a"] + 1)
    assert all(torch.equal(read_safetensors(path)[key], value) for key, value in original.items())
    del weights["b"]  # its pages go; the written ones of "a" stay
    assert torch.equal(weights["a"], original["a"] + 1)


@needs_smaps
def test_a_freed_weight_leaves_resident_memory_and_the_last_one_closes_the_file(tmp_path):
    from safetensors.torch import save_file

    from ldm_cli.bundle import read_safetensors

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(1000, 1000), "b": torch.randn(1000, 1000)}, path)  # 3.8 MiB each
    weights = read_safetensors(path)
    assert resident_kib_of(path)[1] < 100  # nothing read yet
    total = sum(float(value.sum()) for value in weights.values())
    maps, touched = resident_kib_of(path)
    assert maps >= 1 and touched > 7000
    weights["a"] = weights["a"].clone()  # a packed or converted copy replacing the stored weight
    assert resident_kib_of(path)[1] < touched - 3800
    assert sum(float(value.sum()) for value in weights.values()) == pytest.approx(total, rel=1e-5)
    del weights
    assert resident_kib_of(path) == (0, 0)
    cast = read_safetensors(path, dtype=torch.bfloat16)  # cast straight out of the map, which is then closed
    assert cast["a"].dtype == torch.bfloat16 and resident_kib_of(path) == (0, 0)


def test_tensors_sharing_bytes_are_refused(tmp_path):
    from ldm_cli.bundle import read_safetensors

    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    (tmp_path / "w.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(BundleError, match="corrupt or truncated .two tensors share bytes"):
        read_safetensors(tmp_path / "w.safetensors")
