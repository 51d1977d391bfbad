"""Read a NeMo AutoModel retrieval recipe and write the embedtune recipe that trains the same thing.

NeMo recipes (``examples/retrieval/bi_encoder/*.yaml``, ``examples/retrieval/cross_encoder/*.yaml``)
build their parts from ``_target_`` dotted paths. Nothing here imports anything a recipe names: a
``_target_`` is compared, as a string, with :data:`ALLOWED_TARGETS` — the classes NeMo's shipped
retrieval recipes use — and anything else is refused by name. Every key of those recipes has a rule
below (:data:`KEYS` lists them for the docs and the tests): it maps to an embedtune key, or is ignored
with the reason printed. What still behaves differently is listed once in :attr:`Conversion.differences`.

NeMo semantics carried over exactly: prefixes and instructions joined with a space (``"query:" + " " +
text``), metadata instructions only with ``use_dataset_instruction`` (and then the recipe's prefixes
are dropped, as NeMo's collator drops them), negatives taken first in file order and repeated when
short, the first positive unless ``cycle_positive_docs``, in-batch negatives only with
``do_distributed_inbatch_negative``, the LR schedule from ``0.1·lr`` through warmup to ``lr`` and down
to ``0.01·lr``, gradient clipping at 1.0, NeMo's seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedtune.errors import ConfigError

__all__ = [
    "ALLOWED_TARGETS",
    "KEYS",
    "Conversion",
    "convert_recipe",
    "is_nemo_recipe",
    "read_nemo_recipe",
]

#: The ``_target_`` values NeMo's shipped retrieval recipes use, and the part each one stands for.
ALLOWED_TARGETS: dict[str, str] = {
    "nemo_automodel.NeMoAutoModelBiEncoder.from_pretrained": "bi-encoder model",
    "nemo_automodel.NeMoAutoModelCrossEncoder.from_pretrained": "cross-encoder model",
    "nemo_automodel.NeMoAutoTokenizer.from_pretrained": "tokenizer",
    "transformers.AutoTokenizer.from_pretrained": "tokenizer",
    "nemo_automodel.components.datasets.llm.retrieval_dataset.RetrievalDatasetConfig": "dataset",
    "nemo_automodel.components.datasets.llm.make_retrieval_dataset": "dataset",
    "nemo_automodel.components.datasets.llm.retrieval_dataset.make_retrieval_dataset": "dataset",
    "nemo_automodel.components.datasets.llm.retrieval_dataset_inline.InlineRetrievalDatasetConfig": "dataset",
    "nemo_automodel.components.datasets.llm.retrieval_dataset_inline.make_retrieval_dataset": "dataset",
    "nemo_automodel.components.datasets.llm.BiEncoderCollator": "bi-encoder collator",
    "nemo_automodel.components.datasets.llm.RetrievalEncoderCollator": "bi-encoder collator",
    "nemo_automodel.components.datasets.llm.CrossEncoderCollator": "cross-encoder collator",
    "torchdata.stateful_dataloader.StatefulDataLoader": "data loader",
    "transformer_engine.pytorch.optimizers.fused_adam.FusedAdam": "optimizer",
    "torch.optim.AdamW": "optimizer",
    "torch.optim.Adam": "optimizer",
    "nemo_automodel.components._peft.lora.PeftConfig": "LoRA",
}

#: Every key of NeMo's shipped retrieval recipes and what becomes of it (the docs' mapping table).
KEYS: dict[str, str] = {
    "recipe": "TrainBiEncoderRecipe → bi-encoder recipe; TrainCrossEncoderRecipe → `recipe: rerank`",
    "seed": "seed (and data.seed unless the dataset gives its own)",
    "temperature": "loss.temperature (NeMo's default when absent: 1.0)",
    "step_scheduler.global_batch_size": "step_scheduler.global_batch_size",
    "step_scheduler.local_batch_size": "step_scheduler.local_batch_size",
    "step_scheduler.num_epochs": "step_scheduler.num_epochs",
    "step_scheduler.max_steps": "step_scheduler.max_steps",
    "step_scheduler.ckpt_every_steps": "step_scheduler.ckpt_every_steps",
    "step_scheduler.val_every_steps": "ignored: NeMo's validation is not converted (see validation_dataset)",
    "dist_env.backend": "distributed.backend",
    "dist_env.timeout_minutes": "distributed.timeout_minutes",
    "model._target_": "allowlisted: bi-encoder or cross-encoder",
    "model.pretrained_model_name_or_path": "model.name_or_path",
    "model.pooling": "model.pooling (avg → mean; weighted_avg, a sum, → mean under L2; colbert refused)",
    "model.l2_normalize": "model.normalize",
    "model.torch_dtype": "bf16: true over fp32 weights (see the master-weights difference)",
    "model.attn_implementation": "model.attn_implementation",
    "model.is_causal": "model.bidirectional (false → true)",
    "model.trust_remote_code": "ignored: embedtune loads Llama/Ministral3 with its own classes, never remote code",
    "model.extract_submodel": "implied: a mistral3 checkpoint's language tower is taken automatically",
    "model.use_liger_kernel": "ignored: a kernel choice (same arithmetic)",
    "model.use_sdpa_patching": "ignored: a kernel choice (same arithmetic)",
    "model.do_distributed_inbatch_negative": "loss.in_batch_negatives and distributed.cross_device_negatives",
    "model.num_labels": "must be 1 (one relevance score)",
    "model.temperature": "cross-encoder score temperature: must be 1.0 (a new head; NeMo's default)",
    "tokenizer._target_": "allowlisted",
    "tokenizer.pretrained_model_name_or_path": "must name the model's tokenizer (embedtune loads the model's)",
    "tokenizer.add_eos_token": "false only (embedtune appends no EOS)",
    "tokenizer.add_bos_token": "true only (the tokenizer's BOS, as embedtune tokenises)",
    "tokenizer.padding_side": "model.padding_side",
    "tokenizer.tokenizer_backend": "ignored: the fast tokenizer is used",
    "tokenizer.fix_mistral_regex": "ignored: tokenizer-loading detail of NeMo",
    "tokenizer.split_special_tokens": "ignored: tokenizer-loading detail of NeMo",
    "dataset._target_ / dataloader.dataset._target_": "allowlisted",
    "dataset.model_type": "bi_encoder/biencoder or cross_encoder: must agree with the recipe",
    "dataset.data_dir_list": "data.datasets (paths, hf:// URIs, {path, num_samples}, [num_samples, path])",
    "dataset.data_type": "train only",
    "dataset.n_passages": "data.n_passages (rerank: the group size)",
    "dataset.seed": "data.seed",
    "dataset.do_shuffle": "ignored: only acts with max_train_samples in NeMo; embedtune shuffles each epoch",
    "dataset.use_dataset_instruction": "data.use_dataset_instruction",
    "dataset.cycle_positive_docs": "data.cycle_positive_docs (NeMo's documented default: false)",
    "dataset.max_train_samples": "refused: use num_samples entries in data_dir_list",
    "dataloader._target_": "allowlisted",
    "dataloader.collate_fn._target_": "allowlisted",
    "dataloader.collate_fn.q_max_len": "data.q_max_len",
    "dataloader.collate_fn.p_max_len": "data.p_max_len",
    "dataloader.collate_fn.query_prefix": "model.query_prefix + ' ' (NeMo joins with a space)",
    "dataloader.collate_fn.passage_prefix": "model.passage_prefix + ' '",
    "dataloader.collate_fn.pad_to_multiple_of": "data.pad_to_multiple_of",
    "dataloader.collate_fn.padding": "longest/true only",
    "dataloader.collate_fn.use_dataset_instruction": "data.use_dataset_instruction (with the dataset's)",
    "dataloader.collate_fn.rerank_max_length": "model.max_length (rerank: tokens per pair)",
    "dataloader.collate_fn.prompt_template": "cross_encoder.template (rerank; NeMo's default when absent)",
    "dataloader.shuffle": "true only (embedtune shuffles every epoch, seeded)",
    "dataloader.num_workers": "ignored: embedtune's loader",
    "optimizer._target_": "allowlisted: optimizer.name adamw",
    "optimizer.lr": "optimizer.lr",
    "optimizer.weight_decay": "optimizer.weight_decay (not on biases and norms, as NeMo)",
    "optimizer.adam_w_mode": "true only (decoupled weight decay)",
    "optimizer.bias_correction": "true only",
    "optimizer.master_weights": "fp32 weights + bf16 compute (see the master-weights difference)",
    "optimizer.betas / optimizer.eps": "optimizer.betas / optimizer.eps",
    "lr_scheduler.lr_warmup_steps": "lr_scheduler.warmup_steps",
    "lr_scheduler.lr_decay_style": "lr_scheduler.name (NeMo's default: cosine)",
    "lr_scheduler.init_lr": "lr_scheduler.warmup_start_ratio = init_lr / lr (NeMo's default 0.1)",
    "lr_scheduler.min_lr": "lr_scheduler.min_lr_ratio = min_lr / lr (NeMo's default 0.01)",
    "checkpoint.enabled": "checkpoints are always written (false: only at the end)",
    "checkpoint.checkpoint_dir": "output_dir (its parent when it ends in /checkpoints)",
    "checkpoint.model_save_format": "safetensors only",
    "checkpoint.save_consolidated": "always: embedtune saves a consolidated transformers folder",
    "checkpoint.restore_from": "checkpoint.resume",
    "distributed.strategy": "distributed.strategy (fsdp2 or ddp)",
    "distributed.dp_size / tp_size / cp_size / sequence_parallel": "data parallel only: tp/cp 1, no SP",
    "clip_grad_norm.max_norm": "max_grad_norm (NeMo's default 1.0)",
    "peft.*": "peft (dim → r, alpha, dropout, target_modules, match_all_linear; exclude_modules empty only)",
    "validation_dataset / validation_dataloader": "ignored: NeMo's in-group validation; add a BEIR validation:",
    "wandb / mlflow": "ignored: logging backends (embedtune writes metrics.jsonl and TensorBoard)",
    "ci": "ignored: NeMo's CI settings",
    "compile / bi_encoder_optimization": "ignored: kernel and compile options",
}

_BI_RECIPE, _CROSS_RECIPE = "TrainBiEncoderRecipe", "TrainCrossEncoderRecipe"
#: NeMo's CrossEncoderCollator default (the same string as ``embedtune.reranker.NEMO_TEMPLATE``).
NEMO_TEMPLATE = "question:{query} \n \n passage:{passage}"
_NEMO_MARKERS = ("dist_env", "step_scheduler", "dataloader", "recipe", "temperature")


@dataclass
class Conversion:
    """The result of :func:`convert_recipe`."""

    recipe: dict[str, Any]
    """The embedtune recipe (a bi-encoder ``TrainConfig`` mapping, or a ``recipe: rerank`` mapping)."""
    kind: str
    """``biencoder`` or ``rerank``."""
    differences: list[str] = field(default_factory=list)
    """What still differs from NeMo, one sentence each (printed once)."""
    ignored: list[str] = field(default_factory=list)
    """Keys that have no effect here, with the reason."""

    def report(self) -> str:
        """The differences and ignored keys as the text the commands print."""
        lines = ["NeMo AutoModel recipe converted; what differs from NeMo:"]
        lines += [f"  - {d}" for d in self.differences]
        if self.ignored:
            lines.append("ignored NeMo keys:")
            lines += [f"  - {i}" for i in self.ignored]
        return "\n".join(lines)


def is_nemo_recipe(raw: Any) -> bool:
    """True for a mapping that looks like a NeMo AutoModel recipe (``_target_`` blocks, NeMo's keys)."""
    if not isinstance(raw, dict):
        return False
    if raw.get("recipe") in (_BI_RECIPE, _CROSS_RECIPE):
        return True
    model = raw.get("model")
    return isinstance(model, dict) and "_target_" in model and any(k in raw for k in _NEMO_MARKERS)


def read_nemo_recipe(path: str | Path) -> dict[str, Any]:
    """Read a NeMo recipe YAML (plain YAML: nothing is resolved or imported)."""
    from embedtune.config import read_yaml

    raw = read_yaml(Path(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a NeMo recipe is a mapping of blocks, got {type(raw).__name__}")
    return raw


class _Reader:
    """Walks one NeMo recipe; records which keys were consumed so that nothing passes unnoticed."""

    def __init__(self, raw: dict[str, Any], origin: str) -> None:
        self.raw = raw
        self.origin = origin
        self.differences: list[str] = []
        self.ignored: list[str] = []

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.origin}: {key}: {message}")

    def block(self, key: str) -> dict[str, Any]:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {value!r}")
        return value

    def target(self, key: str, block: dict[str, Any], kinds: tuple[str, ...]) -> str | None:
        """Check ``block._target_`` against the allowlist (a string compare; nothing is imported)."""
        tgt = block.get("_target_")
        if tgt is None:
            return None
        if not isinstance(tgt, str) or tgt not in ALLOWED_TARGETS:
            allowed = "\n  ".join(sorted(ALLOWED_TARGETS))
            raise self.fail(
                f"{key}._target_",
                f"{tgt!r} is not one of the classes NeMo's retrieval recipes use, and embedtune imports "
                f"nothing named in a recipe. Allowed:\n  {allowed}",
            )
        if ALLOWED_TARGETS[tgt] not in kinds:
            raise self.fail(
                f"{key}._target_", f"{tgt!r} is a {ALLOWED_TARGETS[tgt]}, not a {' or '.join(kinds)}"
            )
        return tgt

    def unknown(self, key: str, block: dict[str, Any], known: set[str]) -> None:
        extra = sorted(set(block) - known - {"_target_"})
        if extra:
            raise self.fail(
                f"{key}.{extra[0]}",
                f"no embedtune equivalent is known for this NeMo key (known: {', '.join(sorted(known))}); "
                "remove it or convert it by hand",
            )


def convert_recipe(raw: dict[str, Any], origin: str = "recipe") -> Conversion:
    """Convert a NeMo AutoModel retrieval recipe mapping into an embedtune recipe mapping.

    Args:
        raw: The NeMo YAML as read (``_target_`` values untouched, nothing instantiated).
        origin: The file, for messages.

    Returns:
        The embedtune recipe and what differs.

    Raises:
        ConfigError: an unknown ``_target_`` (named, with the allowlist), an unknown key, or a setting
            embedtune cannot honour exactly (e.g. ``colbert`` pooling, tensor parallelism).
    """
    r = _Reader(raw, origin)
    top_known = {
        "recipe", "seed", "temperature", "step_scheduler", "dist_env", "model", "tokenizer", "dataset",
        "dataloader", "optimizer", "lr_scheduler", "checkpoint", "distributed", "clip_grad_norm", "peft",
        "validation_dataset", "validation_dataloader", "wandb", "mlflow", "ci", "compile",
        "bi_encoder_optimization",
    }  # fmt: skip
    extra = sorted(set(raw) - top_known)
    if extra:
        raise r.fail(
            extra[0], f"not a key of NeMo's retrieval recipes (known: {', '.join(sorted(top_known))})"
        )

    model = r.block("model")
    model_target = r.target("model", model, ("bi-encoder model", "cross-encoder model"))
    recipe_name = raw.get("recipe")
    if recipe_name is None:
        recipe_name = _CROSS_RECIPE if model_target and "CrossEncoder" in model_target else _BI_RECIPE
    if recipe_name not in (_BI_RECIPE, _CROSS_RECIPE):
        raise r.fail(
            "recipe", f"{recipe_name!r}: only {_BI_RECIPE} and {_CROSS_RECIPE} are retrieval recipes"
        )
    cross = recipe_name == _CROSS_RECIPE
    if model_target and ("CrossEncoder" in model_target) != cross:
        raise r.fail("model._target_", f"{model_target} does not fit recipe: {recipe_name}")

    for key, reason in (
        ("wandb", "logging backend (embedtune writes metrics.jsonl and TensorBoard)"),
        ("mlflow", "logging backend (embedtune writes metrics.jsonl and TensorBoard)"),
        ("ci", "NeMo's CI settings"),
        ("compile", "torch.compile options"),
        ("bi_encoder_optimization", "NeMo kernel patches"),
        ("validation_dataset", "NeMo's in-group validation (accuracy@1/MRR over the listed negatives); "
         "add an embedtune `validation:` block with a BEIR folder for full-corpus NDCG/Recall"),
        ("validation_dataloader", "see validation_dataset"),
    ):  # fmt: skip
        if key in raw:
            r.ignored.append(f"{key}: {reason}")

    seed = raw.get("seed", 42)
    sched = r.block("step_scheduler")
    r.unknown(
        "step_scheduler",
        sched,
        {
            "global_batch_size",
            "local_batch_size",
            "num_epochs",
            "max_steps",
            "ckpt_every_steps",
            "val_every_steps",
        },
    )
    if "val_every_steps" in sched:
        r.ignored.append("step_scheduler.val_every_steps: NeMo's validation is not converted")

    # ---------------------------------------------------------------- model and tokenizer
    r.unknown(
        "model",
        model,
        {
            "pretrained_model_name_or_path", "pooling", "l2_normalize", "use_liger_kernel", "use_sdpa_patching",
            "torch_dtype", "do_distributed_inbatch_negative", "trust_remote_code", "is_causal",
            "attn_implementation", "extract_submodel", "num_labels", "temperature",
        },
    )  # fmt: skip
    name = model.get("pretrained_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise r.fail("model.pretrained_model_name_or_path", "required: the backbone to fine-tune")
    for key in ("use_liger_kernel", "use_sdpa_patching"):
        if key in model:
            r.ignored.append(f"model.{key}: a kernel choice with the same arithmetic")
    if model.get("trust_remote_code"):
        r.ignored.append(
            "model.trust_remote_code: embedtune loads Llama/Ministral3 with its own classes and never runs remote code"
        )
    if "extract_submodel" in model:
        if model["extract_submodel"] != "language_model":
            raise r.fail(
                "model.extract_submodel", f"{model['extract_submodel']!r}: only language_model is supported"
            )
        r.ignored.append(
            "model.extract_submodel: embedtune takes a mistral3 checkpoint's language tower automatically"
        )
    pooling = model.get("pooling", "avg")
    normalize = model.get("l2_normalize", True)
    if pooling == "colbert":
        raise r.fail("model.pooling", "colbert (multi-vector) is not supported; use avg, cls or last")
    if pooling == "weighted_avg" and not normalize:
        raise r.fail(
            "model.pooling",
            "NeMo's weighted_avg is an unweighted sum; without l2_normalize its scale differs from any "
            "embedtune pooling. Use avg, or set l2_normalize: true (then it equals mean)",
        )
    if pooling not in ("avg", "weighted_avg", "cls", "last"):
        raise r.fail("model.pooling", f"{pooling!r}: expected avg, weighted_avg, cls or last")
    dtype = model.get("torch_dtype")
    if dtype not in (None, "bfloat16", "float32", "bf16", "fp32"):
        raise r.fail("model.torch_dtype", f"{dtype!r}: expected bfloat16 or float32")
    bf16 = dtype in ("bfloat16", "bf16")

    tok = r.block("tokenizer")
    r.target("tokenizer", tok, ("tokenizer",))
    r.unknown(
        "tokenizer",
        tok,
        {"pretrained_model_name_or_path", "add_eos_token", "add_bos_token", "padding_side", "tokenizer_backend",
         "fix_mistral_regex", "split_special_tokens"},
    )  # fmt: skip
    tok_name = tok.get("pretrained_model_name_or_path", name)
    if tok_name != name:
        raise r.fail(
            "tokenizer.pretrained_model_name_or_path",
            f"{tok_name!r} differs from the model ({name!r}); embedtune uses the model's own tokenizer",
        )
    if tok.get("add_eos_token", False):
        raise r.fail(
            "tokenizer.add_eos_token", "true is not supported: embedtune tokenises without appending EOS"
        )
    if tok.get("add_bos_token", True) is False:
        raise r.fail("tokenizer.add_bos_token", "false is not supported: embedtune keeps the tokenizer's BOS")
    for key in ("tokenizer_backend", "fix_mistral_regex", "split_special_tokens"):
        if key in tok:
            r.ignored.append(
                f"tokenizer.{key}: a NeMo tokenizer-loading option; the checkpoint's fast tokenizer is used"
            )

    # ---------------------------------------------------------------- data
    dataloader = r.block("dataloader")
    r.target("dataloader", dataloader, ("data loader",))
    r.unknown("dataloader", dataloader, {"dataset", "collate_fn", "shuffle", "num_workers"})
    dataset = dataloader.get("dataset") if isinstance(dataloader.get("dataset"), dict) else r.block("dataset")
    ds_key = "dataloader.dataset" if "dataset" in dataloader else "dataset"
    if not dataset:
        raise r.fail("dataset", "missing: the recipe names no training data")
    r.target(ds_key, dataset, ("dataset",))
    r.unknown(
        ds_key,
        dataset,
        {"model_type", "data_dir_list", "data_type", "n_passages", "seed", "do_shuffle", "use_dataset_instruction",
         "cycle_positive_docs", "max_train_samples", "train_data_select_offset", "eval_negative_size"},
    )  # fmt: skip
    model_type = str(dataset.get("model_type", "bi_encoder"))
    if (model_type == "cross_encoder") != cross:
        raise r.fail(f"{ds_key}.model_type", f"{model_type!r} does not fit recipe: {recipe_name}")
    if dataset.get("data_type", "train") != "train":
        raise r.fail(f"{ds_key}.data_type", f"{dataset['data_type']!r}: only train data sets are converted")
    if dataset.get("max_train_samples") is not None:
        raise r.fail(
            f"{ds_key}.max_train_samples",
            "not converted: give the entry as {path: ..., num_samples: N} (a fixed random subset) instead",
        )
    entries = dataset.get("data_dir_list")
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise r.fail(f"{ds_key}.data_dir_list", "required: a list of files or hf:// URIs")
    datasets: list[Any] = []
    for k, entry in enumerate(entries):
        if isinstance(entry, str):
            datasets.append({"path": entry})
        elif isinstance(entry, dict) and set(entry) <= {"path", "num_samples"} and "path" in entry:
            datasets.append(dict(entry))
        elif isinstance(entry, list) and len(entry) == 2:
            datasets.append({"path": str(entry[1]), "num_samples": int(entry[0])})
        else:
            raise r.fail(
                f"{ds_key}.data_dir_list[{k}]",
                f"{entry!r}: expected a path, {{path, num_samples}} or [num_samples, path]",
            )
    n_passages = int(dataset.get("n_passages", 5))
    data_seed = int(dataset.get("seed", 42))
    if "do_shuffle" in dataset:
        r.ignored.append(
            f"{ds_key}.do_shuffle: in NeMo it acts only with max_train_samples; embedtune shuffles every epoch"
        )
    collate = dataloader.get("collate_fn") or {}
    if not isinstance(collate, dict):
        raise r.fail("dataloader.collate_fn", f"expected a mapping, got {collate!r}")
    r.target(
        "dataloader.collate_fn",
        collate,
        ("cross-encoder collator",) if cross else ("bi-encoder collator",),
    )
    r.unknown(
        "dataloader.collate_fn",
        collate,
        {"q_max_len", "p_max_len", "query_prefix", "passage_prefix", "pad_to_multiple_of", "padding",
         "use_dataset_instruction", "rerank_max_length", "prompt_template", "train_n_passages"},
    )  # fmt: skip
    if collate.get("padding", True) not in (True, "longest"):
        raise r.fail(
            "dataloader.collate_fn.padding",
            f"{collate['padding']!r}: only longest-in-batch padding is supported",
        )
    if dataloader.get("shuffle", True) is not True:
        raise r.fail("dataloader.shuffle", "false is not supported: embedtune shuffles every epoch (seeded)")
    if "num_workers" in dataloader:
        r.ignored.append(
            "dataloader.num_workers: embedtune's loader reads memory-mapped corpora in the main process"
        )

    # ---------------------------------------------------------------- optimizer and schedule
    opt = r.block("optimizer")
    r.target("optimizer", opt, ("optimizer",))
    r.unknown(
        "optimizer",
        opt,
        {"lr", "weight_decay", "adam_w_mode", "bias_correction", "master_weights", "betas", "eps"},
    )
    if "lr" not in opt:
        raise r.fail("optimizer.lr", "required")
    lr = float(opt["lr"])
    if opt.get("_target_") == "torch.optim.Adam" or opt.get("adam_w_mode", True) is False:
        raise r.fail(
            "optimizer",
            "Adam with L2 weight decay is not supported; embedtune uses AdamW (adam_w_mode: true)",
        )
    if opt.get("bias_correction", True) is False:
        raise r.fail("optimizer.bias_correction", "false is not supported")
    optimizer: dict[str, Any] = {
        "name": "adamw",
        "lr": lr,
        "weight_decay": float(opt.get("weight_decay", 0.0)),
    }
    if "betas" in opt:
        optimizer["betas"] = [float(b) for b in opt["betas"]]
    if "eps" in opt:
        optimizer["eps"] = float(opt["eps"])
    sch = r.block("lr_scheduler")
    r.unknown(
        "lr_scheduler",
        sch,
        {"lr_warmup_steps", "lr_decay_style", "init_lr", "min_lr", "max_lr", "lr_decay_steps"},
    )
    style = sch.get("lr_decay_style", "cosine")
    if style not in ("linear", "cosine", "constant"):
        raise r.fail("lr_scheduler.lr_decay_style", f"{style!r}: linear, cosine or constant")
    if sch.get("max_lr") not in (None, lr):
        raise r.fail("lr_scheduler.max_lr", "must equal optimizer.lr")
    if sch.get("lr_decay_steps") is not None:
        raise r.fail("lr_scheduler.lr_decay_steps", "not supported: embedtune decays over the whole run")
    init_lr = float(sch.get("init_lr", 0.1 * lr))
    min_lr = float(sch.get("min_lr", 0.01 * lr))
    lr_scheduler = {
        "name": style,
        "warmup_steps": int(sch.get("lr_warmup_steps", 0)) if "lr_warmup_steps" in sch else None,
        "warmup_start_ratio": init_lr / lr,
        "min_lr_ratio": min_lr / lr,
    }
    if lr_scheduler["warmup_steps"] is None:
        # NeMo's default: min(1000, 10% of the steps); embedtune's warmup_ratio is the 10% part.
        del lr_scheduler["warmup_steps"]
        lr_scheduler["warmup_ratio"] = 0.1
        r.differences.append(
            "schedule: NeMo's default warmup is min(1000, 10% of the steps); converted as 10% (warmup_ratio: 0.1)"
        )
    clip = r.block("clip_grad_norm")
    max_grad_norm = float(clip.get("max_norm", 1.0)) if clip else 1.0

    # ---------------------------------------------------------------- checkpoint and distribution
    ckpt = r.block("checkpoint")
    r.unknown(
        "checkpoint",
        ckpt,
        {"enabled", "checkpoint_dir", "model_save_format", "save_consolidated", "restore_from"},
    )
    if ckpt.get("model_save_format", "safetensors") != "safetensors":
        raise r.fail("checkpoint.model_save_format", "only safetensors (embedtune never writes pickles)")
    ckpt_dir = str(ckpt.get("checkpoint_dir", "./output/nemo_converted"))
    output_dir = str(Path(ckpt_dir).parent) if Path(ckpt_dir).name == "checkpoints" else ckpt_dir
    dist = r.block("distributed")
    r.unknown("distributed", dist, {"strategy", "dp_size", "tp_size", "cp_size", "sequence_parallel"})
    strategy = dist.get("strategy", "fsdp2")
    if strategy not in ("fsdp2", "ddp"):
        raise r.fail("distributed.strategy", f"{strategy!r}: fsdp2 or ddp")
    for key in ("tp_size", "cp_size"):
        if dist.get(key, 1) not in (1, None, "none"):
            raise r.fail(f"distributed.{key}", f"{dist[key]}: only data parallelism (1) is supported")
    if dist.get("sequence_parallel", False):
        raise r.fail("distributed.sequence_parallel", "true is not supported")
    dist_env = r.block("dist_env")
    r.unknown("dist_env", dist_env, {"backend", "timeout_minutes"})

    # ---------------------------------------------------------------- the semantic differences
    master = bool(opt.get("master_weights", False))
    r.differences.append(
        "optimizer: NeMo runs FusedAdam over bf16 parameters"
        + (" with fp32 master weights (master_weights: true)" if master else "")
        + "; embedtune keeps fp32 weights and computes in bf16 (bf16: true) — the update arithmetic of "
        "fp32 master weights, at the memory of fp32 parameters"
        if bf16
        else "optimizer: NeMo's FusedAdam becomes torch AdamW (same update rule)"
    )
    r.differences.append(
        "schedule: same shape (warmup from init_lr to lr, then decay to min_lr, identical from step W on); "
        "within warmup embedtune's step k gets init + (lr-init)(k+1)/(W+1), NeMo's init + (lr-init)k/W"
    )
    recipe: dict[str, Any]
    if cross:
        recipe = _cross_recipe(r, raw, model, collate, datasets, n_passages, sched, optimizer, lr_scheduler,
                               max_grad_norm, bf16, output_dir, seed)  # fmt: skip
        return Conversion(recipe, "rerank", r.differences, r.ignored)

    temperature = raw.get("temperature")
    if temperature is None:
        temperature = 1.0
        r.differences.append("loss: the recipe sets no temperature; NeMo's default 1.0 is used")
    dist_neg = bool(model.get("do_distributed_inbatch_negative", False))
    if dist_neg:
        r.differences.append(
            "negatives: NeMo gathers the other ranks' passages detached (no gradient flows back to them); "
            "embedtune's cross-rank gather is differentiable, as in a single process"
        )
    else:
        r.differences.append(
            "negatives: in-batch negatives off, as NeMo (do_distributed_inbatch_negative is false or "
            "absent); embedtune's own default is on"
        )
    use_instr = bool(dataset.get("use_dataset_instruction", False)) and bool(
        collate.get("use_dataset_instruction", False)
    )
    if bool(dataset.get("use_dataset_instruction", False)) != bool(
        collate.get("use_dataset_instruction", False)
    ):
        r.differences.append(
            "instructions: dataset and collator disagree on use_dataset_instruction; as in NeMo, corpus "
            "instructions apply only when both are true (here: " + str(use_instr).lower() + ")"
        )
    q_prefix, p_prefix = collate.get("query_prefix", "") or "", collate.get("passage_prefix", "") or ""
    if bool(collate.get("use_dataset_instruction", False)):
        if q_prefix or p_prefix:
            r.differences.append(
                "prefixes: NeMo's collator drops query_prefix/passage_prefix when use_dataset_instruction is "
                "on; so does the converted recipe"
            )
        q_prefix = p_prefix = ""
    hub = [str(ds["path"]) for ds in datasets if str(ds["path"]).startswith("hf://")]
    if hub:
        r.differences.append(
            f"data: {', '.join(hub)} read through huggingface_hub (and its cache) into embedtune's "
            "memory-mapped corpus: the same rows and ids as NeMo's datasets.load_dataset"
        )
    model_out: dict[str, Any] = {
        "name_or_path": name,
        "pooling": "mean" if pooling in ("avg", "weighted_avg") else pooling,
        "normalize": bool(normalize),
        # NeMo joins with a space: f"{prefix} {text}". Baked into the prefix so inference matches.
        "query_prefix": q_prefix + " " if q_prefix else "",
        "passage_prefix": p_prefix + " " if p_prefix else "",
        "pool_instruction": True,  # NeMo pools every token, instruction included
        "dtype": "float32",
    }
    if "padding_side" in tok:
        model_out["padding_side"] = tok["padding_side"]
    if "attn_implementation" in model:
        model_out["attn_implementation"] = model["attn_implementation"]
    if model.get("is_causal") is False:
        model_out["bidirectional"] = True
    data_out: dict[str, Any] = {
        "datasets": datasets,
        "n_passages": n_passages,
        "q_max_len": int(collate.get("q_max_len", 512)),
        "p_max_len": int(collate.get("p_max_len", 512)),
        "pad_to_multiple_of": collate.get("pad_to_multiple_of"),
        "negative_selection": "first",
        "fill_negatives": "repeat",
        "cycle_positive_docs": bool(dataset.get("cycle_positive_docs", False)),
        "use_dataset_instruction": use_instr,
        "instruction_separator": " ",
        "seed": data_seed,
    }
    step_out: dict[str, Any] = {
        "global_batch_size": int(sched.get("global_batch_size", 32)),
        "num_epochs": int(sched.get("num_epochs", 1)),
    }
    if sched.get("local_batch_size") is not None:
        step_out["local_batch_size"] = int(sched["local_batch_size"])
    if sched.get("max_steps") is not None:
        step_out["max_steps"] = int(sched["max_steps"])
    if sched.get("ckpt_every_steps") is not None and ckpt.get("enabled", True):
        step_out["ckpt_every_steps"] = int(sched["ckpt_every_steps"])
    recipe = {
        "output_dir": output_dir,
        "seed": int(seed),
        "model": model_out,
        "data": data_out,
        "loss": {
            "temperature": float(temperature),
            "in_batch_negatives": dist_neg,
        },
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "step_scheduler": step_out,
        "distributed": {
            "strategy": strategy,
            "cross_device_negatives": dist_neg,
            **({"backend": dist_env["backend"]} if dist_env.get("backend") in ("nccl", "gloo") else {}),
            **(
                {"timeout_minutes": float(dist_env["timeout_minutes"])}
                if "timeout_minutes" in dist_env
                else {}
            ),
        },
        "bf16": bf16,
        "max_grad_norm": max_grad_norm,
    }
    if ckpt.get("restore_from"):
        recipe["checkpoint"] = {"resume": str(ckpt["restore_from"])}
    peft = _peft(r, raw)
    if peft is not None:
        recipe["peft"] = peft
    return Conversion(recipe, "biencoder", r.differences, r.ignored)


def _peft(r: _Reader, raw: dict[str, Any]) -> dict[str, Any] | None:
    peft = r.block("peft")
    if not peft:
        return None
    r.target("peft", peft, ("LoRA",))
    r.unknown(
        "peft",
        peft,
        {"target_modules", "exclude_modules", "match_all_linear", "dim", "alpha", "dropout", "use_triton"},
    )
    if peft.get("exclude_modules"):
        raise r.fail("peft.exclude_modules", "not supported: list the target_modules instead")
    if "use_triton" in peft:
        r.ignored.append("peft.use_triton: a kernel choice")
    out: dict[str, Any] = {"r": int(peft.get("dim", 8)), "alpha": int(peft.get("alpha", 32))}
    if "dropout" in peft:
        out["dropout"] = float(peft["dropout"])
    if peft.get("match_all_linear"):
        out["match_all_linear"] = True
    else:
        out["target_modules"] = list(peft.get("target_modules") or [])
    return out


def _cross_recipe(
    r: _Reader,
    raw: dict[str, Any],
    model: dict[str, Any],
    collate: dict[str, Any],
    datasets: list[Any],
    n_passages: int,
    sched: dict[str, Any],
    optimizer: dict[str, Any],
    lr_scheduler: dict[str, Any],
    max_grad_norm: float,
    bf16: bool,
    output_dir: str,
    seed: Any,
) -> dict[str, Any]:
    if int(model.get("num_labels", 1)) != 1:
        raise r.fail("model.num_labels", "only one relevance score (num_labels: 1) is supported")
    if float(model.get("temperature", 1.0)) != 1.0:
        raise r.fail("model.temperature", "only 1.0 is supported for a new cross-encoder head")
    if model.get("pooling", "avg") != "avg":
        raise r.fail("model.pooling", "cross-encoders are converted with NeMo's avg pooling only")
    if "temperature" in raw:
        r.ignored.append("temperature: the cross-encoder's listwise loss has no contrastive temperature")
    if "do_distributed_inbatch_negative" in model:
        r.ignored.append("model.do_distributed_inbatch_negative: cross-encoders score each pair on its own")
    if any(d.get("num_samples") is not None for d in datasets):
        raise r.fail(
            "dataset.data_dir_list",
            "num_samples entries are not supported for rerank recipes: give whole data sets",
        )
    r.differences.append(
        "cross-encoder: the score head reads the average of the hidden states as NeMo's "
        "LlamaBidirectionalForSequenceClassification does, for Llama backbones; other backbones use "
        "transformers' own head"
    )
    # The one recipe schema of every task (embedtune.training.config.TrainConfig) with `recipe: rerank`.
    step_scheduler: dict[str, Any] = {
        "global_batch_size": int(sched.get("global_batch_size", 8)),
        "num_epochs": int(sched.get("num_epochs", 1)),
    }
    for key in ("local_batch_size", "max_steps", "ckpt_every_steps"):
        if sched.get(key) is not None:
            step_scheduler[key] = int(sched[key])
    return {
        "recipe": "rerank",
        "model": {
            "name_or_path": model["pretrained_model_name_or_path"],
            "max_length": int(collate.get("rerank_max_length", 512)),
        },
        "cross_encoder": {
            "template": collate.get("prompt_template", NEMO_TEMPLATE),
            "pooling": "avg",  # NeMo's LlamaBidirectionalForSequenceClassification head
        },
        # NeMo repeats a short negative list to fill a group; so does `fill_negatives: repeat`.
        "data": {
            "datasets": [{"path": d["path"]} for d in datasets],
            "n_passages": n_passages,
            "fill_negatives": "repeat",
        },
        "output_dir": output_dir,
        "step_scheduler": step_scheduler,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "max_grad_norm": max_grad_norm,
        "bf16": bf16,
        "seed": int(seed),
    }
