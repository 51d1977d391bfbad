"""The demo's planner (fake measurements: no clock, no model) and its output-folder safety."""

from __future__ import annotations

import pytest

from embedtune.commands.demo import (
    BUDGET_S,
    EVAL_SHARE,
    MARKER,
    MAX_LR_SCALE,
    RESERVE_S,
    EvalShape,
    Measured,
    apply_plan,
    lr_scale_for,
    plan_demo,
    prepare_output,
)
from embedtune.errors import EmbedtuneError
from embedtune.training.config import load_train_config

# The scifact-mini held-out set as the SmolLM2 tokenizer sees it: 300 queries, 1,000 long documents.
SHAPE = EvalShape(
    query_tokens=300 * 25, doc_tokens=tuple([400] * 800 + [150] * 200), n_relevant=330, n_queries=300
)


def step_tokens(p_len: int) -> float:
    return 16 * (25 + p_len)


def _plan(tokens_per_s: dict[str, float], elapsed_s: float = 25.0, lora_lr: float | None = 3e-4):
    return plan_demo(
        Measured(tokens_per_s, elapsed_s),
        SHAPE,
        max_length=192,
        train_tokens_per_step=step_tokens,
        p_max_len=128,
        max_steps=80,
        lora_lr=lora_lr,
    )


def _predicted_total(plan, elapsed_s: float = 25.0) -> float:
    return elapsed_s + 2 * plan.eval_s + plan.train_s + RESERVE_S


def test_precision_is_the_measured_faster_one():
    assert _plan({"fp32": 2000.0, "bf16": 4500.0}).precision == "bf16"  # AMX-like
    assert _plan({"fp32": 2000.0, "bf16": 1500.0}).precision == "fp32"  # bf16 slower: not chosen
    assert _plan({"fp32": 2000.0}).precision == "fp32"  # no bf16 instructions: only fp32 was timed


def test_fast_machine_keeps_the_full_held_out_set():
    plan = _plan({"fp32": 3000.0, "bf16": 9000.0})
    assert (plan.eval_docs, plan.eval_max_length) == (1000, 192)
    assert plan.steps == 80  # the recipe's cap
    assert _predicted_total(plan) <= BUDGET_S


@pytest.mark.parametrize("threads", [2, 1])
def test_plan_fits_the_budget_and_keeps_evaluation_to_its_share(threads):
    # A thread limit halves the measured speed: the plan must still fit, evaluation within its share.
    plan = _plan({"fp32": 1200.0 * threads / 2})
    assert _predicted_total(plan) <= BUDGET_S + 1e-6
    assert 2 * plan.eval_s <= EVAL_SHARE * (BUDGET_S - 25.0 - RESERVE_S) + 1e-6
    assert plan.train_s >= 2 * plan.eval_s  # most of the time goes to training


def test_plan_adapts_to_a_slower_machine():
    fast, slow = _plan({"fp32": 1200.0}), _plan({"fp32": 600.0})  # 2 threads vs a 1-thread limit
    assert slow.eval_max_length <= fast.eval_max_length and slow.eval_docs <= fast.eval_docs
    assert (slow.eval_max_length, slow.eval_docs) != (fast.eval_max_length, fast.eval_docs)
    assert slow.steps < fast.steps or slow.p_max_len < fast.p_max_len
    assert slow.eval_docs >= SHAPE.n_relevant  # every relevant document stays searchable
    assert any("cut to" in r or "corpus" in r for r in slow.reasons)


def test_a_very_slow_machine_trains_on_shorter_passages_and_says_so():
    plan = _plan({"fp32": 250.0})
    assert plan.p_max_len < 128 and plan.steps > 0
    assert any("training passages cut" in r for r in plan.reasons)


def test_apply_plan_sets_precision_eval_set_and_budget_but_not_overrides(tmp_path):
    overrides = [f"output_dir={tmp_path / 'run'}", "validation.max_corpus=700"]
    cfg = load_train_config("smollm2_135m_demo", overrides)
    plan = _plan({"fp32": 600.0})
    apply_plan(cfg, plan, overrides)
    assert cfg.bf16 is False and cfg.validation.bf16 is False and cfg.model.dtype == "float32"
    assert cfg.validation.max_length == plan.eval_max_length < 192
    assert cfg.model.max_length == 192  # the saved model keeps the recipe's length
    assert cfg.validation.max_corpus == 700  # given on the command line: kept
    assert cfg.step_scheduler.max_time_minutes == pytest.approx(plan.time_budget_s / 60)
    assert cfg.step_scheduler.max_steps < 80  # the schedule matches the steps that fit

    cfg = load_train_config("smollm2_135m_demo", [f"output_dir={tmp_path / 'run'}"])
    apply_plan(cfg, plan, [])
    assert cfg.validation.max_corpus == plan.eval_docs < 1000


