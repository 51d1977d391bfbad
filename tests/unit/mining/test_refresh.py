"""Re-mining during training: the refresher mines what mine_hard_negatives mines, saves it, restores it."""

from __future__ import annotations

import json
import random
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from embedtune.data.formats import read_training_file
from embedtune.errors import DataError
from embedtune.mining import MiningSettings, NegativeRefresher, merge_negatives, mine_hard_negatives


class BagOfWords(nn.Module):
    """Hashed word counts times a learnable weight per bucket: changing the weights changes the ranking."""

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim, generator=torch.Generator().manual_seed(seed)) + 0.5)
        self.dim = dim

    def _embed(self, texts, **_kw):
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1
        with torch.no_grad():
            return torch.nn.functional.normalize(out * self.weight, dim=-1).numpy()

    encode_queries = _embed
    encode_documents = _embed


@pytest.fixture()
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    docs = [" ".join(rng.choices(vocab, k=10)) for _ in range(60)]
    lines = []
    for i in range(20):
        q = " ".join(docs[i].split()[:4])
        lines.append(
            {
                "question_id": f"q{i}",
                "query": q,
                "pos_doc": [docs[i]],
                "neg_doc": [docs[20 + i], docs[40 + i]],
            }
        )
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return read_training_file(path)


def test_merge_tops_up_from_the_previous_negatives_without_positives_or_repeats():
    assert merge_negatives([5, 6], [6, 7, 1, 8], positives=[1], needed=4) == [5, 6, 7, 8]
    assert merge_negatives([5, 6, 9], [7], positives=[1], needed=2) == [5, 6, 9]


def test_refresh_mines_with_the_current_model_saves_and_restores_exactly(data, tmp_path):
    settings = MiningSettings(num_negatives=2, range_start=0, range_end=20, margin=0.95)
    model = BagOfWords()
    ref = NegativeRefresher(settings, every=3, output_dir=tmp_path / "run", needed=2)
    assert [s for s in range(10) if ref.due(s)] == [3, 6, 9]

    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    (new,) = ref.refresh(model, [data], step=3)
    assert torch.equal(torch.rand(3), expected_next), "re-mining shifted the training RNG stream"
    assert not ref.due(3) and ref.due(6)

    direct = mine_hard_negatives(model, data, settings)
    for i in range(len(data)):
        want = merge_negatives(
            direct.examples[i].negatives, data.negatives(i).tolist(), data.positives(i).tolist(), 2
        )
        assert new.negatives(i).tolist() == want
        assert not set(new.negatives(i).tolist()) & set(data.positives(i).tolist())
    assert any(new.negatives(i).tolist() != data.negatives(i).tolist() for i in range(len(data)))

    # A changed model mines other negatives (the refresh follows the weights being trained).
    with torch.no_grad():
        model.weight.mul_(torch.linspace(0.1, 3.0, model.dim))
    (other,) = ref.refresh(model, [data], step=6)
    assert any(other.negatives(i).tolist() != new.negatives(i).tolist() for i in range(len(data)))

    # Resume: a fresh refresher restores exactly the negatives named by the saved state.
    state = json.loads(json.dumps(ref.state_dict()))
    assert state == {"mined_step": 6, "file": "mined/step_00000006.npz"}
    again = NegativeRefresher(settings, every=3, output_dir=tmp_path / "run", needed=2)
    (restored,) = again.load_state_dict(state, [data])
    assert np.array_equal(restored.neg_rows, other.neg_rows)
    assert np.array_equal(restored.neg_offsets, other.neg_offsets)
    assert again.mined_step == 6 and not again.due(6)
    assert again.load_state_dict({"mined_step": None}, [data]) is None

    (tmp_path / "run" / state["file"]).unlink()
    with pytest.raises(DataError, match="missing"):
        again.load_state_dict(state, [data])
