"""Shared test set-up: offline, deterministic, small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_scifact() -> Path:
    """The BEIR SciFact copy in ../shared/data; tests using it skip cleanly without it."""
    path = SHARED_DATA / "scifact"
    if not (path / "corpus.jsonl").is_file():
        pytest.skip("../shared/data/scifact is not available")
    return path
