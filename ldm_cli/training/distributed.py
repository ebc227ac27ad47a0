"""Multi-process training through torch.distributed, as started by `torchrun`."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from ldm_cli.errors import LdmError

Result = TypeVar("Result")

# Rank 0 alone evaluates, writes checkpoints and bundles while the others wait in a collective;
# NCCL's 10-minute default is shorter than a large model's evaluation.
DEFAULT_TIMEOUT_MINUTES = 120.0


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class MainProcessFailed(LdmError):
    """Raised on the other processes when the main process failed in a main-only section."""


def init_distributed(device: torch.device, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistInfo:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


@contextlib.contextmanager
def distributed(device: torch.device, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Iterator[DistInfo]:
    """The whole life of a torchrun process: join the group, run the body, then every rank meets a
    final barrier and the group is destroyed before the interpreter exits.

    Without the explicit destroy, gloo's worker threads are torn down during interpreter
    finalisation, which can abort a finished process ("terminate called without an active
    exception", SIGABRT) — rarely, and more often under load.
    """
    info = init_distributed(device, timeout_minutes)
    if not info.enabled:
        yield info
        return
    try:
        yield info
    except LdmError:
        # every process raises these together (on_main broadcasts them), so none is left in a collective
        dist.destroy_process_group()
        raise
    # any other failure skips both: a barrier or a destroy could wait on peers that never arrive
    dist.barrier()
    dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def on_main(info: DistInfo, work: Callable[[], Result]) -> Result | None:
    """Run `work` on the main process only; whatever it raises is raised on every process, so no rank
    is left blocked in a collective until the timeout. The others get the main process's result as None."""
    result, failure, message = None, None, None
    if info.is_main:
        try:
            result = work()
        except LdmError as error:
            failure, message = error, error
        except BaseException as error:  # a bug or an interrupt: the others get its one-line summary
            failure, message = error, f"{type(error).__name__}: {error}"
    if info.enabled:
        box: list[Any] = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if failure is not None:
        raise failure
    if isinstance(message, LdmError):
        raise message
    if message is not None:
        raise MainProcessFailed(f"the main process failed: {message}")
    return result


def device_for(device: torch.device, info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if device.type == "cuda" and info.enabled else device


def env_info() -> DistInfo:
    """This process's place as torchrun describes it, known before (or without) joining the group."""
    return DistInfo(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    )
