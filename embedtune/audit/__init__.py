"""Data audits: train/eval leakage and false negatives in the hard negatives of a training set.

```python
from embedtune.audit import AuditSettings, audit_training_data
from embedtune.data.formats import read_training_file
from embedtune.eval.datasets import load_eval_set

report = audit_training_data(read_training_file("train.json"), load_eval_set("beir/scifact"))
report.summary["overlap"]["documents"]["eval_relevant_train_positive_share"]
```
``embedtune audit`` is the command line (summary table, JSON report, per-query file, ``--fix``).
"""

from embedtune.audit.core import REASONS, AuditReport, AuditSettings, audit_training_data
from embedtune.audit.report import format_summary, write_fixed, write_per_query, write_report

__all__ = [
    "REASONS",
    "AuditReport",
    "AuditSettings",
    "audit_training_data",
    "format_summary",
    "write_fixed",
    "write_per_query",
    "write_report",
]
