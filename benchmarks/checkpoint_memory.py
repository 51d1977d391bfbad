"""Peak extra memory (and time) of saving a training checkpoint: the old in-memory writer vs the Checkpointer.

The state is a model of ``--mb / 3`` MB of float32 weights plus its AdamW state (two moments of the
same size): ``--mb`` MB in all (default ~300 MB). Each variant runs in a fresh subprocess, which builds
the state, takes one optimizer step (so the Adam moments exist), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``) and saves once into a temporary folder. Reported per variant:

* ``peak extra RSS``: ``VmHWM`` after the save minus ``VmRSS`` before it, i.e. what the save itself
  added on top of the state (the page cache of the written files is not counted: it is not RSS);
* ``python allocs``: ``tracemalloc`` peak (bytes objects and other Python allocations; torch's own
  tensor allocations are not traced, which is why RSS is the main number);
* ``save s``: wall time of the save (contended machine: compare the ratio, not the seconds).

The machine header (CPU model, AMX / avx512_bf16 flags, measured matmul peaks) comes first, and the
table is stored under ``benchmarks/results/checkpoint_memory_<machine>.txt``.

Variants:

* ``old (bytes in RAM)``: what ``CheckpointManager`` did before issue #11 (copied here verbatim so
  the comparison survives its removal): every weight ``.cpu().clone()``-d into a safetensors
  ``bytes``, the optimizer ``torch.save``-d into a ``BytesIO`` and copied out, then written.
* ``Checkpointer``: ``embedtune.training.checkpoint.Checkpointer.save`` (DCP's streaming file writer,
  CRC-32 of every file, commit marker).

Usage::

    python benchmarks/checkpoint_memory.py            # ~300 MB state
    python benchmarks/checkpoint_memory.py --mb 1200  # a bigger one
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(mb: float):
    import torch
    from torch import nn

    n = int(mb * 1e6 / 3 / 4)  # float32 weights = one third of the state (AdamW: two moments more)
    width = 1024
    layers = max(1, n // (width * width))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # gradients are not part of a checkpoint
    return model, opt


def _old_save(model, opt, folder: Path) -> None:
    """The pre-#11 CheckpointManager write path (model, optimizer, scheduler, trainer state)."""
    import torch
    from safetensors.torch import save as st_save

    def write(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    folder.mkdir(parents=True)
    tensors = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    files = [
        (
            "model.safetensors",
            st_save({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}),
        ),
        ("optimizer.pt", buf.getvalue()),
        ("scheduler.json", b"{}"),
        ("trainer_state.json", json.dumps({"step": 1}).encode()),
    ]
    for name, data in files:
        write(folder / name, data)


def _new_save(model, opt, folder: Path) -> None:
    from embedtune.training.checkpoint import Checkpointer, TrainState

    Checkpointer(folder).save(TrainState(step=1), model=model, optimizer=opt)


def child(variant: str, mb: float, out: str) -> None:
    model, opt = _build(mb)
    state_bytes = sum(p.numel() * 4 for p in model.parameters()) * 3
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = _status_kb("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        (_old_save if variant == "old" else _new_save)(model, opt, Path(tmp) / "ck")
        elapsed = time.perf_counter() - t0
        written = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    _, py_peak = tracemalloc.get_traced_memory()
    peak = _status_kb("VmHWM")
    print(
        json.dumps(
            {
                "state_mb": state_bytes / 1e6,
                "written_mb": written / 1e6,
                "peak_extra_mb": (peak - rss0) * 1024 / 1e6,
                "py_peak_mb": py_peak / 1e6,
                "save_s": elapsed,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=300.0, help="state size in MB (weights + AdamW moments)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant (the lowest peak is shown)")
    ap.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.mb, args.out)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import recorded

    with recorded("checkpoint_memory", argv=sys.argv[1:]):
        _compare(args)


def _compare(args: argparse.Namespace) -> None:
    import torch

    print(
        f"python {platform.python_version()}, torch {torch.__version__}; state ~{args.mb:.0f} MB "
        "(weights + AdamW moments), fresh process per run\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as out:
        for variant in ("old", "new"):
            runs = []
            for _ in range(args.repeats):
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", variant, "--mb", str(args.mb), "--out", out],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            results[variant] = min(runs, key=lambda r: r["peak_extra_mb"])
            results[variant]["save_s"] = min(r["save_s"] for r in runs)

    names = {"old": "old (bytes in RAM)", "new": "Checkpointer (DCP stream)"}
    base = results["old"]
    print(
        f"{'variant':<27}{'state MB':>10}{'written MB':>12}{'peak extra RSS MB':>19}{'x state':>9}"
        f"{'python allocs MB':>18}{'save s':>9}{'time vs old':>13}"
    )
    for variant in ("old", "new"):
        r = results[variant]
        print(
            f"{names[variant]:<27}{r['state_mb']:>10.0f}{r['written_mb']:>12.0f}{r['peak_extra_mb']:>19.1f}"
            f"{r['peak_extra_mb'] / r['state_mb']:>9.2f}{r['py_peak_mb']:>18.1f}{r['save_s']:>9.2f}"
            f"{r['save_s'] / base['save_s']:>12.2f}x"
        )
    ratio = results["new"]["peak_extra_mb"] / max(base["peak_extra_mb"], 1e-9)
    print(f"\npeak extra memory, Checkpointer / old: {ratio:.3f}")


if __name__ == "__main__":
    main()
