"""Progress off a terminal is plain lines (no carriage-return frames); on a terminal it is tqdm's bar."""

from __future__ import annotations

import io

import embedtune.progress as prog
from embedtune.models.encoding import encode_in_batches


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_lines_and_ends_complete(monkeypatch):
    fake = io.StringIO()  # a log file
    monkeypatch.setattr(prog.sys, "stderr", fake)
    assert list(prog.progress(range(5), total=5, desc="encode", every_s=0.0)) == [0, 1, 2, 3, 4]
    out = fake.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 5 and lines[-1].startswith("encode: 5/5 batch (100%)")


def test_on_a_terminal_progress_is_a_bar(monkeypatch):
    fake = _Tty()
    monkeypatch.setattr(prog.sys, "stderr", fake)
    assert list(prog.progress(range(3), total=3, desc="encode")) == [0, 1, 2]
    assert "\r" in fake.getvalue()  # tqdm redraws in place


def test_disabled_progress_prints_nothing(monkeypatch):
    fake = io.StringIO()
    monkeypatch.setattr(prog.sys, "stderr", fake)
    assert list(prog.progress(range(3), total=3, desc="x", enabled=False)) == [0, 1, 2]
    assert fake.getvalue() == ""


def test_encoding_reports_progress_in_a_log_file(monkeypatch):
    fake = io.StringIO()
    monkeypatch.setattr(prog.sys, "stderr", fake)
    texts = [f"text {i}" for i in range(10)]
    out = encode_in_batches(
        texts,
        lambda batch, prefix: [[float(len(t))] for t in batch],
        batch_size=4,
        show_progress=True,
        desc="encode documents",
    )
    assert out.shape == (10, 1)
    assert "encode documents: 3/3 batch (100%)" in fake.getvalue()


def test_encoding_labels_say_queries_and_documents():
    from embedtune.models.encoding import encode_label

    assert [encode_label(k) for k in ("query", "document")] == ["encode queries", "encode documents"]
