"""Weight files fetched over HTTP from a server on 127.0.0.1: download, cache, hashes, kills, offline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli.autoencoder.lpips import HEADS_IN_PACKAGE
from ldm_cli.cli import app
from ldm_cli.errors import MissingWeightsError
from ldm_cli.weights import WeightFile, fetch, locate, package_file, source_url

PAYLOAD = os.urandom(300_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Files(BaseHTTPRequestHandler):
    """GET /<name>: a file of `server.files`, else the payload; /truncated/<name>: half of it under the full length, then a hang-up;
    /stall/<name>: half of it, then nothing until the server stops."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        if self.path.startswith("/missing/"):
            self.send_error(404)
            return
        if self.path in self.server.files:
            body = self.server.files[self.path].read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path.startswith(("/truncated/", "/stall/")):
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            if self.path.startswith("/stall/"):
                self.server.release.wait(30)
            return
        self.wfile.write(PAYLOAD)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.requests, httpd.release, httpd.files = [], threading.Event(), {}
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the test suite runs offline by default
    monkeypatch.delenv("LDM_OFFLINE", raising=False)
    monkeypatch.delenv("LDM_WEIGHTS_MIRROR", raising=False)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


def _spec(url: str, filename: str = "weights.pth", sha256: str | None = DIGEST) -> WeightFile:
    return WeightFile("test weights", filename, url, "loss.test_path", sha256=sha256)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*")) if folder.exists() else []


def test_download_then_cache_hit_without_the_network(server, hub):
    httpd, base = server
    spec = _spec(f"{base}/weights.pth")
    assert locate(spec).origin == "download" and locate(spec).url == spec.url
    path = fetch(spec, progress=False)
    assert path == hub / "weights.pth" and path.read_bytes() == PAYLOAD
    assert _leftovers(hub) == ["weights.pth"]  # no .part left behind
    assert locate(spec).origin == "cache"
    httpd.shutdown()  # a cached file needs no server
    assert fetch(spec, progress=False) == path
    assert httpd.requests == ["/weights.pth"]


def test_torchvision_hash_prefix_in_the_file_name_is_checked(server, hub):
    _, base = server
    good = f"net-{DIGEST[:8]}.pth"
    assert fetch(_spec(f"{base}/{good}", good, sha256=None), progress=False).read_bytes() == PAYLOAD
    bad = "net-00000000.pth"
    with pytest.raises(MissingWeightsError, match="sha256"):
        fetch(_spec(f"{base}/{bad}", bad, sha256=None), progress=False)
    assert _leftovers(hub) == [good]


def test_hash_mismatch_deletes_the_download_and_is_one_line(server, hub):
    _, base = server
    with pytest.raises(MissingWeightsError) as error:
        fetch(_spec(f"{base}/weights.pth", sha256="0" * 64), progress=False)
    message = str(error.value)
    assert "\n" not in message and f"sha256 {DIGEST[:16]}" in message and "deleted" in message
    assert _leftovers(hub) == []


def test_truncated_download_leaves_nothing_to_trust(server, hub):
    _, base = server
    spec = _spec(f"{base}/truncated/weights.pth")
    with pytest.raises(MissingWeightsError, match="could not be downloaded") as error:
        fetch(spec, progress=False)
    assert "loss.test_path=" in str(error.value)
    assert _leftovers(hub) == [] and locate(spec).origin == "download"


def test_killed_download_leaves_only_a_part_file_nothing_reads(server, hub):
    _, base = server
    spec = _spec(f"{base}/stall/weights.pth")
    # the download itself, without importing torch (seconds on a busy machine)
    code = f"import sys, pathlib; from ldm_cli.weights import download; download({spec.url!r}, pathlib.Path(sys.argv[1]), None, False)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen([sys.executable, "-c", code, str(hub / spec.filename)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(p.suffix == ".part" and p.stat().st_size > 0 for p in hub.glob("*")):
            assert time.monotonic() < deadline and process.poll() is None, "the download never started"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    names = _leftovers(hub)
    assert len(names) == 1 and names[0].startswith("weights.pth.") and names[0].endswith(".part")
    assert locate(spec).origin == "download"  # the half file is never taken for the weights


