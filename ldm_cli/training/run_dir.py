"""Run directories: a new run writes its resolved config; re-running into one resumes it.

An existing directory is never silently overwritten: it is either an ldm run of the same command
(resumed) or an error. Re-running the same command line resumes; so does `--resume`, which reuses
the saved config with any `key=value` overrides on top. Training knobs (`train.*`) may change on
resume (e.g. `train.max_steps` to extend a run); anything else must match the saved run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ldm_cli.checkpoint import CheckpointManager
from ldm_cli.config import apply_overrides, from_dict, to_dict
from ldm_cli.errors import RunDirError

CONFIG_FILE = "config.yaml"
MUTABLE_SECTIONS = ("train",)


def open_run(
    out: Path, command: str, fresh_config: Any, overrides: list[str], resume: bool = False, write: bool = True
) -> tuple[Any, bool]:
    """Return (config, resuming) for a run in `out`; `write=False` only reads (non-main processes)."""
    out = Path(out)
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file():
        if resume:
            raise RunDirError(f"--resume: {out} holds no run to resume")
        if out.exists() and any(out.iterdir()):
            raise RunDirError(f"{out} exists and is not an ldm run; choose an empty or new --out")
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, command, fresh_config)
        return fresh_config, False

    stored = yaml.safe_load(saved_file.read_text()) or {}
    if stored.get("command") != command:
        raise RunDirError(f"{out} holds a '{stored.get('command')}' run, not a '{command}' run; choose another --out")
    saved = from_dict(stored["config"], type(fresh_config))
    if resume:
        config = apply_overrides(saved, overrides) if overrides else saved
    else:
        config = fresh_config
        difference = first_difference(to_dict(saved), to_dict(fresh_config))
        if difference:
            raise RunDirError(
                f"{out} holds a run with a different config ({difference}); use a new --out, "
                "or --resume to continue it with its saved config"
            )
    if (out / "bundle").exists() and step_of_latest(out) >= config.train.max_steps:
        raise RunDirError(
            f"the run in {out} is complete ({config.train.max_steps} steps); choose a new --out, "
            "or continue it with --resume train.max_steps=<more>"
        )
    if write:
        write_config(out, command, config)
    return config, CheckpointManager(out).latest() is not None


def first_difference(saved: dict, fresh: dict, prefix: str = "") -> str | None:
    for key in sorted(set(saved) | set(fresh)):
        name = f"{prefix}{key}"
        if not prefix and key in MUTABLE_SECTIONS:
            continue
        old, new = saved.get(key), fresh.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found = first_difference(old, new, name + ".")
            if found:
                return found
        elif old != new:
            return f"{name}: saved {old!r}, now {new!r}"
    return None


def step_of_latest(out: Path) -> int:
    latest = CheckpointManager(out).latest()
    return int(latest.name.split("_")[-1]) if latest else 0


def write_config(out: Path, command: str, config: Any) -> None:
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(yaml.safe_dump({"command": command, "config": to_dict(config)}, sort_keys=False))
    tmp.replace(out / CONFIG_FILE)
