"""``embedtune.models.zoo``'s cache of built models: built once, even by processes that start together,
and a folder left incomplete is rebuilt rather than failing every later run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from embedtune.models import zoo


def _counting_builder(calls: list[int]):
    def build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.2)  # long enough for the other builders to arrive meanwhile
        (out / "weights.bin").write_text("w")
        (out / "config.json").write_text("{}")

    return build


def test_builders_that_start_together_build_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_MODEL_CACHE", str(tmp_path))
    calls: list[int] = []
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(zoo._build_once("m", _counting_builder(calls))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(paths) == 3 and len(set(paths)) == 1
    assert sorted(p.name for p in paths[0].iterdir()) == ["config.json", "weights.bin"]
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".m-")]  # no leftovers


def test_an_incomplete_folder_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_MODEL_CACHE", str(tmp_path))
    target = zoo.cache_dir() / "m"
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_text("{}")  # what a build cut short could leave: no config.json
    calls: list[int] = []
    path = zoo._build_once("m", _counting_builder(calls))
    assert path == target and len(calls) == 1
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.bin"]
    assert zoo._build_once("m", _counting_builder(calls)) == target and len(calls) == 1
