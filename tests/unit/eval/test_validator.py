"""ValidationConfig validation and the Validator's best-step / early-stopping bookkeeping."""

from __future__ import annotations

import pytest
import torch

from embedtune.errors import ConfigError
from embedtune.eval.config import ValidationConfig
from embedtune.eval.datasets import eval_set_from_dicts
from embedtune.eval.retrieval import evaluate_retrieval
from embedtune.eval.validator import Validator, is_better


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"data": ""}, "data"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"metric": "ndcg"}, "metric"),
        ({"metric": "bleu@10"}, "metric"),
        ({"metric": "ndcg@5"}, "metric: k=5"),
        ({"k_values": ()}, "k_values"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_corpus": 0}, "max_corpus"),
        ({"max_length": 0}, "max_length"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
        ({"min_delta": -1.0}, "min_delta"),
        ({"backend": "annoy"}, "backend"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        ValidationConfig(**{"data": "x", **kwargs})


def test_config_loads_through_the_recipe_loader():
    config = pytest.importorskip("embedtune.config")
    if not hasattr(config, "load_config"):
        pytest.skip("recipe loader not available")
    with pytest.raises(ConfigError, match="metric"):
        config.load_config(ValidationConfig, {"data": "x", "metric": "ndcg@7"})
    cfg = config.load_config(ValidationConfig, {"data": "x", "k_values": [5, 10], "metric": "recall@5"})
    assert cfg.k_values == (5, 10)


def test_is_better():
    assert is_better(0.1, None)
    assert is_better(0.5, 0.4)
    assert not is_better(0.4, 0.4)
    assert not is_better(0.41, 0.4, min_delta=0.02)


def test_validator_tracks_best_step_and_stops_after_patience(fake_encoder, tmp_path, make_eval_dicts):
    es = eval_set_from_dicts(*make_eval_dicts(), cache_dir=tmp_path)
    cfg = ValidationConfig(data="unused", every_n_steps=10, k_values=(1, 10), early_stopping_patience=2)
    v = Validator(cfg, eval_set=es)
    assert (
        not v.should_run(0) and not v.should_run(5) and v.should_run(10) and v.should_run(7, last_step=True)
    )

    m = v.run(fake_encoder, 10)
    assert m["ndcg@10"] == pytest.approx(evaluate_retrieval(fake_encoder, es, (1, 10))["ndcg@10"])
    assert v.improved and v.best_step == 10 and not v.should_stop
    # A damaged model scores worse: no improvement, twice -> stop.
    with torch.no_grad():
        fake_encoder.weight.zero_()
    v.run(fake_encoder, 20)
    assert not v.improved and v.best_step == 10 and not v.should_stop
    v.run(fake_encoder, 30)
    assert v.should_stop and [s for s, _ in v.history] == [10, 20, 30]

    resumed = Validator(cfg, eval_set=es)
    resumed.load_state_dict(v.state_dict())
    assert resumed.best_step == 10 and resumed.should_stop and resumed.history == v.history


def test_validator_loads_and_samples_the_data_once(beir_folder, fake_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    root, *_ = beir_folder
    cfg = ValidationConfig(data=str(root), max_queries=5, max_corpus=20, k_values=(10,), metric="ndcg@10")
    v = Validator(cfg)
    first = v.eval_set
    assert len(first.queries) == 5 and len(first.corpus) == 20
    v.run(fake_encoder, 1)
    assert v.eval_set is first


def test_validation_encodes_at_its_own_max_length(monkeypatch):
    """``validation.max_length`` reaches the encoder (the demo shortens evaluation, not the saved model)."""
    import types

    import embedtune.eval.validator as validator_module

    seen = {}

    def fake_run_evaluation(encoder, eval_set, k_values, **kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace(metrics={"ndcg@10": 0.5})

    monkeypatch.setattr(validator_module, "run_evaluation", fake_run_evaluation)
    es = eval_set_from_dicts({"d": "text"}, {"q": "query"}, {"q": {"d": 1}})
    Validator(ValidationConfig(data="x", max_length=64), es).run(object(), 0)
    assert seen["max_length"] == 64
