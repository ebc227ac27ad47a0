"""Weight files fetched over HTTP from a server on 127.0.0.1: download, cache, hashes, kills, offline."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ldm_cli.errors import MissingWeightsError
from ldm_cli.weights import WeightFile, fetch, locate, source_url

PAYLOAD = os.urandom(300_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Files(BaseHTTPRequestHandler):
    """GET /<name>: the payload; /truncated/<name>: half of it under the full length, then a hang-up;
    /stall/<name>: half of it, then nothing until the server stops."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        if self.path.startswith("/missing/"):
            self.send_error(404)
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
    httpd.requests, httpd.release = [], threading.Event()
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
