"""Audit output: the terminal summary, the JSON report, the per-query file and the cleaned copy (``--fix``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from embedtune.audit.core import REASONS, AuditReport
from embedtune.errors import ConfigError


def _atomic(path: Path, write: Callable[[Any], None]) -> Path:
    """Write through a temporary file beside ``path`` and rename it into place (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(report: AuditReport) -> str:
    """A plain-text table of the findings, with a warning line for each problem found."""
    s = report.summary
    tr, neg = s["training"], s["negatives"]
    lines = [
        f"training: {tr['source']} ({tr['format']}): {tr['examples']} examples, {tr['negatives']} negatives"
    ]
    rows: list[tuple[str, str, str]] = []
    ov = s.get("overlap")
    if ov:
        ev, q, d = ov["eval"], ov["queries"], ov["documents"]
        lines.append(
            f"evaluation: {ev['source']}: {ev['queries']} queries, {ev['documents']} documents, "
            f"{ev['relevant_documents']} relevant"
        )
        rows += [
            ("eval queries = a training query", str(q["exact"]), _pct(q["exact"] / max(1, ev["queries"]))),
            ("eval queries near-duplicating one", str(q["near"]), _pct(q["near"] / max(1, ev["queries"]))),
            ("eval corpus documents seen in training", str(d["eval_corpus_in_training_exact"]), ""),
            (
                "eval-relevant docs that are train positives",
                f"{d['eval_relevant_train_positive_exact']} + {d['eval_relevant_train_positive_near']} near",
                _pct(d["eval_relevant_train_positive_share"]),
            ),
            (
                "eval-relevant docs seen in training at all",
                f"{d['eval_relevant_in_training_exact']} + {d['eval_relevant_in_training_near']} near",
                _pct(
                    (d["eval_relevant_in_training_exact"] + d["eval_relevant_in_training_near"])
                    / max(1, ev["relevant_documents"])
                ),
            ),
            (
                "training examples that leak",
                str(_leaking(report)),
                _pct(_leaking(report) / max(1, tr["examples"])),
            ),
        ]
    total = max(1, tr["negatives"])
    for reason in REASONS:
        count = neg["by_reason"][reason]
        checked = reason != "scores_above_positive_share" or neg["checked"]["model_scores"]
        if reason == "near_duplicate_of_positive" and not neg["checked"]["near_duplicates"]:
            checked = False
        rows.append(
            (
                f"negatives: {reason}",
                str(count) if checked else "not checked",
                _pct(count / total) if checked else "",
            )
        )
    rows.append(("negatives flagged (any reason)", str(neg["flagged"]), _pct(neg["flagged_share"])))
    sc = s.get("scores")
    if sc and sc["gap"]:
        g = sc["gap"]
        rows.append(
            (
                "pos - hardest neg score gap, median [p5, p95]",
                f"{g['p50']:.3f} [{g['p5']:.3f}, {g['p95']:.3f}]",
                "",
            )
        )
        rows.append(("examples whose negatives are too easy", "", _pct(sc["too_easy_share"])))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len("count"), *(len(r[1]) for r in rows))
    lines.append(f"{'check'.ljust(w0)}  {'count'.rjust(w1)}  share")
    lines += [f"{a.ljust(w0)}  {b.rjust(w1)}  {c}" for a, b, c in rows]
    lines += [f"warning: {w}" for w in warnings(report)]
    return "\n".join(lines)


def _leaking(report: AuditReport) -> int:
    return sum(1 for q in report.queries if q.leaks)


def warnings(report: AuditReport) -> list[str]:
    """One sentence per problem worth acting on."""
    out = []
    s = report.summary
    ov = s.get("overlap")
    if ov:
        d, q = ov["documents"], ov["queries"]
        shared = d["eval_relevant_train_positive_exact"] + d["eval_relevant_train_positive_near"]
        if shared:
            out.append(
                f"{shared} evaluation-relevant documents are training positives "
                f"({_pct(d['eval_relevant_train_positive_share'])}): gains on this evaluation partly measure memorisation; "
                "report it, or train on the --fix copy"
            )
        if q["exact"] or q["near"]:
            out.append(f"{q['exact'] + q['near']} evaluation queries (near-)duplicate training queries")
    neg = s["negatives"]
    if neg["flagged"]:
        out.append(
            f"{neg['flagged']} negatives ({_pct(neg['flagged_share'])}) may be unlabelled positives "
            "(false negatives); see the per-query file, or drop them with --fix"
        )
    sc = s.get("scores")
    if sc and sc["too_easy_share"] is not None and sc["too_easy_share"] > 0.5:
        out.append(
            f"the negatives of {_pct(sc['too_easy_share'])} of the examples are too easy ({sc['too_easy_rule']}): "
            "mine harder ones (embedtune mine)"
        )
    return out


