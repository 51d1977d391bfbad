"""Watching a run: progress, JSON-lines metrics, optional TensorBoard, a plot and a results file.

``metrics.jsonl`` holds one JSON object per logged step (``{"step", "epoch", "loss", "lr",
"grad_norm", "examples_per_s", "elapsed_s"}``) and one per validation (``{"step", "val/ndcg@10", ...}``).
Floats are written with ``repr`` precision, so two runs can be compared bit for bit from this file.
A run killed while writing leaves a torn last line: reading drops it with a warning.

Progress is a tqdm bar on a terminal and one plain line per ~10% (or 30 s) otherwise, so log files
hold lines, not carriage-return frames. At the end, ``results.json`` says what the run did (steps,
time, final and best metrics) and ``loss.png`` draws loss with the learning rate, and validation, in
separate panels.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from embedtune._atomic import write_json
from embedtune.errors import DataError
from embedtune.progress import is_terminal

__all__ = ["RESULTS_FILE", "TrainingMonitor", "read_metrics", "summarize_run"]

RESULTS_FILE = "results.json"


class MetricsLogWarning(UserWarning):
    """A torn last line of ``metrics.jsonl`` (a run killed while writing it) was dropped."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file (empty list when missing).

    A last line that is not complete JSON (the process was killed while writing it) is dropped with a
    ``MetricsLogWarning``; a broken line anywhere else is an error.

    Raises:
        DataError: a line before the last one is not JSON (names the file and line).
    """
    p = Path(path)
    if not p.is_file():
        return []
    lines = [
        (i, line) for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if line.strip()
    ]
    records: list[dict[str, Any]] = []
    for n, (line_no, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if n == len(lines) - 1:
                warnings.warn(
                    f"{p}:{line_no}: dropped a torn last line (the run was interrupted while writing it)",
                    MetricsLogWarning,
                    stacklevel=2,
                )
                break
            raise DataError(
                f"{p}:{line_no}: not a JSON record ({exc.msg}) — this metrics log is damaged; delete the line "
                "or the file to start a fresh log"
            ) from None
    return records


def summarize_run(
    records: list[dict[str, Any]], metrics: tuple[str, ...] = (), *, seconds: float | None = None
) -> dict[str, Any]:
    """What a run did, from its ``metrics.jsonl`` records: steps, time, final and best metrics.

    Args:
        records: the log (``read_metrics``).
        metrics: validation metrics of interest; the first one chooses "best" (higher is better).
        seconds: wall time of this process (default: the last ``elapsed_s`` logged).
    """
    train = [r for r in records if "loss" in r]
    val = [r for r in records if any(k.startswith("val/") for k in r)]
    last = train[-1] if train else {}
    out: dict[str, Any] = {
        "steps": int(last.get("step", 0)),
        "epoch": last.get("epoch"),
        "seconds": seconds if seconds is not None else last.get("elapsed_s"),
        "final": {k: last[k] for k in ("loss", "lr", "grad_norm", "examples_per_s") if k in last},
        "final_validation": None,
        "best_validation": None,
    }
    if train:
        out["first_loss"] = train[0]["loss"]
    if val:
        out["final_validation"] = {k: v for k, v in val[-1].items()}
        key = f"val/{metrics[0]}" if metrics else next(k for k in val[-1] if k.startswith("val/"))
        scored = [r for r in val if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if scored:
            best = max(scored, key=lambda r: r[key])  # the first of equal values: the earliest step
            out["best_validation"] = {"metric": key, "value": best[key], "step": best["step"], **best}
    return out


class TrainingMonitor:
    """Collects training metrics and shows/writes them.

    Args:
        output_dir: run folder (``metrics.jsonl``, ``tensorboard/``, ``loss.png`` go here).
        total_steps: planned optimizer steps (for the progress bar and ETA).
        start_step: steps already done (when resuming); later records in ``metrics.jsonl`` are dropped,
            so the file reads as one uninterrupted run.
        progress_bar: show progress on stderr: a tqdm bar on a terminal, plain lines otherwise.
        tensorboard: also log to TensorBoard: None when the package is installed, True asked for (a
            warning says so when the package is missing), False never.
    """

    def __init__(
        self,
        output_dir: str | Path,
        total_steps: int,
        *,
        start_step: int = 0,
        progress_bar: bool = True,
        tensorboard: bool | None = None,
    ) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._started = time.perf_counter()
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step] if start_step else []
        # Atomic: a crash here must not lose the log of the steps before the resume point.
        write_json_lines(self.path, kept)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.total_steps = total_steps
        self._step_times: list[float] = []
        self._bar = None
        # Without a terminal, tqdm's carriage-return frames would fill a log file: print lines instead.
        self._lines = bool(progress_bar) and not is_terminal(sys.stderr)
        self._last_line_at = (-math.inf, start_step)
        if progress_bar and not self._lines:
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
        if tensorboard is not False:
            try:  # optional: torch's SummaryWriter needs the tensorboard package
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                self._tb = None
            if self._tb is None and tensorboard:
                # A line, not a Python warning: it is about the user's setting, not about our code.
                self.message(
                    "warning: logging.tensorboard is on but TensorBoard is not installed, so nothing is "
                    "logged to it — pip install tensorboard, or set logging.tensorboard=false"
                )

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
        elif self._lines and "loss" in record:
            self._progress_line(step, record)

    def _progress_line(self, step: int, record: dict[str, Any]) -> None:
        """One plain line at most every 10% of the run or 30 s, and at the last step."""
        if "step_s" in record:
            self._step_times.append(float(record["step_s"]))
        now = time.perf_counter()
        last_time, last_step = self._last_line_at
        tenth = max(1, self.total_steps // 10)
        if step < self.total_steps and step - last_step < tenth and now - last_time < 30:
            return
        self._last_line_at = (now, step)
        recent = self._step_times[-20:]
        per_step = sum(recent) / len(recent) if recent else float("inf")
        pct = 100 * step / self.total_steps if self.total_steps else 100.0
        print(
            f"train: step {step}/{self.total_steps} ({pct:.0f}%) loss {record['loss']:.4f} "
            f"lr {record.get('lr', 0):.2e} ex/s {record.get('examples_per_s', 0):.1f} "
            f"eta {_fmt_eta((self.total_steps - step) * per_step)}",
            file=sys.stderr,
            flush=True,
        )

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self, plot: bool = True, metrics: tuple[str, ...] = ("ndcg@10", "recall@10")) -> Path | None:
        """Close all sinks; write ``results.json`` (see ``summarize_run``) and, when ``plot`` and
        matplotlib is available, ``loss.png`` (loss and lr, and validation ``metrics``)."""
        if self._file.closed:
            return None
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        records = read_metrics(self.path)
        if records:
            summary = summarize_run(records, metrics)
            summary["seconds_this_process"] = round(time.perf_counter() - self._started, 3)
            write_json(self.dir / RESULTS_FILE, summary, default=str)
        return plot_losses(self.path, self.dir / "loss.png", metrics) if plot else None


def write_json_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` atomically with one JSON record per line."""
    from embedtune._atomic import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plot_losses(
    metrics_path: Path, out: Path, metrics: tuple[str, ...] = ("ndcg@10", "recall@10")
) -> Path | None:
    """Plot a run to a PNG; None without matplotlib or without a logged loss.

    Top panel: training loss (left axis) and learning rate (right axis), each in its own colour, one
    legend. Bottom panel (when validated): the validation ``metrics``, each in its own colour and
    marker, one legend. Written atomically.
    """
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
    lr = [(r["step"], r["lr"]) for r in records if isinstance(r.get("lr"), (int, float))]
    # Only the headline retrieval metrics (all in [0, 1]); timings and the many cut-offs would clutter it.
    wanted = [f"val/{m}" for m in metrics]
    val_keys = [k for k in wanted if any(k in r for r in records)]
    rows = 2 if val_keys else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 3.2 * rows), sharex=True, squeeze=False)
    ax = axes[0][0]
    handles = ax.plot(*zip(*train), color="tab:blue", label="train loss")
    ax.set_ylabel("loss")
    ax.set_title("embedtune training")
    if lr:
        ax_lr = ax.twinx()
        handles += ax_lr.plot(*zip(*lr), color="tab:orange", linestyle=":", label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend(handles=handles, loc="upper right")
    if val_keys:
        axv = axes[1][0]
        colours = ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:olive"]
        markers = ["o", "s", "^", "D", "v"]
        for i, k in enumerate(val_keys):
            pts = [(r["step"], r[k]) for r in records if k in r]
            axv.plot(*zip(*pts), color=colours[i % 5], marker=markers[i % 5], label=k.removeprefix("val/"))
        axv.set_ylabel("validation")
        axv.set_ylim(0, 1)
        axv.legend(loc="lower right")
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    from embedtune._atomic import atomic_file

    with atomic_file(out, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return out