def test_a_short_lora_run_takes_a_larger_learning_rate_and_says_so(tmp_path):
    fast, slow = _plan({"fp32": 3000.0, "bf16": 9000.0}), _plan({"fp32": 600.0})
    assert fast.steps == 80 and fast.lr_scale == 1.0  # the recipe's own run: its own rate
    assert 0 < slow.steps < 80
    assert slow.lr_scale == lr_scale_for(slow.steps, 80) > 1
    assert any("LoRA learning rate" in r and "validation split" in r for r in slow.reasons)
    assert _plan({"fp32": 600.0}, lora_lr=None).lr_scale == 1.0  # full fine-tuning: kept

    cfg = load_train_config("smollm2_135m_demo", [f"output_dir={tmp_path / 'run'}"])
    recipe_lr = cfg.optimizer.lr
    apply_plan(cfg, slow, [])
    assert cfg.optimizer.lr == pytest.approx(recipe_lr * slow.lr_scale)
    given = [f"output_dir={tmp_path / 'run'}", "optimizer.lr=1e-4"]
    cfg = load_train_config("smollm2_135m_demo", given)
    apply_plan(cfg, slow, given)
    assert cfg.optimizer.lr == pytest.approx(1e-4)  # set on the command line: never re-planned


def test_the_learning_rate_factor_runs_from_one_to_its_cap():
    assert lr_scale_for(80, 80) == 1.0 and lr_scale_for(100, 80) == 1.0
    assert lr_scale_for(40, 80) == MAX_LR_SCALE == lr_scale_for(10, 80)  # half the steps or fewer
    assert lr_scale_for(60, 80) == pytest.approx((1 + MAX_LR_SCALE) / 2)  # linear in between
    factors = [lr_scale_for(s, 80) for s in range(1, 81)]
    assert factors == sorted(factors, reverse=True)


def _cfg(tmp_path, *extra: str):
    return load_train_config("smollm2_135m_demo", [f"output_dir={tmp_path / 'run'}", *extra])


def test_demo_marks_the_folder_it_creates_and_clears_only_its_own_checkpoints(tmp_path):
    cfg = _cfg(tmp_path)
    prepare_output(cfg)
    assert (tmp_path / "run" / MARKER).is_file()
    (cfg.checkpoint_dir / "step_25").mkdir(parents=True)
    prepare_output(cfg)  # a previous demo run's checkpoints: cleared
    assert not cfg.checkpoint_dir.exists()


def test_demo_refuses_to_delete_a_folder_it_did_not_create(tmp_path):
    cfg = _cfg(tmp_path)
    real = cfg.checkpoint_dir / "step_1000"
    real.mkdir(parents=True)
    (real / "model.safetensors").write_bytes(b"a real run")
    with pytest.raises(EmbedtuneError, match=r"did not create.*nothing was deleted"):
        prepare_output(cfg)
    assert (real / "model.safetensors").read_bytes() == b"a real run"


def test_demo_never_deletes_a_checkpoint_dir_outside_its_marked_folder(tmp_path):
    elsewhere = tmp_path / "my_run_checkpoints"
    cfg = _cfg(tmp_path, f"checkpoint.dir={elsewhere}")
    prepare_output(cfg)  # creates and marks run/
    (elsewhere / "step_5").mkdir(parents=True)
    with pytest.raises(EmbedtuneError, match="did not create"):
        prepare_output(cfg)
    assert (elsewhere / "step_5").is_dir()


def test_a_machine_too_slow_for_any_training_is_told_how_long_it_would_need():
    plan = _plan({"fp32": 29.0}, elapsed_s=103.0)  # measured on a badly overloaded 2-core machine
    assert not plan.fits and plan.steps == 0
    assert plan.needed_s > BUDGET_S
    longer = plan_demo(
        Measured({"fp32": 29.0}, 103.0),
        SHAPE,
        max_length=192,
        train_tokens_per_step=step_tokens,
        p_max_len=128,
        max_steps=80,
        budget_s=plan.needed_s * 1.2,
    )
    assert longer.fits  # the budget it names is enough
