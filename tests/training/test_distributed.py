"""The torchrun process life: failures in main-only work reach every process, and the group is
destroyed on the way out."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
import os

import torch
import torch.distributed as dist

from ldm_cli.errors import DataError
from ldm_cli.training.distributed import MainProcessFailed, distributed, on_main


def say(line):
    # one write per line: the two processes share one pipe, and print's separate writes interleave
    os.write(1, (line + "\\n").encode())


def bug():
    raise RuntimeError("boom")


def bad_data():
    raise DataError("bad data")


with distributed(torch.device("cpu"), timeout_minutes=1) as info:
    try:
        on_main(info, bug)
    except RuntimeError as error:
        say(f"rank{info.rank} RuntimeError {error}")
    except MainProcessFailed as error:
        say(f"rank{info.rank} MainProcessFailed {error}")
    try:
        on_main(info, bad_data)
    except DataError as error:
        say(f"rank{info.rank} DataError {error}")
    say(f"rank{info.rank} value {on_main(info, lambda: 42)}")
say(f"rank{info.rank} initialized {dist.is_initialized()}")
"""


@pytest.mark.slow
def test_main_only_failures_reach_every_process_and_the_group_is_destroyed(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # before every failure was broadcast, rank 1 waited in a collective until the timeout
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    lines = set(finished.stdout.splitlines())
    assert {
        "rank0 RuntimeError boom",
        "rank1 MainProcessFailed the main process failed: RuntimeError: boom",
        "rank0 DataError bad data",
        "rank1 DataError bad data",
        "rank0 value 42",
        "rank1 value None",
        "rank0 initialized False",
        "rank1 initialized False",
    } <= lines, finished.stdout
