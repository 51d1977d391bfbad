"""The recipe's guards and model plumbing on a tiny random Llama: NaN stop, LoRA merge, GradCache == plain."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from _train_helpers import tiny_recipe

from embedtune.config import load_config
from embedtune.training.config import TrainConfig
from embedtune.training.recipe import NonFiniteError, Recipe

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _recipe(tmp_path, **sections) -> Recipe:
    cfg = load_config(TrainConfig, tiny_recipe(tmp_path, **sections))
    r = Recipe(cfg)
    r.setup()
    return r


def _params(r):
    return {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}


def test_nan_loss_stops_before_the_optimizer_step_naming_the_step(tmp_path):
    r = _recipe(tmp_path, peft=LORA)
    try:
        r.train_step(r.local_batches(0, 0))
        before = _params(r)
        opt_state = {k: v["exp_avg"].clone() for k, v in r.optimizer.state_dict()["state"].items()}
        r.state.step = 1
        real = r.task.loss_fn
        r.task.loss_fn = lambda *a, **k: real(*a, **k) * float("nan")
        with pytest.raises(NonFiniteError, match=r"step 2: the loss is nan"):
            r.train_step(r.local_batches(0, 1))
        after = _params(r)
        assert all(torch.equal(before[n], after[n]) for n in before)
        state = r.optimizer.state_dict()["state"]
        assert all(torch.equal(opt_state[k], state[k]["exp_avg"]) for k in opt_state)
    finally:
        r.cleanup()


def test_non_finite_gradient_stops_naming_the_parameter(tmp_path):
    r = _recipe(tmp_path, peft=LORA)
    try:
        before = _params(r)
        name, param = next((n, p) for n, p in r.model.named_parameters() if p.requires_grad and "v_proj" in n)
        param.register_hook(lambda g: g * float("inf"))
        with pytest.raises(NonFiniteError, match="step 1: the gradient of " + re.escape(name)):
            r.train_step(r.local_batches(0, 0))
        assert all(torch.equal(before[n], p) for n, p in _params(r).items())
    finally:
        r.cleanup()


def test_merged_lora_model_equals_the_adapter_model(tmp_path):
    from embedtune.models import AutoBiEncoder

    r = _recipe(tmp_path, peft=LORA, optimizer={"lr": 5e-2}, step_scheduler={"max_steps": 3})
    try:
        result = r.train()
    finally:
        r.cleanup()
    texts = ["what is alpha beta?", "gamma delta: document 3.", "a longer text " * 5]
    live = r.model.eval()
    with torch.no_grad():
        want = live.encode(texts, convert_to_numpy=False)
    merged = AutoBiEncoder.from_pretrained(result.model_dir).encode(texts, convert_to_numpy=False)
    adapter = AutoBiEncoder.from_pretrained(result.adapter_dir).encode(texts, convert_to_numpy=False)
    base = AutoBiEncoder.from_pretrained("tiny-llama", pooling="mean").encode(texts, convert_to_numpy=False)
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter learned something
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool_instruction", [False, True])
def test_gradcache_step_equals_plain_step_on_a_real_model(tmp_path, pool_instruction):
    """GradCache vs one big forward on tiny Llama, with instruction tokens left out of pooling."""
    sections = {
        "model": {
            "name_or_path": "tiny-llama",
            "query_prefix": "Instruct: find the passage\nQuery: ",
            "pool_instruction": pool_instruction,
        },
        "loss": {"in_batch_negatives": True, "mask_false_negatives": True},
        "max_grad_norm": None,
    }
    # One micro-batch, as GradCache's whole batch is.
    plain = _recipe(tmp_path / "a", **sections, step_scheduler={"local_batch_size": None})
    cached = _recipe(
        tmp_path / "b",
        **sections,
        gradcache={"enabled": True, "chunk_size": 3},
        step_scheduler={"local_batch_size": None},
    )
    try:
        batch = plain.data.batch(0, 0, 8)
        assert (batch["query"]["pooling_mask"] != batch["query"]["attention_mask"]).any() != pool_instruction
        plain.model.double()
        cached.model.double()
        cached.model.load_state_dict(plain.model.state_dict())
        grads = []
        for r in (plain, cached):
            r.optimizer.step = lambda: None  # keep the gradients to compare
            loss, _ = r.train_step([batch])
            grads.append(
                (loss, {n: p.grad.clone() for n, p in r.model.named_parameters() if p.grad is not None})
            )
        (l1, g1), (l2, g2) = grads
        assert l1 == pytest.approx(l2, rel=1e-6)
        assert g1.keys() == g2.keys() and g1
        for n in g1:
            torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-9)
    finally:
        plain.cleanup()
        cached.cleanup()


def test_time_budget_stops_early_and_still_saves(tmp_path):
    r = _recipe(tmp_path, step_scheduler={"max_time_minutes": 1e-4})
    try:
        result = r.train()
    finally:
        r.cleanup()
    assert result.exit_code == 0 and result.stop_reason == "time_budget"
    assert result.state.step == 1  # one step always runs; the next would overshoot the budget
    assert (result.model_dir / "config.json").is_file()
    assert r.checkpoints.latest().name == "step_00000001"


def test_validation_keeps_the_best_checkpoint_and_stops_early(tmp_path, monkeypatch):
    """Scripted metrics: best at step 2, then two worse evaluations -> stop at step 4, final = step 2."""
    from types import SimpleNamespace

    import embedtune.eval.validator as validator_mod

    script = iter([0.1, 0.5, 0.6, 0.4, 0.3, 0.9])
    monkeypatch.setattr(
        validator_mod,
        "run_evaluation",
        lambda *a, **k: SimpleNamespace(metrics={"ndcg@10": next(script), "recall@10": 0.0}),
    )
    monkeypatch.setattr(validator_mod.Validator, "eval_set", property(lambda self: None))
    data = tmp_path / "pairs.jsonl"
    validation = {"data": str(data), "every_n_steps": 1, "eval_at_start": True, "early_stopping_patience": 2}
    r = _recipe(tmp_path, validation=validation, optimizer={"lr": 1e-2})
    snapshots = {}
    real_step = r.train_step

    def step_and_snapshot(batch):
        out = real_step(batch)
        snapshots[r.state.step + 1] = _params(r)
        return out

    r.train_step = step_and_snapshot
    try:
        result = r.train()
    finally:
        r.cleanup()
    assert result.stop_reason == "early_stopping" and result.state.step == 4
    assert r.checkpoints.best().name == "step_00000002"
    assert r.state.best_step == 2 and r.state.best_metric == 0.6
    # The final model holds the best step's weights, not the last step's.
    from embedtune.models import AutoBiEncoder

    final = AutoBiEncoder.from_pretrained(result.model_dir)
    got = dict(final.named_parameters())
    for name, value in snapshots[2].items():
        assert torch.equal(got[name], value), name


def test_fresh_run_refuses_to_mix_with_earlier_checkpoints(tmp_path):
    from embedtune.errors import ConfigError

    r = _recipe(tmp_path, step_scheduler={"max_steps": 1})
    try:
        r.train()
    finally:
        r.cleanup()
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*checkpoint\.resume=latest"):
        _recipe(tmp_path)


def test_gradient_accumulation_equals_one_big_batch_without_in_batch_negatives(tmp_path):
    """Per-query loss (no in-batch negatives): 2 micro-batches of 4 == 1 batch of 8, up to rounding."""
    sections = {"loss": {"in_batch_negatives": False, "temperature": 0.5}, "max_grad_norm": None}
    whole = _recipe(tmp_path / "a", **sections, step_scheduler={"local_batch_size": None})
    accum = _recipe(tmp_path / "b", **sections, step_scheduler={"local_batch_size": 4})
    try:
        grads = []
        for r in (whole, accum):
            r.model.double()
            r.optimizer.step = lambda: None
            loss, _ = r.train_step(r.local_batches(0, 0))
            grads.append((loss, {n: p.grad for n, p in r.model.named_parameters() if p.grad is not None}))
        # BiEncoder pools in float32, so agreement is to float32 rounding.
        assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
        assert grads[0][1].keys() == grads[1][1].keys()
        for n, g in grads[0][1].items():
            torch.testing.assert_close(grads[1][1][n], g, rtol=1e-4, atol=1e-10)
    finally:
        whole.cleanup()
        accum.cleanup()


def test_warmup_longer_than_the_run_is_cut_and_said(tmp_path, capsys):
    """A warmup past the last step would train the whole run below the peak lr: cut it and say so."""
    from embedtune.training.optim import lr_factor

    r = _recipe(tmp_path, lr_scheduler={"name": "constant", "warmup_steps": 1000})
    try:
        err = capsys.readouterr().err
        assert "warmup is 1000 steps but the run has" in err and "lower lr_scheduler.warmup_steps" in err
        # the peak is reached on the last step instead of never
        assert lr_factor(r.total_steps - 1, r.total_steps, r.cfg.lr_scheduler) == 1.0
    finally:
        r.cleanup()


def test_warmup_shorter_than_the_run_prints_nothing(tmp_path, capsys):
    r = _recipe(tmp_path, lr_scheduler={"name": "constant", "warmup_steps": 1})
    r.cleanup()
    assert "warmup" not in capsys.readouterr().err


def test_attention_dropout_is_set_while_training_and_the_saved_config_keeps_its_own(tmp_path, capsys):
    import json

    cfg = load_config(
        TrainConfig,
        tiny_recipe(tmp_path, "tiny-bert", model={"attention_dropout": 0.0}, step_scheduler={"max_steps": 2}),
    )
    r = Recipe(cfg)
    r.setup()
    try:
        attention = [m for n, m in r.model.named_modules() if n.endswith("attention.self.dropout")]
        assert attention and all(m.p == 0.0 for m in attention)
        result = r.train()
    finally:
        r.cleanup()
    assert "attention dropout 0.1 -> 0.0 while training" in capsys.readouterr().out
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert saved["attention_probs_dropout_prob"] == 0.1


@pytest.mark.parametrize(
    "bad, says",
    [
        (1.0, r"must be in \[0, 1\) or null, got 1.0"),
        (-0.1, r"must be in \[0, 1\)"),
        (True, "expected float"),
    ],
)
def test_attention_dropout_outside_0_1_is_refused(tmp_path, bad, says):
    from embedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.attention_dropout: " + says):
        load_config(TrainConfig, tiny_recipe(tmp_path, model={"attention_dropout": bad}))
