"""Output files of the commands that write one themselves (``encode``'s ``.npy``, ``cp``'s recipe).

Written to a temporary file beside the target and renamed over it only when complete, so a full disk
or Ctrl+C leaves the previous file as it was. (Library outputs — models, exports, mined files, eval
results — go through ``embedtune._atomic``.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def replace_when_done(path: str | os.PathLike[str]) -> Iterator[IO[Any]]:
    """A binary file to write; on a clean exit it replaces ``path``, else it is deleted."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 -> what a plain open() would give
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
