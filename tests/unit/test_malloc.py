"""``embedtune._malloc.keep_freed_memory``: on glibc, a large tensor then comes from the heap rather
than a fresh mmap (checked with glibc's own ``mallinfo2``), and ``EMBEDTUNE_SYSTEM_MALLOC=1`` leaves
glibc's defaults. Each case runs in its own process: the setting is process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)

PROBE = r"""
import ctypes, json
import torch
from embedtune._malloc import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
tuned = keep_freed_memory()
x = torch.zeros(16 << 20)  # 64 MiB: above any mmap threshold glibc allows
info = libc.mallinfo2()
print(json.dumps({"tuned": tuned, "mmapped": info.hblkhd, "heap": info.arena}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_large_tensor_comes_from_the_heap_once_tuned_and_from_mmap_by_default():
    tuned = _probe(EMBEDTUNE_SYSTEM_MALLOC="0")
    default = _probe(EMBEDTUNE_SYSTEM_MALLOC="1")
    assert tuned["tuned"] and not default["tuned"]
    assert default["mmapped"] >= 64 << 20  # glibc's default: the 64 MiB block is its own mapping
    assert tuned["mmapped"] < 64 << 20 <= tuned["heap"]
