"""`embedtune ls / cp / validate / train` argument handling and fail-fast errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from embedtune.cli import main
from embedtune.recipes import list_recipes

REPO = Path(__file__).resolve().parents[2]


def test_ls_lists_every_shipped_recipe(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in list_recipes():
        assert name in out
    assert "llama3_2_1b" in out and "smollm2_135m_demo" in out


def test_cp_copies_and_refuses_to_overwrite(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "minilm_demo", str(dest)]) == 0
    assert dest.read_text() == (REPO / "embedtune" / "recipes" / "minilm_demo.yaml").read_text()
    assert main(["cp", "minilm_demo", str(dest)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["cp", "nope", str(tmp_path / "x.yaml")]) == 2
    assert "no such shipped recipe; choose one of:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lr=abc"], "optimizer.lr: expected float, got 'abc'"),
        (["optimizer.lrr=1"], "optimizer.lrr: unknown key; allowed keys: betas, eps, lr"),
        (["loss.name=triplet"], "loss.name: unknown loss 'triplet'; choose one of: infonce"),
        (
            ["lr_scheduler.name=step"],
            "lr_scheduler.name: unknown lr scheduler 'step'; choose one of: constant, cosine, linear",
        ),
        (["model.pooling=max"], "model.pooling: unknown pooling method 'max'"),
        (
            ["step_scheduler.local_batch_size=5"],
            "step_scheduler.local_batch_size: must divide global_batch_size",
        ),
        (["data.datasets[0].path=missing.jsonl"], "data.datasets[0].path: missing.jsonl does not exist"),
        (["validation.metric=ndcg@7"], "validation.metric: k=7 of 'ndcg@7' is not in k_values"),
        (["gradcache.enabled=true", "step_scheduler.local_batch_size=8"], "with gradcache.enabled the whole"),
    ],
)
def test_validate_names_the_key_path(overrides, message, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["validate", "smollm2_135m_demo", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_validate_checks_lora_targets_against_the_architecture(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    # MiniLM's config is in its package, so this needs no model build or download.
    assert main(["validate", "minilm_demo", "peft={target_modules: [q_proj]}"]) == 2
    err = capsys.readouterr().err
    assert "peft.target_modules: ['q_proj'] match no linear layer of minilm" in err
    assert "dense, key, query, value" in err
    assert main(["validate", "minilm_demo", "peft={target_modules: [query, value]}"]) == 0


def test_train_fails_fast_before_loading_anything(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {name_or_path: smollm2-135m}\ndata: {datasets: [{path: x.jsonl}]}\nloss: {temperature: -1}\n"
    )
    t0 = time.perf_counter()
    assert main(["train", str(bad)]) == 2
    assert time.perf_counter() - t0 < 10  # no model was loaded
    assert f"{bad}: loss.temperature: must be > 0" in capsys.readouterr().err


def test_demo_prints_before_and_after(tmp_path, monkeypatch, capsys):
    """`embedtune demo` wiring on a tiny model: bundled data resolved, before/after table, saved model."""
    monkeypatch.chdir(tmp_path)  # not the repository: the bundled data paths must still resolve
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "model.name_or_path=tiny-llama",
            f"output_dir={out}",
            "step_scheduler.max_steps=2",
            "step_scheduler.global_batch_size=4",
            "data.p_max_len=32",
            "validation.max_queries=6",
            "validation.max_corpus=30",
            "logging.progress_bar=false",
            "num_threads=1",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "NDCG@10" in text and "Recall@10" in text
    assert [line.split()[0] for line in text.splitlines() if line.split()[:1] in (["before"], ["after"])] == [
        "before",
        "after",
    ]
    assert f"saved: {out / 'model'}" in text
    assert (out / "model" / "config.json").is_file()
