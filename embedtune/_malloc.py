"""Keep freed memory in the process on glibc, so that a CPU training step does not page-fault it back.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it to the system on ``free``. A CPU training step allocates the same large buffers again and
again — the dense gradient of the word embeddings on every backward pass (47 MB for MiniLM; GradCache
runs one backward per chunk), the FFN activations, attention blocks — and every time the kernel maps
and zeroes new pages: a 47 MB ``torch.zeros`` took 18 ms fresh against 1 ms in reused memory on an AMD
EPYC of this project's pool, and the whole GradCache step 11.2 s against 12.6 s
(``benchmarks/train_throughput.py``).

:func:`keep_freed_memory` tells glibc to serve every allocation from its heap (``M_MMAP_MAX`` 0) and to
keep up to 2 GiB of freed memory at its top for reuse (``M_TRIM_THRESHOLD``); peak memory stays what
it was, memory freed after the peak is kept rather than returned. It is what the ``MALLOC_MMAP_MAX_``
and ``MALLOC_TRIM_THRESHOLD_`` environment variables do, set from inside the process. Training on a CPU
(``Recipe.setup``) and encoding on a CPU (``BiEncoder.encode``: evaluation, mining, search, validation)
call it — encoding 256-token SciFact documents with MiniLM went from 13.8 to 15.2 documents/s;
``EMBEDTUNE_SYSTEM_MALLOC=1`` leaves glibc's defaults, and other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1  # mallopt takes a C int

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's allocator as the module docstring says (once per process); returns whether it did."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("EMBEDTUNE_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1
    return _done
