"""NeMo AutoModel recipes convert key for key, print what differs, and give NeMo's tokenised text.

The fixtures in ``tests/fixtures/nemo/recipes`` are NeMo's shipped retrieval recipes key for key.
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import pytest

from embedtune.errors import ConfigError
from embedtune.nemo.recipe import ALLOWED_TARGETS, convert_recipe, is_nemo_recipe, read_nemo_recipe

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "nemo"
RECIPES = FIXTURES / "recipes"
BI = ["llama3_2_1b", "ministral3_3b_instruct", "llama_embed_nemotron_8b"]


def _raw(name: str) -> dict:
    return read_nemo_recipe(RECIPES / f"{name}.yaml")


@pytest.mark.parametrize("name", [*BI, "cross_encoder_llama3_2_1b"])
def test_every_shipped_recipe_converts_and_validates(name: str) -> None:
    raw = _raw(name)
    assert is_nemo_recipe(raw)
    conversion = convert_recipe(raw, name)
    if conversion.kind == "rerank":
        from embedtune.training.config import load_train_config

        cfg = load_train_config(conversion.recipe)  # one schema for every task
        assert cfg.recipe == "rerank"
        ce = cfg.cross_encoder
        assert ce.pooling == "avg" and ce.template == "question:{query} \n \n passage:{passage}"
        assert cfg.data.n_passages == 5 and cfg.data.fill_negatives == "repeat"
        assert cfg.step_scheduler.global_batch_size == 128 and cfg.step_scheduler.local_batch_size == 4
        assert [d.path for d in cfg.data.datasets] == ["hf://nvidia/embed-nemotron-dataset-v1/FEVER",
                            "hf://nvidia/embed-nemotron-dataset-v1/SyntheticClassificationData"]  # fmt: skip
        return
    from embedtune.training.config import load_train_config

    cfg = load_train_config(conversion.recipe)
    lr = raw["optimizer"]["lr"]
    # NeMo's schedule: warmup from 0.1·lr, decay to 0.01·lr; its clip 1.0; its seeds and temperature.
    assert cfg.lr_scheduler.warmup_start_ratio == pytest.approx(0.1)
    assert cfg.lr_scheduler.min_lr_ratio == pytest.approx(0.01)
    assert cfg.lr_scheduler.warmup_steps == raw["lr_scheduler"]["lr_warmup_steps"]
    assert cfg.lr_scheduler.name == raw["lr_scheduler"].get("lr_decay_style", "cosine")
    assert cfg.optimizer.lr == lr and cfg.max_grad_norm == 1.0
    assert cfg.seed == raw["seed"] and cfg.loss.temperature == raw["temperature"]
    assert cfg.loss.in_batch_negatives is False and cfg.distributed.cross_device_negatives is False
    assert cfg.data.negative_selection == "first" and cfg.data.fill_negatives == "repeat"
    assert cfg.data.instruction_separator == " " and cfg.data.cycle_positive_docs is False
    assert cfg.model.pooling == "mean" and cfg.model.pool_instruction is True
    assert cfg.bf16 is True and cfg.model.dtype == "float32"
    assert cfg.step_scheduler.global_batch_size == 128
    if name == "llama_embed_nemotron_8b":
        assert cfg.data.use_dataset_instruction is True and cfg.model.query_prefix == ""
        assert cfg.data.seed == 125 and cfg.lr_scheduler.warmup_steps == 2
        assert cfg.lr_scheduler.name == "cosine"  # NeMo's default decay style
        assert len(cfg.data.datasets) == 14
    else:
        assert cfg.model.query_prefix == "query: " and cfg.model.passage_prefix == "passage: "
        assert cfg.data.use_dataset_instruction is False
    if name == "ministral3_3b_instruct":
        assert cfg.model.name_or_path == "mistralai/Ministral-3-3B-Instruct-2512-BF16"
        assert cfg.model.padding_side == "left" and cfg.model.bidirectional is True


def test_differences_are_printed_once_each() -> None:
    raw = _raw("llama3_2_1b")
    raw["wandb"] = {"project": "p", "entity": "e", "name": "n", "save_dir": "d"}
    report = convert_recipe(raw).report()
    for expected in (
        "schedule: same shape (warmup from init_lr to lr, then decay to min_lr, identical from step W on)",
        "fp32 master weights (master_weights: true)",
        "in-batch negatives off, as NeMo",
        "wandb: logging backend",
        "ci: NeMo's CI settings",
        "model.use_liger_kernel: a kernel choice",
    ):
        assert report.count(expected) == 1, (expected, report)
    dist = _raw("llama3_2_1b")
    dist["model"]["do_distributed_inbatch_negative"] = True
    conversion = convert_recipe(dist)
    assert "gathers the other ranks' passages detached" in conversion.report()
    assert conversion.recipe["loss"]["in_batch_negatives"] is True
    assert conversion.recipe["distributed"]["cross_device_negatives"] is True


def test_unknown_target_is_refused_by_name_and_never_imported() -> None:
    raw = _raw("llama3_2_1b")
    raw["optimizer"]["_target_"] = "evil_nemo_payload.Optimizer"
    with pytest.raises(ConfigError) as info:
        convert_recipe(raw, "r.yaml")
    message = str(info.value)
    assert "r.yaml: optimizer._target_: 'evil_nemo_payload.Optimizer' is not one of" in message
    for allowed in ALLOWED_TARGETS:
        assert allowed in message
    assert "evil_nemo_payload" not in sys.modules
    # An allowed class in the wrong place is refused too.
    raw = _raw("llama3_2_1b")
    raw["model"]["_target_"] = "torch.optim.AdamW"
    with pytest.raises(ConfigError, match=r"model._target_: 'torch.optim.AdamW' is a optimizer"):
        convert_recipe(raw)


def test_unknown_keys_and_unsupported_settings_are_refused() -> None:
    raw = _raw("llama3_2_1b")
    raw["model"]["rope_magic"] = 3
    with pytest.raises(ConfigError, match=r"model.rope_magic: no embedtune equivalent"):
        convert_recipe(raw)
    raw = _raw("llama3_2_1b")
    raw["model"]["pooling"] = "colbert"
    with pytest.raises(ConfigError, match="colbert"):
        convert_recipe(raw)
    raw = _raw("llama3_2_1b")
    raw["model"].update(pooling="weighted_avg", l2_normalize=False)
    with pytest.raises(ConfigError, match="unweighted sum"):
        convert_recipe(raw)
    raw = _raw("llama3_2_1b")
    raw["distributed"]["tp_size"] = 2
    with pytest.raises(ConfigError, match=r"distributed.tp_size: 2: only data parallelism"):
        convert_recipe(raw)


# ----------------------------------------------------------------------------- NeMo's text, token for token


def _hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia/embed-nemotron-dataset-v1 in a hub cache, offline: the recipes' hf:// URIs stay unchanged."""
    folder = tmp_path / "hub" / "datasets--nvidia--embed-nemotron-dataset-v1"
    shutil.copytree(FIXTURES / "hf_layout" / "embed-nemotron-mini", folder / "snapshots" / "abc")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))


