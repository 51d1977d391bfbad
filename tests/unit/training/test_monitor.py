"""TrainingMonitor: torn logs on resume, results file, TensorBoard notice, line progress, the plot."""

from __future__ import annotations

import io
import json
import sys

import pytest

from embedtune.errors import DataError
from embedtune.training import monitor as mon
from embedtune.training.monitor import RESULTS_FILE, MetricsLogWarning, TrainingMonitor, read_metrics


def _run(tmp_path, steps=10, start=0, **kw):
    m = TrainingMonitor(
        tmp_path, steps, start_step=start, progress_bar=kw.pop("progress_bar", False), tensorboard=False, **kw
    )
    for s in range(start + 1, steps + 1):
        m.log({"step": s, "epoch": 0, "loss": 2.0 / s, "lr": 1e-4 * min(1, s / 3), "step_s": 0.01})
        if s % 5 == 0:
            m.log({"step": s, "val/ndcg@10": 0.1 * s if s < 10 else 0.4, "val/recall@10": 0.05 * s})
    return m


def test_a_torn_last_line_is_dropped_with_a_warning_and_resume_continues(tmp_path):
    _run(tmp_path, steps=6).close(plot=False)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 7, "loss": 0.2')  # SIGKILL in the middle of a write
    with pytest.warns(MetricsLogWarning, match=r"metrics.jsonl:\d+: dropped a torn last line"):
        records = read_metrics(path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    with pytest.warns(MetricsLogWarning):
        m = TrainingMonitor(tmp_path, 8, start_step=6, progress_bar=False, tensorboard=False)
    m.log({"step": 7, "loss": 0.3})
    m.close(plot=False)
    assert [r["step"] for r in read_metrics(path) if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]


def test_a_broken_line_in_the_middle_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(path)


def test_a_finished_run_writes_what_it_did(tmp_path):
    _run(tmp_path, steps=10).close(plot=False, metrics=("ndcg@10", "recall@10"))
    res = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert res["steps"] == 10 and res["final"]["loss"] == pytest.approx(0.2) and res["first_loss"] == 2.0
    assert res["final_validation"]["val/ndcg@10"] == pytest.approx(0.4)
    assert res["best_validation"]["metric"] == "val/ndcg@10"
    assert res["best_validation"]["value"] == pytest.approx(0.5) and res["best_validation"]["step"] == 5
    assert res["seconds_this_process"] >= 0


def test_tensorboard_asked_for_but_missing_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    m = TrainingMonitor(tmp_path, 3, progress_bar=False, tensorboard=True)
    m.close(plot=False)
    err = capsys.readouterr().err
    assert "TensorBoard is not installed" in err and "pip install tensorboard" in err


def test_tensorboard_by_default_is_silent_when_missing(tmp_path, monkeypatch, capsys):
    """The default (null) logs to TensorBoard only when it is installed: no notice on a clean run."""
    from embedtune.training.config import LoggingConfig

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    m = TrainingMonitor(tmp_path, 3, progress_bar=False, tensorboard=LoggingConfig().tensorboard)
    m.close(plot=False)
    assert "TensorBoard" not in capsys.readouterr().err


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    fake = io.StringIO()  # not a tty, like a log file
    monkeypatch.setattr(mon.sys, "stderr", fake)
    _run(tmp_path, steps=100, progress_bar=True).close(plot=False)
    text = fake.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = [line for line in text.splitlines() if line.startswith("train: step")]
    assert 5 <= len(lines) <= 12 and lines[-1].startswith("train: step 100/100 (100%)")


def test_the_plot_has_a_loss_panel_with_lr_and_a_validation_panel(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    seen = {}
    real_close = plt.close

    def keep(fig):
        seen["fig"] = fig
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    out = _run(tmp_path, steps=10).close(plot=True, metrics=("ndcg@10", "recall@10"))
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = seen["fig"].axes
    loss_ax, lr_ax, val_ax = axes[0], axes[2], axes[1]
    labels = [line.get_label() for ax in axes for line in ax.get_lines()]
    assert labels.count("train loss") == 1 and "learning rate" in labels
    colours = [line.get_color() for ax in axes for line in ax.get_lines()]
    assert len(set(colours)) == len(colours)  # every curve its own colour
    assert {line.get_label() for line in val_ax.get_lines()} == {"ndcg@10", "recall@10"}
    assert loss_ax.get_legend() is not None and val_ax.get_legend() is not None
    assert lr_ax.get_legend() is None  # one legend per panel
