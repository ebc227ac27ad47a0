"""Run directories: a new run writes its resolved config; re-running into one resumes it.

An existing directory is never silently overwritten: it is either an ldm run of the same command
(resumed) or an error. Re-running the same command line resumes an unfinished run; `--resume`
reuses the saved config with any overrides on top (the run's own config-group choices such as
`autoencoder=tiny` may be repeated). Training knobs (`train.*`) may change on resume (e.g.
`train.max_steps` to extend a run); anything else must match the saved run.

`open_run` only decides (it writes nothing), so a failed start leaves `--out` untouched;
`start_run` then takes the directory: a lock file naming the process, stale temporaries removed,
the config written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from ldm_cli.checkpoint import CheckpointManager
from ldm_cli.config import apply_overrides, from_dict, to_dict
from ldm_cli.errors import LdmError, RunDirError

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
MUTABLE_SECTIONS = ("train",)
# what a kill can leave half-written: checkpoint and bundle staging folders, temporary files
STALE_PATTERNS = ("checkpoints/.tmp-*", ".bundle.tmp-*", ".bundle.old", f".{CONFIG_FILE}.tmp", "metrics.csv.tmp")


def open_run(
    out: Path, command: str, fresh_config: Any, overrides: list[str], resume: bool = False, write: bool = False
) -> tuple[Any, bool]:
    """Return (config, resuming) for a run in `out`, refusing what would overwrite another run.

    Nothing is written unless `write` is set (then the config is saved, as `start_run` does).
    """
    out = Path(out)
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file():
        if resume:
            raise RunDirError(f"--resume: {out} holds no run to resume")
        if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise RunDirError(f"{out} exists and is not an ldm run; choose an empty or new --out")
        if write:
            out.mkdir(parents=True, exist_ok=True)
            write_config(out, command, fresh_config)
        return fresh_config, False

    stored = read_saved(saved_file)
    if stored.get("command") != command:
        raise RunDirError(f"{out} holds a '{stored.get('command')}' run, not a '{command}' run; choose another --out")
    saved = from_dict(stored["config"], type(fresh_config))
    finished = (out / "bundle").exists()
    if resume:
        config = resumed_config(saved, fresh_config, overrides)
        difference = first_difference(to_dict(saved), to_dict(config))
        if difference:
            raise RunDirError(f"--resume cannot change {difference}; only train.* settings may change, use a new --out")
    else:
        config = fresh_config
        difference = first_difference(to_dict(saved), to_dict(fresh_config))
        if difference:
            raise RunDirError(
                f"{out} holds a run with a different config ({difference}); use a new --out, "
                "or --resume to continue it with its saved config"
            )
    if finished and (not resume or step_of_latest(out) >= config.train.max_steps):
        raise RunDirError(
            f"the run in {out} is complete ({step_of_latest(out) or saved.train.max_steps} steps); choose a new --out, "
            "or continue it with --resume train.max_steps=<more>"
        )
    if write:
        write_config(out, command, config)
    return config, CheckpointManager(out).latest() is not None


def saved_config(out: Path, config_type: type) -> Any | None:
    """The config a run in `out` was saved with, or None when `out` holds no run yet."""
    saved_file = Path(out) / CONFIG_FILE
    return from_dict(read_saved(saved_file)["config"], config_type) if saved_file.is_file() else None


def resumed_config(saved: Any, fresh: Any, overrides: list[str]) -> Any:
    """The saved config with the overrides on top: a config-group choice (`unet=tiny`) takes that
    section from the freshly composed config, `key=value` overrides apply as they are."""
    groups = {f.name for f in dataclasses.fields(saved) if dataclasses.is_dataclass(getattr(saved, f.name))}
    config, dotted = saved, []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in groups:
            config = dataclasses.replace(config, **{key: getattr(fresh, key)})
        else:
            dotted.append(override)
    return apply_overrides(config, dotted) if dotted else config


def read_saved(saved_file: Path) -> dict:
    """The saved `config.yaml`, or one line saying why it cannot be used."""
    try:
        stored = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunDirError(f"{saved_file} is unreadable ({reason}); fix or delete it, or use a new --out") from error
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        raise RunDirError(f"{saved_file} is not an ldm run config (no 'command' and 'config' mapping); fix or delete it, or use a new --out")
    return stored


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


@contextmanager
def start_run(out: Path, command: str, config: Any, enabled: bool = True) -> Iterator[None]:
    """Hold `out` for one process while training: lock, clear stale temporaries, save the config.

    `enabled=False` (non-main processes of a distributed run) takes nothing.
    """
    if not enabled:
        yield
        return
    lock = claim_run(out, command, config)
    try:
        yield
    finally:
        lock.release()


def claim_run(out: Path, command: str, config: Any) -> "RunLock":
    """Lock `out` for this process, clear stale temporaries and save the config; release the lock when done."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    lock.acquire()
    try:
        remove_stale(out)
        write_config(out, command, config)
    except BaseException:
        lock.release()
        raise
    return lock


def remove_stale(out: Path) -> list[Path]:
    """Delete what killed processes left half-written (safe: the lock excludes a live writer)."""
    removed = []
    for pattern in STALE_PATTERNS:
        for path in Path(out).glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class RunLock:
    """`--out/.lock` holding "PID HOST": a second trainer is refused; a dead owner's lock is taken over."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is not None and owner_alive(*owner):
                    pid, host = owner
                    raise RunDirError(
                        f"{self.path.parent} is in use by process {pid} on {host}; wait for it to finish, "
                        f"or delete {self.path} if that process is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner died without releasing it
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return
        raise LdmError(f"could not take the lock {self.path}; another process keeps replacing it")

    def owner(self) -> tuple[int, str] | None:
        try:
            pid, host = self.path.read_text().split()
            return int(pid), host
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held and self.owner() == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)
        self.held = False


def owner_alive(pid: int, host: str) -> bool:
    """Whether the lock's owner still runs; a process on another host cannot be checked, so counts as alive."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