def _nemo_collator_texts(items, q_prefix: str, p_prefix: str, use_instruction: bool, instructions):
    """NeMo's BiEncoderCollator text, written from its source (join with a space)."""
    queries, passages = [], []
    for item, (qi, pi) in zip(items, instructions):
        if use_instruction:
            queries.append(f"{qi} {item.query}" if qi else item.query)
            passages += [f"{pi} {p}" if pi else p for p in item.passages]
        else:
            queries.append(q_prefix + " " + item.query if q_prefix else item.query)
            passages += [p_prefix + " " + p if p_prefix else p for p in item.passages]
    return queries, passages


@pytest.mark.parametrize("name", ["llama3_2_1b", "llama_embed_nemotron_8b"])
def test_tokenised_text_is_nemos(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedtune.data.collator import BiEncoderCollator
    from embedtune.data.dataset import TrainDataset
    from embedtune.models.auto import AutoBiEncoder
    from embedtune.training.config import load_train_config

    _hub_cache(tmp_path, monkeypatch)
    raw = _raw(name)
    if name == "llama_embed_nemotron_8b":
        raw["dataloader"]["dataset"]["data_dir_list"] = [str(FIXTURES / "corpus_id_object" / "train.json")]
    cfg = load_train_config(convert_recipe(raw).recipe)
    encoder = AutoBiEncoder.from_pretrained(
        "tiny-llama", query_prefix=cfg.model.query_prefix, passage_prefix=cfg.model.passage_prefix
    )
    dataset = TrainDataset.from_config(cfg.data, batch_size=2, seed=cfg.seed)
    items = [dataset[i] for i in range(len(dataset))]
    batch = BiEncoderCollator.from_encoder(encoder, cfg.data)(items)

    collate = raw["dataloader"]["collate_fn"]
    use_instruction = bool(collate.get("use_dataset_instruction", False))
    instructions = [
        (dataset.datasets[it.dataset].instructions_of(it.example).query or "",
         dataset.datasets[it.dataset].instructions_of(it.example).passage or "")
        for it in items
    ]  # fmt: skip
    queries, passages = _nemo_collator_texts(
        items,
        collate.get("query_prefix", ""),
        collate.get("passage_prefix", ""),
        use_instruction,
        instructions,
    )
    if name == "llama3_2_1b":
        assert queries[0].startswith("query: ") and passages[0].startswith("passage: ")
    else:
        assert queries[0].startswith(
            "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
        )
    tok = encoder.tokenizer
    for ours, text in ((batch["query"], queries), (batch["passages"], passages)):
        expected = tok(
            text, padding=True, truncation=True, max_length=512, return_tensors="pt", pad_to_multiple_of=8
        )
        assert ours["input_ids"].tolist() == expected["input_ids"].tolist()
        assert ours["attention_mask"].tolist() == expected["attention_mask"].tolist()
    # And the embedtune default (concatenation) would have differed: the control.
    assert tok("query:" + items[0].query)["input_ids"] != tok(f"query: {items[0].query}")["input_ids"]


# ----------------------------------------------------------------------------- 2 steps of each recipe


def _tiny(raw: dict, model: str) -> dict:
    """The same recipe, keys unchanged, sized for a tiny model and the fixture data."""
    raw = copy.deepcopy(raw)
    raw["model"]["pretrained_model_name_or_path"] = model
    raw["tokenizer"]["pretrained_model_name_or_path"] = model
    raw["model"].pop("attn_implementation", None)  # flash_attention_2 needs a GPU
    raw["step_scheduler"].update(global_batch_size=2, local_batch_size=1, max_steps=2, ckpt_every_steps=2)
    return raw


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "model"),
    [("llama3_2_1b", "tiny-llama"), ("ministral3_3b_instruct", "tiny-ministral3"),
     ("llama_embed_nemotron_8b", "tiny-llama")],
)  # fmt: skip
def test_each_bi_encoder_recipe_trains_two_steps(name, model, tmp_path, monkeypatch) -> None:
    import torch

    from embedtune.training.config import load_train_config
    from embedtune.training.recipe import train

    _hub_cache(tmp_path, monkeypatch)
    raw = _tiny(_raw(name), model)
    if name == "llama_embed_nemotron_8b":
        raw["dataloader"]["dataset"]["data_dir_list"] = [str(FIXTURES / "corpus_id_object" / "train.json")]
    raw["checkpoint"]["checkpoint_dir"] = str(tmp_path / "out" / "checkpoints")
    recipe = convert_recipe(raw).recipe
    recipe["optimizer"]["lr"] = 1e-3  # visible movement in two steps of a random tiny model
    recipe["bf16"] = False  # CPU test: fp32 compute
    cfg = load_train_config(recipe)
    result = train(cfg)
    assert result.exit_code == 0 and result.state.step == 2
    from embedtune.models.auto import AutoBiEncoder

    before = AutoBiEncoder.from_pretrained(model).backbone.state_dict()
    after = AutoBiEncoder.from_pretrained(result.model_dir).backbone.state_dict()
    moved = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert moved, "no weight moved in two steps"


