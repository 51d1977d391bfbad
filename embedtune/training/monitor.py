"""Watching a run: progress bar, JSON-lines metrics, optional TensorBoard, loss-curve PNG.

``metrics.jsonl`` holds one JSON object per logged step (``{"step", "epoch", "loss", "lr",
"grad_norm", "examples_per_s", "elapsed_s"}``) and one per validation (``{"step", "val/ndcg@10", ...}``).
Floats are written with ``repr`` precision, so two runs can be compared bit for bit from this file.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["TrainingMonitor", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file (empty list when missing)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


class TrainingMonitor:
    """Collects training metrics and shows/writes them.

    Args:
        output_dir: run folder (``metrics.jsonl``, ``tensorboard/``, ``loss.png`` go here).
        total_steps: planned optimizer steps (for the progress bar and ETA).
        start_step: steps already done (when resuming); later records in ``metrics.jsonl`` are dropped,
            so the file reads as one uninterrupted run.
        progress_bar: show a tqdm bar on stderr.
        tensorboard: also log to TensorBoard when the package is importable.
    """

    def __init__(
        self,
        output_dir: str | Path,
        total_steps: int,
        *,
        start_step: int = 0,
        progress_bar: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step] if start_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.total_steps = total_steps
        self._step_times: list[float] = []
        self._bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                # tqdm's own rate would count validation pauses as training; our ETA uses step times.
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self._tb = None
        if tensorboard:
            try:  # optional: torch's SummaryWriter needs the tensorboard package
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold ``step``) to every sink."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record["step"])
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None and "loss" in record:
            if "step_s" in record:
                self._step_times.append(float(record["step_s"]))
            recent = self._step_times[-20:]
            per_step = sum(recent) / len(recent) if recent else float("inf")
            self._bar.n = step
            self._bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record.get('lr', 0):.2e}",
                ex_s=f"{record.get('examples_per_s', 0):.1f}",
                eta=_fmt_eta((self.total_steps - step) * per_step),
                refresh=False,
            )
            self._bar.refresh()

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self, plot: bool = True, metrics: tuple[str, ...] = ("ndcg@10", "recall@10")) -> Path | None:
        """Close all sinks; write ``loss.png`` (loss + validation ``metrics``) when ``plot`` and matplotlib
        is available."""
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        return plot_losses(self.path, self.dir / "loss.png", metrics) if plot else None


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plot_losses(
    metrics_path: Path, out: Path, metrics: tuple[str, ...] = ("ndcg@10", "recall@10")
) -> Path | None:
    """Plot training loss (and validation ``metrics`` on a second axis) to a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    # Only the headline retrieval metrics (all in [0, 1]); timings and the many cut-offs would clutter it.
    wanted = {f"val/{m}" for m in metrics}
    val_keys = sorted({k for r in records for k in r if k in wanted})
    if val_keys:
        ax2 = ax.twinx()
        for k in val_keys:
            pts = [(r["step"], r[k]) for r in records if k in r]
            ax2.plot(*zip(*pts), marker="o", linestyle="--", label=k)
        ax2.set_ylabel("validation")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("embedtune training")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
