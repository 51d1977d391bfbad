"""Chosen settings make a recipe that `embedtune train` accepts; stage markers key on their inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedtune.finetune.settings import choose_settings
from embedtune.finetune.stages import Stage, hash_inputs, hash_path
from embedtune.training.config import load_train_config


def _recipe(settings, model: str) -> dict:
    r = dict(settings.recipe)
    return {
        "model": {"name_or_path": model, **r.pop("model", {})},
        "data": {"datasets": ["x.json"], **r.pop("data")},
        **r,
    }


@pytest.mark.parametrize("model_type,lora", [("bert", False), ("llama", True)])
def test_settings_are_a_valid_recipe_with_reasons(model_type: str, lora: bool) -> None:
    s = choose_settings(
        model_type=model_type,
        num_parameters=135_000_000,
        num_train=900,
        device="cpu",
        fast_bf16=False,
        max_position_embeddings=512,
    )
    cfg = load_train_config({**_recipe(s, "tiny-bert"), "pipeline": {"mining": s.mining}})
    assert (cfg.peft is not None) == lora
    assert cfg.optimizer.lr == (1.2e-3 if lora else 2e-5)  # 84 steps: a short LoRA run
    # An encoder on mined negatives: 2 epochs (chosen on a carved validation split); a LoRA decoder: 3.
    assert cfg.step_scheduler.global_batch_size == 32 and cfg.step_scheduler.num_epochs == (3 if lora else 2)
    assert all(c.reason for c in s.choices)
    assert cfg.pipeline == {"mining": s.mining}  # accepted by train, carried unchanged


def test_small_data_gets_a_smaller_batch_and_large_data_fewer_epochs() -> None:
    small = choose_settings(model_type="bert", num_parameters=1, num_train=40, device="cpu", fast_bf16=False)
    large = choose_settings(
        model_type="bert", num_parameters=1, num_train=50_000, device="cpu", fast_bf16=False
    )
    assert small.recipe["step_scheduler"]["global_batch_size"] == 4
    assert large.recipe["step_scheduler"]["num_epochs"] == 1


@pytest.mark.parametrize(
    "model_type,own,expected",
    [("bert", 0.1, 0.0), ("bert", 0.0, None), ("bert", None, None), ("llama", 0.1, None)],
)
def test_an_encoder_with_attention_dropout_trains_without_it(model_type: str, own, expected) -> None:
    """Only an encoder whose own attention dropout is above 0 (and settable) gets 0, with the evidence."""
    s = choose_settings(
        model_type=model_type,
        num_parameters=1,
        num_train=900,
        device="cpu",
        fast_bf16=False,
        attention_dropout=own,
    )
    assert s.recipe["model"].get("attention_dropout") == expected
    why = [c.reason for c in s.choices if c.key == "model.attention_dropout"]
    assert len(why) == (expected is not None)
    assert all("attention_dropout_quality" in w and "0.6839" in w for w in why)  # the evidence is printed


def test_stage_done_only_for_the_same_key(tmp_path: Path) -> None:
    s = Stage(tmp_path, "mine", hash_inputs("a", 1))
    assert not s.done()
    s.finish({"n": 3})
    assert s.done() and s.summary() == {"n": 3}
    changed = Stage(tmp_path, "mine", hash_inputs("a", 2))
    assert not changed.done() and changed.summary() == {}


def test_hash_path_follows_content(tmp_path: Path) -> None:
    f = tmp_path / "d" / "x.jsonl"
    f.parent.mkdir()
    f.write_text("one")
    before = hash_path(f.parent), hash_path(f)
    f.write_text("two")
    assert hash_path(f.parent) != before[0] and hash_path(f) != before[1]


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_decoder_base_is_bfloat16_only_where_bfloat16_is_fast(fast_bf16: bool) -> None:
    # Without AMX / avx512_bf16 a bfloat16 base runs emulated bf16 matmuls: several times slower.
    s = choose_settings(
        model_type="llama", num_parameters=135_000_000, num_train=900, device="cpu", fast_bf16=fast_bf16
    )
    assert s.recipe["model"]["dtype"] == ("bfloat16" if fast_bf16 else "float32")
    assert s.recipe["bf16"] is fast_bf16


def test_a_decoder_trains_on_in_batch_negatives_and_an_encoder_on_mined_ones() -> None:
    # A converted decoder scores documents alike before training: mining with it yields no negatives.
    kw = dict(num_parameters=135_000_000, num_train=900, device="cpu", fast_bf16=False)
    decoder, encoder = choose_settings(model_type="llama", **kw), choose_settings(model_type="bert", **kw)
    assert decoder.recipe["data"]["n_passages"] == 1 and encoder.recipe["data"]["n_passages"] == 2
    assert decoder.mining["model"] is None and encoder.mining["model"] is None  # the base, when mining


def test_only_a_short_lora_run_takes_the_larger_rate() -> None:
    # The 4x rate was measured on 32-44-step runs; a long run keeps the shipped recipe's 3e-4.
    def lr(num_train: int) -> float:
        s = choose_settings(
            model_type="llama", num_parameters=1, num_train=num_train, device="cpu", fast_bf16=False
        )
        return s.recipe["optimizer"]["lr"]

    assert lr(537) == 1.2e-3 and lr(1_050) == 1.2e-3  # 48 and 96 steps
    assert lr(1_100) == 3e-4 and lr(50_000) == 3e-4  # 102 and 1,562 steps
