"""What a checkpoint was trained with: the recipe's settings and the training data's content.

Resuming continues the run that wrote a checkpoint, so the recipe and the data must be the ones it began
with; a changed learning rate or a regenerated training file would silently make the "resumed" run a
different one. A :class:`Fingerprint` records both, and :meth:`Fingerprint.changes` names every
difference, e.g. ``optimizer.lr: 1e-05 -> 2e-05`` or ``data file data/train.jsonl: content changed``.

Settings that may legitimately change on resume are left out (:data:`MAY_CHANGE_ON_RESUME`):

* how long to train: ``step_scheduler.max_steps``, ``num_epochs``, ``max_time_minutes`` (extending a run
  is what resuming is for; the LR schedule follows the new length from the resumed step on);
* how often to checkpoint and log: ``step_scheduler.ckpt_every_steps``, ``log_every_steps``,
  ``checkpoint.*``, ``logging.*``;
* where and on what it runs: ``output_dir``, ``device``, ``num_threads``, ``data.cache_dir``,
  ``distributed.backend``, ``distributed.timeout_minutes``, ``distributed.resume_on_other_world_size``
  (a changed *number of ranks* is checked separately, by the checkpointer);
* validation cost: ``validation.every_n_steps``, ``validation.batch_size``;
* ``pipeline.*`` (the ``embedtune finetune`` stages around training, which ``train`` ignores).

Everything else (model, data settings, loss, optimizer, LR schedule shape, batch sizes, seed, precision,
LoRA, GradCache, strategy) is compared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "Fingerprint",
    "corpus_folders",
    "data_paths",
    "file_digest",
    "flatten_config",
]

MAY_CHANGE_ON_RESUME: tuple[str, ...] = (
    "output_dir",
    "device",
    "num_threads",
    "checkpoint.",
    "logging.",
    "step_scheduler.max_steps",
    "step_scheduler.num_epochs",
    "step_scheduler.max_time_minutes",
    "step_scheduler.ckpt_every_steps",
    "step_scheduler.log_every_steps",
    "data.cache_dir",
    "distributed.backend",
    "distributed.timeout_minutes",
    "distributed.resume_on_other_world_size",
    "validation.every_n_steps",
    "validation.batch_size",
    "pipeline.",
)
"""Dotted config keys (a trailing ``.`` means the whole block) left out of the fingerprint."""

_CHUNK = 8 << 20  # hash files 8 MiB at a time: bounded memory for any file size


def _ignored(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in MAY_CHANGE_ON_RESUME)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 1e-5}, "data": {"datasets": [{"path": "a"}]}}`` ->
    ``{"optimizer.lr": 1e-5, "data.datasets[0].path": "a"}`` (JSON scalars; tuples become lists)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if not value:
                out[name] = {}
            out.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            for i, v in enumerate(value):
                if isinstance(v, Mapping):
                    out.update(flatten_config(v, f"{name}[{i}]."))
                else:
                    out[f"{name}[{i}]"] = v
        elif isinstance(value, (list, tuple)):
            out[name] = list(value)
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes, or of a folder's files (relative names and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def corpus_folders(json_file: Path) -> list[Path]:
    """The corpus folders a corpus-ID JSON file names (``"corpus": [{"path": ...}]``, relative to it).

    Reads only as far as the ``corpus`` value when it comes early (NeMo writes it first), so a large
    file is not parsed twice; otherwise the whole file. Anything unreadable gives ``[]`` (the data
    reader reports it properly).
    """
    import json
    import re

    try:
        with open(json_file, encoding="utf-8") as f:
            head = f.read(1 << 20)
        m = re.search(r'"corpus"\s*:\s*', head)
        value: Any = None
        if m is not None:
            try:
                value, _ = json.JSONDecoder().raw_decode(head, m.end())
            except ValueError:
                value = None
        if value is None:
            doc = json.loads(Path(json_file).read_text(encoding="utf-8"))
            value = doc.get("corpus") if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return []
    entries = value if isinstance(value, list) else [value]
    out = []
    for entry in entries:
        rel = entry.get("path") if isinstance(entry, dict) else entry
        if isinstance(rel, str) and rel:
            folder = Path(rel) if Path(rel).is_absolute() else Path(json_file).parent / rel
            if folder.is_dir():
                out.append(folder)
    return out


def data_paths(config: Mapping[str, Any], base: Path | None = None) -> list[Path]:
    """The training data files and folders a recipe names: every ``data.*path`` / ``data.*negatives``
    string that exists on disk (relative to ``base``, default the working directory), and the corpus
    folders that corpus-ID JSON files among them name (a changed corpus changes the training data)."""
    found: list[Path] = []
    for key, value in flatten_config(config).items():
        if not key.startswith("data.") or _ignored(key) or not isinstance(value, str) or not value:
            continue
        if not (key.endswith("path") or key.endswith("negatives")):
            continue
        p = Path(value) if base is None or Path(value).is_absolute() else base / value
        if p.exists():
            found.append(p)
            if p.is_file() and p.suffix == ".json":
                found.extend(c for c in corpus_folders(p) if c not in found)
    return found


@dataclass
class Fingerprint:
    """The recipe settings (flattened, minus :data:`MAY_CHANGE_ON_RESUME`) and data digests of a run."""

    config: dict[str, Any] = field(default_factory=dict)
    """Flattened recipe settings, e.g. ``{"optimizer.lr": 1e-05, ...}``."""
    data: dict[str, str] = field(default_factory=dict)
    """Data file or folder (as named in the recipe) -> ``sha256:...`` of its content."""

    @classmethod
    def of(cls, config: Mapping[str, Any], data_files: Iterable[str | Path] = ()) -> Fingerprint:
        """Fingerprint a recipe (as plain data, e.g. ``config_to_dict(cfg)``) and its data files.

        Args:
            config: the recipe as nested dicts/lists/scalars.
            data_files: training data files or folders to hash (see :func:`data_paths`).
        """
        flat = {k: v for k, v in flatten_config(config).items() if not _ignored(k)}
        return cls(config=flat, data={str(p): file_digest(Path(p)) for p in data_files})

    def to_json(self) -> dict[str, Any]:
        """Plain data for the checkpoint's marker file."""
        return {"config": self.config, "data": self.data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fingerprint:
        """Inverse of :meth:`to_json`."""
        return cls(config=dict(data.get("config", {})), data=dict(data.get("data", {})))

    def changes(self, saved: Fingerprint) -> list[str]:
        """Every difference from ``saved`` (the checkpoint's), one readable line each; empty if none."""
        out: list[str] = []
        for key in sorted(set(self.config) | set(saved.config)):
            if _ignored(key):  # a checkpoint written before a key became ignorable
                continue
            old, new = saved.config.get(key, "<unset>"), self.config.get(key, "<unset>")
            if old != new:
                out.append(f"{key}: {old!r} -> {new!r}")
        for name in sorted(set(self.data) | set(saved.data)):
            old, new = saved.data.get(name), self.data.get(name)
            if old is None:
                out.append(f"data file {name}: not used by the checkpointed run")
            elif new is None:
                out.append(f"data file {name}: used by the checkpointed run, not by this one")
            elif old != new:
                out.append(f"data file {name}: content changed ({old[:19]}... -> {new[:19]}...)")
        return out
