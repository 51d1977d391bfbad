"""Stage markers: a stage that is done is not redone, as long as its inputs are unchanged.

Each stage of a finetune run writes ``<output>/stages/<name>.json`` when it finishes, holding the hash
of its inputs (settings, upstream stages' keys, file contents). On a rerun a stage whose marker holds the
same key is skipped; any other marker (a changed input) makes the stage run again, and with it every
stage downstream, whose keys include this one's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from embedtune._atomic import write_json

__all__ = ["Stage", "hash_inputs", "hash_path"]


def hash_inputs(*parts: Any) -> str:
    """SHA-256 (first 16 hex digits) of the JSON of ``parts`` (keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_path(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, or of every file under a folder (relative names included)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


class Stage:
    """One stage of a run and its marker file.

    Args:
        folder: the run's folder (markers go in ``folder/stages``).
        name: the stage's name.
        key: hash of everything the stage's result depends on.
    """

    def __init__(self, folder: str | os.PathLike[str], name: str, key: str) -> None:
        self.name = name
        self.key = key
        self.path = Path(folder) / "stages" / f"{name}.json"
        self.started = time.perf_counter()

    def marker(self) -> dict[str, Any] | None:
        """The marker's content, or None when there is none (or it cannot be read)."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def done(self) -> bool:
        """True when the stage finished with these same inputs."""
        marker = self.marker()
        return marker is not None and marker.get("key") == self.key

    def summary(self) -> dict[str, Any]:
        """What the finished stage recorded (empty when not done)."""
        marker = self.marker()
        return dict(marker.get("summary") or {}) if marker and marker.get("key") == self.key else {}

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Write the marker (atomically): the stage is done for these inputs (``seconds``: since created)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        marker = {"stage": self.name, "key": self.key, "finished": time.time(), "summary": summary or {}}
        write_json(self.path, {**marker, "seconds": round(time.perf_counter() - self.started, 3)})
