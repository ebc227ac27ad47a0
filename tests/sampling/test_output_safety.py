"""What `sample` writes and reads back: grids never overwrite, full disks leave no 0-byte PNG,
crafted replay fields are refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from ldm_cli.errors import DataError
from ldm_cli.sampling.output import OutputFolder
from ldm_cli.sampling.metadata import png_info, read_metadata

META = {
    "mode": "txt2img", "prompt": "a red circle", "negative_prompt": "", "seed": 3, "steps": 5, "sampler": "euler",
    "guidance_scale": 7.5, "height": 16, "width": 16, "timestep_spacing": "trailing", "karras_sigmas": False,
    "precision": "fp32", "model": "m",
}


def png_with(tmp_path, **changes):
    path = tmp_path / "crafted.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=png_info({**META, **changes}))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"steps": "abc"}, "steps='abc', not an integer"),
    ({"seed": 1.5}, "seed=1.5, not an integer"),
    ({"guidance_scale": "high"}, "guidance_scale='high', not a number"),
    ({"karras_sigmas": "yes"}, "karras_sigmas='yes', not true or false"),
    ({"height": True}, "height=True, not an integer"),
])
def test_malformed_replay_fields_are_one_line(tmp_path, changes, message):
    with pytest.raises(DataError, match=message):
        read_metadata(png_with(tmp_path, **changes))


def test_well_formed_metadata_reads_back(tmp_path):
    assert read_metadata(png_with(tmp_path, eta=None))["steps"] == 5


def test_a_grid_never_replaces_an_existing_file(tmp_path):
    folder = OutputFolder(tmp_path)
    first = folder.write_image(Image.new("RGB", (4, 4)), 1, META, False)
    second = folder.write_image(Image.new("RGB", (4, 4)), 2, META, False)
    (tmp_path / "grid-00000-00001.png").write_bytes(b"mine")
    images = [torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)]
    grid = folder.write_grid(images, 2, first, second)
    assert grid.name == "grid-00000-00001-1.png" and Image.open(grid).size[0] > 4
    assert (tmp_path / "grid-00000-00001.png").read_bytes() == b"mine"
    assert folder.write_grid(images, 2, first, second).name == "grid-00000-00001-2.png"


@pytest.mark.slow
def test_a_disk_filling_while_writing_an_image_leaves_nothing_and_is_one_line(tmp_path):
    """The file-size limit stands in for a full disk: a real write failure, in a child process."""
    script = textwrap.dedent(f"""
        import resource, signal
        from PIL import Image
        from ldm_cli.errors import LdmError
        from ldm_cli.sampling.output import OutputFolder
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        noise = Image.effect_noise((256, 256), 64).convert("RGB")
        try:
            OutputFolder({str(tmp_path)!r}).write_image(noise, 7, {META!r}, False)
        except LdmError as error:
            print("LDM", error)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("LDM could not write") and "00000-7.png" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no 0-byte PNG, no temporary file
