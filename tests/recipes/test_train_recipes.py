"""Every shipped recipe validates, and trains 2 steps with its backbone swapped for a tiny random model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from embedtune.cli import main
from embedtune.recipes import list_recipes
from embedtune.training.config import load_train_config
from embedtune.training.monitor import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = {  # recipe -> tiny random model of the same architecture
    "llama3_2_1b": "tiny-llama",
    "llama_embed_nemotron_8b": "tiny-llama",
    "ministral3_3b_instruct": "tiny-ministral3",
    "smollm2_135m_demo": "tiny-llama",
    "minilm_demo": "tiny-bert",
}


def test_every_shipped_recipe_is_covered():
    assert set(list_recipes()) == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_shipped_recipe_validates(name, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # recipes name the bundled data relative to the repository root
    assert main(["validate", name]) == 0
    assert f"OK: {name} is a valid recipe" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(TINY))
def test_shipped_recipe_trains_two_steps_on_a_tiny_model(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    overrides = [
        f"model.name_or_path={TINY[name]}",
        f"output_dir={out}",
        "data.q_max_len=24",
        "data.p_max_len=48",
        "step_scheduler.global_batch_size=4",
        "step_scheduler.local_batch_size=null",
        "step_scheduler.max_steps=2",
        "step_scheduler.ckpt_every_steps=1",
        "logging.progress_bar=false",
        "num_threads=1",
    ]
    if load_train_config(name).validation is not None:
        # Keep the recipe's validation wiring but on a small sample of the held-out split.
        overrides += ["validation.max_queries=8", "validation.max_corpus=40", "validation.batch_size=16"]
    assert main(["train", name, *overrides]) == 0

    records = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert (out / "model" / "config.json").is_file()
    assert (out / "loss.png").stat().st_size > 0
    if load_train_config(name).peft is not None:
        assert (out / "adapter" / "adapter_config.json").is_file()
    if name.endswith("_demo"):
        vals = [r for r in records if "val/ndcg@10" in r]
        assert [r["step"] for r in vals] == [0, 2]  # before and after


def test_saved_model_loads_and_differs_from_the_base(tmp_path, monkeypatch):
    from embedtune.models import AutoBiEncoder

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "minilm_demo",
                "model.name_or_path=tiny-bert",
                f"output_dir={out}",
                "validation=null",
                "data.p_max_len=32",
                "step_scheduler.global_batch_size=4",
                "step_scheduler.max_steps=2",
                "optimizer.lr=1e-3",
                "logging.progress_bar=false",
                "num_threads=1",
            ]
        )
        == 0
    )
    texts = ["a claim about proteins", "another text"]
    base = AutoBiEncoder.from_pretrained("tiny-bert").encode(texts, convert_to_numpy=False)
    tuned = AutoBiEncoder.from_pretrained(out / "model").encode(texts, convert_to_numpy=False)
    assert not torch.allclose(base, tuned)
    # The final model loads unchanged in sentence-transformers and gives the same embeddings.
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out / "model"), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(st, tuned, rtol=1e-4, atol=1e-5)