def write_report(report: AuditReport, path: str | Path) -> Path:
    """The JSON report: settings and summary (counts, shares, capped lists of examples)."""
    from dataclasses import asdict

    doc = {"settings": asdict(report.settings), **report.summary, "warnings": warnings(report)}
    return _atomic(Path(path), lambda f: f.write(json.dumps(doc, indent=2, default=str) + "\n"))


def write_per_query(report: AuditReport, path: str | Path) -> Path:
    """One JSON line per training example: its flags, evaluation overlap and scores."""

    def write(f: Any) -> None:
        for q in report.queries:
            f.write(json.dumps(q.to_dict(), ensure_ascii=False, default=str) + "\n")

    return _atomic(Path(path), write)


def write_fixed(
    data: Any,
    report: AuditReport,
    output: str | Path,
    *,
    input_path: str | Path,
    reasons: Sequence[str] = REASONS,
    drop_leaking: bool = True,
) -> tuple[Path, dict[str, int]]:
    """Write a cleaned copy of the training data; the input is never modified.

    Flagged negatives (for any of ``reasons``) are removed from their example; with ``drop_leaking``,
    examples whose query or positives are in the evaluation set are left out. ``.jsonl`` output is
    inline (texts); ``.json`` output is corpus-ID JSON that points at the input's corpus folders (a
    corpus-ID input only).

    Returns:
        ``(path, counts)`` with the examples kept / dropped and the negatives removed.

    Raises:
        ConfigError: the output is the input, or ``.json`` output for a non-corpus-ID input.
    """
    out = Path(output)
    src = Path(input_path)
    if out.resolve() == src.resolve() or (src.is_dir() and out.resolve().is_relative_to(src.resolve())):
        raise ConfigError(f"--fix {out}: must not be the input {src} (the audit never edits its input)")
    for r in reasons:
        if r not in REASONS:
            raise ConfigError(f"--fix-reasons: {r!r} is not one of {', '.join(REASONS)}")
    fmt = "inline" if out.suffix == ".jsonl" else "corpus_id"
    if fmt == "corpus_id" and (out.suffix != ".json" or data.format != "corpus_id"):
        raise ConfigError(
            f"--fix {out}: write a .jsonl file (inline texts); .json output is for corpus-ID input only"
        )
    flagged = report.flagged_rows(reasons)
    leaking = {q.index for q in report.queries if q.leaks} if drop_leaking else set()
    corpus = data.corpus
    counts = {"examples_kept": 0, "examples_dropped_leaking": len(leaking), "negatives_removed": 0}

    def kept() -> Any:
        for i in range(len(data)):
            if i in leaking:
                continue
            bad = flagged.get(i, set())
            negs = [int(r) for r in data.negatives(i).tolist() if int(r) not in bad]
            counts["negatives_removed"] += len(data.negatives(i)) - len(negs)
            counts["examples_kept"] += 1
            yield i, [int(r) for r in data.positives(i).tolist()], negs

    if fmt == "inline":

        def write_inline(f: Any) -> None:
            for i, pos, negs in kept():
                rec = {
                    "question_id": data.query_ids[i],
                    "query": data.queries[i],
                    "pos_doc": corpus.texts(pos),
                    "neg_doc": corpus.texts(negs),
                }
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

        return _atomic(out, write_inline), counts

    from embedtune.mining import _corpus_entries_for

    entries = _corpus_entries_for(data, src, out)
    raw = json.loads(src.read_text(encoding="utf-8"))["data"]
    corpus_ids = [r.get("corpus_id") if isinstance(r, dict) else None for r in raw]
    if len(corpus_ids) != len(data):
        corpus_ids = [None] * len(data)
    ids = corpus.ids

    def write_json(f: Any) -> None:
        f.write('{"corpus": ' + json.dumps(entries) + ',\n"data": [\n')
        first = True
        for i, pos, negs in kept():
            rec: dict[str, Any] = {"question_id": data.query_ids[i], "question": data.queries[i]}
            if corpus_ids[i] is not None:
                rec["corpus_id"] = corpus_ids[i]
            rec["pos_doc"] = [{"id": ids[r]} for r in pos]
            rec["neg_doc"] = [{"id": ids[r]} for r in negs]
            f.write(("" if first else ",\n") + json.dumps(rec, ensure_ascii=False))
            first = False
        f.write("\n]}\n")

    return _atomic(out, write_json), counts
