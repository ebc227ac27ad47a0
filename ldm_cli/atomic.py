"""Writing a file all or nothing: into a temporary file beside it, then a rename over the name.

A reader (or a run resumed after a kill) sees the old file or the complete new one, never half of one.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional

TMP_PREFIX = ".tmp-"  # a temporary's name starts with it, so a clean-up can find what a kill left


@contextmanager
def atomic_file(path: Path, mode: str = "wb", *, fsync: bool = False, temporary: Optional[Path] = None) -> Iterator[IO[Any]]:
    """A handle on a temporary file that replaces `path` when the block ends without an error.

    `fsync` forces the bytes to the disk before the rename, so a power cut cannot leave an empty
    file under the name; on any error the temporary is removed and the error raised again.
    """
    path = Path(path)
    temporary = temporary or path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        # newline="": text is written as given (csv writes its own line ends)
        with open(temporary, mode, newline=None if "b" in mode else "") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
