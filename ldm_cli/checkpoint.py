"""Training state on disk: atomic checkpoints, keep-last-K, exact resume.

A checkpoint is a directory `checkpoints/step_XXXXXXX/` holding `state.safetensors` (every tensor
of the training state: weights, optimiser moments, RNG states) and `state.json` (the rest of the
state tree, with references to those tensors). It is written into a temporary directory and renamed
into place, so a kill or a full disk during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from safetensors import SafetensorError

from ldm_cli.bundle import normal_mode, read_safetensors, write_safetensors
from ldm_cli.errors import BundleError, LdmError

STEP_PREFIX = "step_"


def flatten_state(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, scalars) into tensors and a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {"__tensor__": path}
        if isinstance(node, dict):
            if all(isinstance(key, str) for key in node):
                return {key: walk(value, f"{path}/{key}") for key, value in node.items()}
            return {"__intdict__": [[key, walk(value, f"{path}/{key}")] for key, value in node.items()]}
        if isinstance(node, (list, tuple)):
            items = [walk(value, f"{path}/{i}") for i, value in enumerate(node)]
            return {"__tuple__": items} if isinstance(node, tuple) else items
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path} in a checkpoint")

    return tensors, walk(tree, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__intdict__" in skeleton:
            return {key: unflatten_state(value, tensors) for key, value in skeleton["__intdict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(value, tensors) for value in skeleton["__tuple__"])
        return {key: unflatten_state(value, tensors) for key, value in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(value, tensors) for value in skeleton]
    return skeleton


class CheckpointManager:
    """Saves and finds the training checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3) -> None:
        self.directory = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def all(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{STEP_PREFIX}{step:07d}"
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory))
        normal_mode(staging, directory=True)
        try:
            tensors, skeleton = flatten_state(state)
            write_safetensors(tensors, staging / "state.safetensors")
            with open(staging / "state.json", "w") as handle:
                json.dump(skeleton, handle)
                handle.flush()
                os.fsync(handle.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except (OSError, SafetensorError) as error:  # a full disk: safetensors raises its own error type
            shutil.rmtree(staging, ignore_errors=True)
            previous = self.latest()
            kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
            raise LdmError(f"could not write checkpoint at step {step} ({reason}); {kept}") from error
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path | None = None) -> dict[str, Any]:
        path = path or self.latest()
        if path is None:
            raise BundleError(f"no checkpoint in {self.directory}")
        try:
            skeleton = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise BundleError(f"checkpoint {path} is unreadable ({error})") from error
        try:
            return unflatten_state(skeleton, read_safetensors(path / "state.safetensors"))
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"checkpoint {path} is damaged (state.json and state.safetensors disagree: {error}); delete it to resume from the one before") from error
