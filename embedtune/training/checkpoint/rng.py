"""Every random number generator a training step draws from, captured and restored exactly.

Python's ``random``, numpy's global generator, torch's CPU generator and, once CUDA is in use, the
generator of every visible GPU. Resuming with these restored replays the same dropout masks, negative
sampling and shuffles as the uninterrupted run. States are plain tensors, so they are stored with
safetensors (no pickle).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Tensor]:
    """Python, numpy and torch (CPU and, when initialised, every CUDA device) RNG states as tensors."""
    py_version, py_state, py_gauss = random.getstate()
    _np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    assert py_gauss is None or isinstance(py_gauss, float)
    out: dict[str, Tensor] = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": torch.tensor([py_version], dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if py_gauss is not None:
        out["python_gauss"] = torch.tensor([py_gauss], dtype=torch.float64)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = s
    return out


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    gauss = float(state["python_gauss"][0]) if "python_gauss" in state else None
    random.setstate((int(state["python_version"][0]), tuple(int(x) for x in state["python"].tolist()), gauss))
    pos, has_gauss = (int(x) for x in state["numpy_pos"].tolist())
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, float(state["numpy_gauss"][0]))
    )
    torch.set_rng_state(state["torch"])
    cuda = sorted((k for k in state if k.startswith("cuda_")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        states = [state[k] for k in cuda][: torch.cuda.device_count()]
        for i, s in enumerate(states):
            torch.cuda.set_rng_state(s, i)
