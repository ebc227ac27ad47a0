"""User-facing failures: each is one readable line and an exit code.

The CLI catches `LdmError` and prints `error: <message>`; anything else is a bug and
gets a traceback (always shown with `--debug`).
"""


def one_line(error: BaseException) -> str:
    """The message of `error` as one line: a DataLoader worker re-raises an error with its whole
    traceback in the message, whose last line is the original message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and lines[0].startswith("Caught ") and ": " in lines[-1]:
        return lines[-1].split(": ", 1)[1]
    return lines[0]


class LdmError(Exception):
    """Base class of every failure a user can cause and fix."""

    exit_code = 1


class ConfigError(LdmError):
    """An unknown key, a bad value or a missing group option in the composed config."""

    exit_code = 2


class UsageError(LdmError):
    """A bad command-line argument (path missing, value out of range)."""

    exit_code = 2


class DataError(LdmError):
    """A dataset that cannot be used: empty, unreadable, or a caption escaping the root."""

    exit_code = 3


class BundleError(LdmError):
    """A model bundle or checkpoint that is missing, corrupt, or of the wrong kind."""

    exit_code = 4


class MissingWeightsError(LdmError):
    """Pretrained weights that are not on this machine (offline) — names the file to provide."""

    exit_code = 5


class IncompatibleError(LdmError):
    """Pieces from different stages that do not fit (channels, widths, resolutions, hashes)."""

    exit_code = 6


class RunDirError(LdmError):
    """An output directory that exists and would be overwritten."""

    exit_code = 7


class TrainingError(LdmError):
    """Training that cannot go on (a NaN or infinite loss); the last good checkpoint is kept."""

    exit_code = 8