def test_offline_refuses_without_touching_the_network(server, hub, monkeypatch):
    httpd, base = server
    spec = _spec(f"{base}/weights.pth")
    for variable in ("LDM_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
        with pytest.raises(MissingWeightsError) as error:
            fetch(spec)
        message = str(error.value)
        assert "offline" in message and spec.url in message and str(hub / "weights.pth") in message
        assert "loss.test_path=/path/to/weights.pth" in message and "\n" not in message
        monkeypatch.delenv(variable)
    assert httpd.requests == []


def test_network_error_is_one_attempt_then_the_same_line(hub):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = _spec(f"http://127.0.0.1:{port}/weights.pth")
    started = time.monotonic()
    with pytest.raises(MissingWeightsError, match="could not be downloaded .*refused") as error:
        fetch(spec)
    assert time.monotonic() - started < 10
    assert f"download {spec.url} to that path" in str(error.value)
    assert _leftovers(hub) == []


def test_http_error_and_mirror_and_explicit_paths(server, hub, tmp_path, monkeypatch):
    _, base = server
    with pytest.raises(MissingWeightsError, match="Not Found"):
        fetch(_spec(f"{base}/missing/weights.pth"), progress=False)
    monkeypatch.setenv("LDM_WEIGHTS_MIRROR", base + "/")
    spec = _spec("https://example.invalid/models/weights.pth")
    assert source_url(spec) == f"{base}/weights.pth"
    assert fetch(spec, progress=False).read_bytes() == PAYLOAD
    local = tmp_path / "mine.pth"
    local.write_bytes(b"x")
    assert locate(spec, local).describe() == f"{local} (local path)"
    assert fetch(spec, local) == local
    with pytest.raises(MissingWeightsError, match="loss.test_path=.*nowhere.pth does not exist"):
        fetch(spec, tmp_path / "nowhere.pth")


# --- the commands ---------------------------------------------------------------------------------


def test_show_config_and_offline_name_each_weight_file(hub, monkeypatch):
    monkeypatch.setenv("LDM_OFFLINE", "0")  # restored after `--offline` sets it
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    result = CliRunner().invoke(app, ["train-vae", "--show-config", "loss.perceptual_weight=1.0"])
    assert result.exit_code == 0, result.output
    vgg = hub / "vgg16-397923af.pth"
    assert f"# weights: VGG16 (LPIPS backbone): {vgg} (to be downloaded from https://download.pytorch.org/models/vgg16-397923af.pth)" in result.stdout
    heads = package_file(*HEADS_IN_PACKAGE)
    assert f"# weights: LPIPS vgg v0.1 heads: {heads} (package)" in result.stdout
    result = CliRunner().invoke(app, ["train-vae", "--offline", "--show-config", "loss.perceptual_weight=0"])
    assert "# weights:" not in result.stdout  # no LPIPS term, no weight files
    result = CliRunner().invoke(app, ["train-diffusion", "--latents", "x", "--offline", "--show-config", "text_encoder=clip_vit_l14"])
    assert "# weights: text encoder openai/clip-vit-large-patch14:" in result.stdout
    assert "(missing, and offline: nothing is downloaded)" in result.stdout


def _image_folders(root: Path) -> tuple[Path, Path]:
    generator = np.random.default_rng(0)
    for name in ("real", "fake"):
        (root / name).mkdir()
        for index in range(2):
            Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    return root / "real", root / "fake"


def test_eval_samples_offline_refuses_on_one_rank_line(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    real, fake = _image_folders(tmp_path)
    result = CliRunner().invoke(app, ["eval-samples", "--real", str(real), "--fake", str(fake), "--offline"])
    assert isinstance(result.exception, MissingWeightsError) and "offline" in str(result.exception)
    assert "weights: Inception-v3:" in result.stderr and "nothing is downloaded" in result.stderr
    monkeypatch.setenv("RANK", "1")  # another torchrun process: no start-up line
    result = CliRunner().invoke(app, ["eval-samples", "--real", str(real), "--fake", str(fake), "--offline"])
    assert isinstance(result.exception, MissingWeightsError) and "weights:" not in result.stderr


@pytest.mark.slow
def test_eval_samples_fetches_the_fid_weights_once(server, hub, tmp_path, monkeypatch):
    from ldm_cli.eval.inception import fid_inception_v3, inception_source

    httpd, base = server
    served = tmp_path / "served.pth"
    torch.save(fid_inception_v3().state_dict(), served)  # random weights of pytorch-fid's layout
    httpd.files["/pt_inception-2015-12-05-6726825d.pth"] = served
    monkeypatch.setenv("LDM_WEIGHTS_MIRROR", base)
    real, fake = _image_folders(tmp_path)
    command = ["eval-samples", "--real", str(real), "--fake", str(fake), "--json"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    cached = hub / "pt_inception-2015-12-05-6726825d.pth"
    assert f"weights: Inception-v3: {cached} (to be downloaded from {base}/pt_inception" in result.stderr
    assert cached.read_bytes() == served.read_bytes()
    first = json.loads(result.stdout)
    assert first["num_real"] == 2 and np.isfinite(first["fid"])
    assert inception_source().describe() == f"{cached} (cache)"  # what the next run's start-up line says
    assert httpd.requests == ["/pt_inception-2015-12-05-6726825d.pth"]


def test_lpips_backbone_downloads_into_the_torch_cache(server, hub, tmp_path):
    import torchvision

    from ldm_cli.autoencoder.lpips import VGG16_FILE, load_lpips, vgg16_cache_path

    httpd, base = server
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    served = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, served)
    spec = dataclasses.replace(VGG16_FILE, url=f"{base}/vgg16.pth", sha256=hashlib.sha256(served.read_bytes()).hexdigest())
    httpd.files["/vgg16.pth"] = served
    model = load_lpips(vgg_source=spec)
    assert vgg16_cache_path().read_bytes() == served.read_bytes()
    torch.testing.assert_close(model.features[0].weight, features[0].weight)
    assert httpd.requests == ["/vgg16.pth"]  # the heads came from the lpips package


def test_lpips_backbone_url_is_torchvisions():
    from torchvision.models import VGG16_Weights

    from ldm_cli.autoencoder.lpips import VGG16_FILE

    assert VGG16_FILE.url == VGG16_Weights.IMAGENET1K_V1.url
    assert VGG16_FILE.filename == "vgg16-397923af.pth"