@pytest.mark.slow
def test_cross_encoder_recipe_trains_two_steps_through_the_cli(tmp_path, monkeypatch, capsys) -> None:
    import yaml

    from embedtune.cli import main

    _hub_cache(tmp_path, monkeypatch)
    raw = _tiny(_raw("cross_encoder_llama3_2_1b"), "tiny-llama")
    raw["checkpoint"]["checkpoint_dir"] = str(tmp_path / "ce" / "checkpoints")
    raw["optimizer"]["lr"] = 1e-3
    raw["model"]["torch_dtype"] = "float32"
    raw["dataset"]["n_passages"] = 3
    path = tmp_path / "nemo_cross.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "NeMo AutoModel recipe converted; what differs from NeMo:" in out
    assert out.count("schedule: same shape") == 1
    from embedtune.nemo.cross_encoder import LlamaBidirectionalForSequenceClassification
    from embedtune.reranker import CrossEncoderReranker

    ce = CrossEncoderReranker.from_pretrained(tmp_path / "ce" / "model")
    assert isinstance(ce.backbone, LlamaBidirectionalForSequenceClassification)


# ----------------------------------------------------------------------------- CLI and schedule


def test_import_nemo_writes_a_recipe_that_loads(tmp_path: Path, capsys) -> None:
    from embedtune.cli import main
    from embedtune.training.config import load_train_config

    out = tmp_path / "converted.yaml"
    assert main(["import-nemo", str(RECIPES / "llama3_2_1b.yaml"), str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("schedule: same shape") == 1 and f"wrote {out}" in printed
    assert out.read_text().startswith("# Converted by `embedtune import-nemo`")
    assert load_train_config(out).model.query_prefix == "query: "
    assert main(["import-nemo", str(RECIPES / "llama3_2_1b.yaml"), str(out)]) == 2  # no silent overwrite
    assert "already exists; pass --force" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (RECIPES / "llama3_2_1b.yaml").read_text().replace("torch_dtype: bfloat16", "torch_dtype: int8")
    )
    assert main(["import-nemo", str(bad), str(tmp_path / "x.yaml")]) == 2
    assert "model.torch_dtype: 'int8'" in capsys.readouterr().err


def _nemo_lr(step: int, lr: float, warmup: int, total: int, style: str) -> float:
    """Megatron's OptimizerParamScheduler (NeMo's), with NeMo's defaults init 0.1·lr and min 0.01·lr."""
    import math

    init, low = 0.1 * lr, 0.01 * lr
    if warmup > 0 and step <= warmup:
        return init + (lr - init) * step / warmup
    ratio = (step - warmup) / (total - warmup)
    if style == "linear":
        return lr - (lr - low) * ratio
    return low + (lr - low) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_schedule_matches_nemos_after_warmup_and_starts_at_init_lr(style: str) -> None:
    from embedtune.training.config import LRSchedulerConfig
    from embedtune.training.optim import lr_factor

    lr, warmup, total = 2e-6, 10, 100
    cfg = LRSchedulerConfig(name=style, warmup_steps=warmup, warmup_start_ratio=0.1, min_lr_ratio=0.01)
    ours = [lr * lr_factor(k, total, cfg) for k in range(total)]
    nemo = [_nemo_lr(k, lr, warmup, total, style) for k in range(total)]
    for k in range(warmup, total):
        assert ours[k] == pytest.approx(nemo[k], rel=1e-9), k
    assert 0.1 * lr < ours[0] < 0.2 * lr and ours == sorted(ours[:warmup]) + ours[warmup:]
    # The default (start 0) is unchanged: embedtune's old warmup.
    assert lr_factor(0, total, LRSchedulerConfig(warmup_steps=warmup)) == pytest.approx(1 / (warmup + 1))


@pytest.mark.slow
def test_bi_encoder_nemo_recipe_with_hf_data_trains_through_the_cli(tmp_path, monkeypatch, capsys) -> None:
    import yaml

    from embedtune.cli import main

    _hub_cache(tmp_path, monkeypatch)
    raw = _tiny(_raw("llama3_2_1b"), "tiny-llama")  # keys unchanged; its two hf:// URIs unchanged
    raw["checkpoint"]["checkpoint_dir"] = str(tmp_path / "bi" / "checkpoints")
    raw["model"]["torch_dtype"] = "float32"
    path = tmp_path / "nemo_bi.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "logging.progress_bar=false"]) == 0
    out = capsys.readouterr().out
    assert out.count("NeMo AutoModel recipe converted") == 1 and "done: 2 steps" in out
    assert (tmp_path / "bi" / "model" / "config.json").is_file()


def test_validate_checks_a_nemo_recipe_as_its_conversion(tmp_path, monkeypatch, capsys) -> None:
    import yaml

    from embedtune.cli import main

    raw = _raw("llama_embed_nemotron_8b")
    raw["dataloader"]["dataset"]["data_dir_list"] = [str(FIXTURES / "corpus_id_object" / "train.json")]
    path = tmp_path / "nemo8b.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path), "--no-files"]) == 0
    out = capsys.readouterr().out
    assert out.count("NeMo AutoModel recipe converted") == 1 and f"OK: {path} is a valid recipe" in out
    raw["model"]["_target_"] = "somewhere.Else"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    assert "model._target_: 'somewhere.Else' is not one of" in capsys.readouterr().err
