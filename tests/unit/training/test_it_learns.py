"""It learns: every shipped recipe, in its own precision and at its own learning rate, moves every trained
weight matrix and lowers the loss on a fixed batch — and pure-bf16 AdamW (no fp32 master weights) does not.

Each recipe runs through the shipped recipe path (``embedtune.training.train``) with only its backbone
swapped for a tiny random model of the same architecture, a small data set and 3 steps at the recipe's
*peak* learning rate (warmup off: at step 1 of a 100-step warmup the rate is 1/101 of the peak, which
would make the loss change too small to measure in 3 steps; the master-weight failure it exposes is the
same, only larger).

Embedding tables are left out of "every trained weight matrix": rows of tokens absent from the batch get
no gradient, so they cannot move in any precision.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from _train_helpers import WORDS

from embedtune.config import load_config, read_yaml
from embedtune.recipes import recipe_path
from embedtune.training.config import TrainConfig

TINY = {
    "llama3_2_1b": "tiny-llama",
    "llama_embed_nemotron_8b": "tiny-llama",
    "ministral3_3b_instruct": "tiny-ministral3",
    "smollm2_135m_demo": "tiny-llama",
    "minilm_demo": "tiny-bert",
}
MOVED = 0.90  # fraction of the elements of every trained matrix that must change


def _tiny_cfg(name: str, tmp: Path, **model: object) -> TrainConfig:
    raw = read_yaml(recipe_path(name))
    n_passages = raw.get("data", {}).get("n_passages", 2)
    data = _hard_pairs(tmp / "train.jsonl", n_neg=max(1, n_passages - 1))
    raw["model"] = {**raw["model"], "name_or_path": TINY[name], **model}
    raw["data"] = {
        **raw["data"],
        "datasets": [{**raw["data"]["datasets"][0], "path": str(data)}],
        "q_max_len": 24,
        "p_max_len": 32,
    }
    raw["output_dir"] = str(tmp / "run")
    raw["validation"] = None
    raw["checkpoint"] = {"keep_last": 1}
    raw["lr_scheduler"] = {"name": "constant", "warmup_steps": 0}
    raw["step_scheduler"] = {"global_batch_size": 4, "max_steps": 3, "log_every_steps": 1}
    raw["logging"] = {"progress_bar": False, "plot": False, "tensorboard": False}
    raw["num_threads"] = 1
    raw["distributed"] = {}  # one process (the strategy only applies under torchrun)
    return load_config(TrainConfig, raw)


def _hard_pairs(path: Path, n: int = 16, n_neg: int = 4, seed: int = 0) -> Path:
    """Training pairs whose hard negatives share *more* words with the query than the positive does, so
    an untrained model ranks them first and the loss starts high (at τ = 0.02 an easy set starts near 0)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            w = rng.sample(WORDS, 6)
            negs = [f"{w[0]} {w[1]} {rng.choice(WORDS)} note {i}-{j}" for j in range(n_neg)]
            row = {"query": f"{w[0]} {w[1]} {w[2]}", "pos_doc": f"{w[3]} {w[4]} {w[5]} {i}", "neg_doc": negs}
            f.write(json.dumps(row) + "\n")
    return path


def _trained_matrices(model: torch.nn.Module, used: set[str]) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().float().clone()
        for n, p in model.named_parameters()
        if n in used and p.ndim == 2 and not isinstance(_owner(model, n), torch.nn.Embedding)
    }


def _owner(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0])


def _fixed_batch_loss(recipe, batch, *, grad: bool = False) -> float:
    """The recipe's loss on ``batch``, in eval mode and float32 compute (a stable measurement)."""
    model = recipe.model
    model.eval()
    try:
        with torch.set_grad_enabled(grad):
            q = model(**batch["query"])
            p = model(**batch["passages"])
            n = batch["passages"]["input_ids"].shape[0] // batch["query"]["input_ids"].shape[0]
            loss = recipe.task.loss_fn(q, p, n_passages=n, doc_ids=None, offset=0)
            if grad:
                loss.backward()
            return float(loss.detach())
    finally:
        model.train()


def _train_and_measure(cfg: TrainConfig) -> tuple[dict[str, float], float, float, int]:
    """Train ``cfg`` 3 steps; returns (fraction moved per matrix, loss before, loss after, #matrices)."""
    from embedtune.training.recipe import Recipe

    recipe = Recipe(cfg)
    try:
        recipe.setup()
        batch = recipe.data.batch(0, 0, cfg.step_scheduler.global_batch_size)
        # The parameters the loss reaches (e.g. not BERT's pooler under mean pooling).
        _fixed_batch_loss(recipe, batch, grad=True)
        used = {n for n, p in recipe.model.named_parameters() if p.grad is not None and p.grad.any()}
        recipe.model.zero_grad(set_to_none=True)
        before = _trained_matrices(recipe.model, used)
        loss_before = _fixed_batch_loss(recipe, batch)
        recipe.train()
        after = _trained_matrices(recipe.model, used)
        loss_after = _fixed_batch_loss(recipe, batch)
    finally:
        recipe.cleanup()
    moved = {n: (after[n] != before[n]).float().mean().item() for n in before}
    return moved, loss_before, loss_after, len(before)


@pytest.mark.parametrize("name", sorted(TINY))
def test_shipped_recipe_learns_in_its_own_precision_and_lr(name, tmp_path):
    cfg = _tiny_cfg(name, tmp_path)
    moved, loss_before, loss_after, n_matrices = _train_and_measure(cfg)
    assert n_matrices >= 4
    stuck = {n: round(f, 3) for n, f in moved.items() if f <= MOVED}
    assert not stuck, f"{name} (dtype {cfg.model.dtype}, bf16 {cfg.bf16}, lr {cfg.optimizer.lr:g}): {stuck}"
    assert loss_after < loss_before, (loss_before, loss_after)


def test_pure_bf16_adamw_fails_the_learning_test(tmp_path, monkeypatch):
    """The failure the check above catches: bf16 *weights* under full fine-tuning at lr 5e-6 barely move.

    The recipe loader refuses ``model.dtype: bfloat16`` without LoRA, so the refusal is switched off here.
    """
    import embedtune.training.config as config_module

    monkeypatch.setattr(config_module, "check_master_weights", lambda cfg: None)
    cfg = _tiny_cfg("llama3_2_1b", tmp_path, dtype="bfloat16")
    assert cfg.model.dtype == "bfloat16" and cfg.peft is None and cfg.optimizer.lr == 5e-6
    moved, _, _, _ = _train_and_measure(cfg)
    mean_moved = sum(moved.values()) / len(moved)
    assert mean_moved < 0.2, moved  # most updates are below half a bf16 ulp and round away
    assert max(moved.values()) < MOVED


def test_bf16_weights_without_lora_are_refused_at_load():
    from embedtune.errors import ConfigError
    from embedtune.training.config import load_train_config

    with pytest.raises(ConfigError, match=r"model.dtype: bfloat16.*model.dtype: float32 and bf16: true"):
        load_train_config("llama3_2_1b", ["model.dtype=bfloat16"])
    # Under LoRA the frozen base may be bf16 (the adapters are float32).
    assert load_train_config("smollm2_135m_demo").model.dtype == "bfloat16"
