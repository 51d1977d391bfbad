"""Writing a ``BiEncoder`` in a layout that every consumer loads as is.

One folder serves three readers:

* plain ``transformers``: ``config.json`` + ``model.safetensors``. A converted decoder is written with its
  stock model_type (``llama``, ``ministral3``, ...) and ``is_causal: false``, which transformers 5 honours,
  so ``AutoModel.from_pretrained`` gives the same bidirectional encoder with no remote code;
* ``sentence-transformers``: ``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json``
  (``include_prompt`` mirrors ``pool_instruction``), ``2_Normalize`` and the query/document prompts;
* embedtune: ``embedtune.json`` with every setting and where the weights came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from embedtune._atomic import staged_folder
from embedtune.errors import ConfigError
from embedtune.models.pooling import TO_SENTENCE_TRANSFORMERS
from embedtune.models.settings import EncoderSettings

if TYPE_CHECKING:
    from embedtune.models.biencoder import BiEncoder

# Our bidirectional model types -> the stock type and class that plain transformers knows.
STOCK_TYPES: dict[str, tuple[str, str]] = {
    "llama_bidirec": ("llama", "LlamaModel"),
    "ministral3_bidirec": ("ministral3", "Ministral3Model"),
}
_OUR_CONFIG_KEYS = ("pooling", "temperature")


def merged_lora_state_dict(
    peft_model: torch.nn.Module, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The base model's weights with every LoRA delta added, without touching the live model.

    ``merge_and_unload`` would modify the model being trained (and unmerging is not bit-exact), so we
    add ``get_delta_weight`` to a copy of each wrapped weight instead. ``dtype``: the floating-point
    type of the result (default: each weight's own); the sum is computed in float32 either way, so an
    fp32 result keeps a small LoRA delta that bf16 would round away.
    """
    base = peft_model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    lora_layers = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            lora_layers[name] = module
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        clean = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        merged[clean] = value.detach().clone()
    for name, module in lora_layers.items():
        key = f"{name}.weight"
        weight = merged[key].float()
        for adapter in module.active_adapters:
            if adapter in getattr(module, "lora_A", {}):
                weight = weight + module.get_delta_weight(adapter).detach().float()
        merged[key] = weight.to(dtype or merged[key].dtype)
    return _cast(merged, dtype)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


#: Precisions a model can be saved in; "auto" keeps the weights' own.
SAVE_DTYPES: dict[str, torch.dtype | None] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": None,
}


def stock_config_dict(config: Any) -> dict[str, Any]:
    """``config`` as a dict that stock transformers loads: our model types mapped to the stock ones."""
    data = config.to_dict()
    model_type = data.get("model_type")
    if model_type in STOCK_TYPES:
        data["model_type"], arch = STOCK_TYPES[model_type]
        data["architectures"] = [arch]
        for key in _OUR_CONFIG_KEYS:
            data.pop(key, None)
    data.pop("quantization_config", None)
    if getattr(config, "is_causal", True) is False:
        data["is_causal"] = False
    return data


def sentence_transformers_files(settings: EncoderSettings, dim: int) -> dict[str, Any]:
    """The sentence-transformers configuration files, as {relative path: JSON content}."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if settings.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    mode = TO_SENTENCE_TRANSFORMERS[settings.pooling]
    # The legacy boolean keys are read by every sentence-transformers version (v2 to v6).
    pooling = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": mode == "weightedmean",
        "pooling_mode_lasttoken": mode == "lasttoken",
        "include_prompt": settings.pool_instruction,
    }
    files: dict[str, Any] = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": settings.max_length, "do_lower_case": False},
        "1_Pooling/config.json": pooling,
        "config_sentence_transformers.json": {
            "model_type": "SentenceTransformer",
            "prompts": {"query": settings.query_prefix, "document": settings.passage_prefix},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if settings.normalize else "dot",
        },
    }
    if settings.normalize:
        files["2_Normalize/config.json"] = {}
    return files


def _write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


#: Files that mark a folder as an earlier save, which a new save may replace.
_SAVE_MARKERS = ("embedtune.json", "config.json", "adapter_config.json")


def _check_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a folder — choose another folder to save the model in")
    if path.is_dir() and any(path.iterdir()) and not any((path / m).is_file() for m in _SAVE_MARKERS):
        raise ConfigError(
            f"{path}: folder is not empty and is not an earlier saved model — saving replaces the whole "
            "folder, so choose an empty or new one"
        )


def save_biencoder(model: BiEncoder, path: Path, *, merge_lora: bool = True, dtype: str = "float32") -> Path:
    """Write ``model`` to ``path`` (see the module docstring for the layout).

    The weights are saved in float32 by default, whatever precision they were trained in: every
    reader (sentence-transformers, transformers, ONNX export, embedtune) then loads the same fp32
    numbers and computes the same embeddings; a bf16 file would make each of them pick its own
    precision path. ``dtype="bfloat16"`` halves the file (opt-in), ``"auto"`` keeps the weights' type.

    The folder is written beside ``path`` and swapped in only when complete
    (``embedtune._atomic.staged_folder``): a crash or a full disk leaves the previous save intact.

    Raises:
        ConfigError: ``path`` is a file, or a non-empty folder that is not an earlier save; unknown dtype.
    """
    from embedtune.models.zoo import quiet_transformers

    if dtype not in SAVE_DTYPES:
        raise ConfigError(f"save dtype: unknown {dtype!r} — use one of {', '.join(SAVE_DTYPES)}")
    target = Path(path).expanduser().absolute()
    _check_target(target)
    # PEFT re-reads the base config (a stock `llama` beside our `llama_bidirec` class): an expected
    # type-mismatch warning, and per-shard progress bars, that would only confuse a user.
    with quiet_transformers(), staged_folder(target) as staged:
        _save_biencoder(
            model,
            staged,
            merge_lora=merge_lora,
            name=target.name,
            dtype=SAVE_DTYPES[dtype],
            run_dir=target.parent,
        )
    return Path(path)


def _save_biencoder(
    model: BiEncoder,
    path: Path,
    *,
    merge_lora: bool,
    name: str,
    dtype: torch.dtype | None,
    run_dir: Path | None = None,
) -> Path:
    backbone = model.backbone
    is_peft = hasattr(backbone, "peft_config")
    settings = model.settings
    if is_peft and not merge_lora:
        backbone.save_pretrained(str(path))  # adapter_config.json + adapter_model.safetensors
        model.tokenizer.save_pretrained(str(path))
        settings.save(path)
        write_model_card(path, model, adapter=True, name=name, run_dir=run_dir)
        return path

    base = model.base_model
    current = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
    if is_peft:
        state_dict = merged_lora_state_dict(backbone, dtype)
    elif dtype is not None and dtype != current:
        state_dict = _cast(base.state_dict(), dtype)
    else:
        state_dict = None
    base.save_pretrained(str(path), state_dict=state_dict)
    # Overwrite config.json with the stock model type so plain transformers needs no remote code.
    config = stock_config_dict(base.config)
    saved = dtype or current
    if saved is not None:  # what the file holds, so that dtype="auto" loaders pick the same precision
        config["dtype"] = str(saved).removeprefix("torch.")
    _write_json(path / "config.json", config)
    model.tokenizer.save_pretrained(str(path))
    for rel, content in sentence_transformers_files(settings, model.dim).items():
        _write_json(path / rel, content)
    if is_peft:
        settings = EncoderSettings(
            **{**settings.__dict__, "source": {**settings.source, "lora_merged": True}}
        )
    settings.save(path)
    write_model_card(path, model, adapter=False, name=name, run_dir=run_dir)
    return path


#: embedtune's short model names -> the hub ids of the models they are (for model cards).
HUB_IDS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def base_model_id(name_or_path: str) -> str | None:
    """The hub id of the base model: short names mapped, ``org/name`` kept, local paths followed through
    their ``embedtune.json``; None when unknown (a random test model, a path with no record)."""
    if name_or_path in HUB_IDS:
        return HUB_IDS[name_or_path]
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        try:
            settings = json.loads((local / "embedtune.json").read_text(encoding="utf-8"))
            inner = settings.get("source", {}).get("base_model") or settings.get("source", {}).get(
                "name_or_path"
            )
        except (OSError, ValueError, AttributeError):
            return None
        return base_model_id(inner) if isinstance(inner, str) and inner != name_or_path else None
    parts = name_or_path.split("/")
    if len(parts) == 2 and all(parts) and not name_or_path.startswith((".", "~")):
        return name_or_path
    return None


def _training_facts(run_dir: Path) -> dict[str, Any] | None:
    """Data, settings and final metrics of the run that wrote ``run_dir/model`` (None when not a run)."""
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    facts: dict[str, Any] = {"config": cfg}
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        import warnings

        from embedtune.training.monitor import read_metrics, summarize_run

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                records = read_metrics(metrics_path)
            except ValueError:
                records = []
        metric = (cfg.get("validation") or {}).get("metric")
        facts["summary"] = summarize_run(records, (metric,) if metric else ())
        facts["first_validation"] = next((r for r in records if any(k.startswith("val/") for k in r)), None)
    return facts


def _training_section(facts: dict[str, Any] | None) -> str:
    if not facts:
        return ""
    cfg = facts["config"]
    get = lambda section, key: (cfg.get(section) or {}).get(key)  # noqa: E731
    datasets = [d.get("path", d) if isinstance(d, dict) else d for d in (get("data", "datasets") or [])]
    lora = cfg.get("peft") or cfg.get("lora") or (cfg.get("model") or {}).get("lora")
    rows = [
        ("training data", ", ".join(f"`{d}`" for d in datasets) or "?"),
        ("passages per query", get("data", "n_passages")),
        (
            "loss",
            f"InfoNCE, temperature {get('loss', 'temperature')}, in-batch negatives "
            f"{get('loss', 'in_batch_negatives')}",
        ),
        ("optimizer lr", get("optimizer", "lr")),
        ("schedule", f"{get('lr_scheduler', 'name')}, warmup {get('lr_scheduler', 'warmup_steps')} steps"),
        ("global batch size", get("step_scheduler", "global_batch_size")),
        (
            "max steps / epochs",
            f"{get('step_scheduler', 'max_steps')} / {get('step_scheduler', 'num_epochs')}",
        ),
        ("bf16", cfg.get("bf16")),
        ("LoRA", json.dumps(lora) if lora else "no (full fine-tuning)"),
        ("seed", cfg.get("seed")),
    ]
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    summary = facts.get("summary") or {}
    if summary.get("steps"):
        lines += [
            "",
            f"Trained for {summary['steps']} optimizer steps"
            + (
                f"; loss {summary['first_loss']:.4f} → {summary['final']['loss']:.4f}."
                if "first_loss" in summary and "loss" in summary.get("final", {})
                else "."
            ),
        ]
    first, final, best = (
        facts.get("first_validation"),
        summary.get("final_validation"),
        summary.get("best_validation"),
    )
    if final:
        data = get("validation", "data")
        keys = [k for k in final if k.startswith("val/") and isinstance(final[k], (int, float))]
        keys = [k for k in keys if "@" in k and not k.endswith("_s")][:8]
        lines += [
            "",
            f"Validation on `{data}` (full-corpus retrieval, trec_eval semantics):",
            "",
            "| metric | before training | final | best (step) |",
            "|---|---:|---:|---:|",
        ]
        for k in keys:
            b = f"{first[k]:.4f}" if first and isinstance(first.get(k), (int, float)) else ""
            bb = f"{best[k]:.4f} ({best['step']})" if best and isinstance(best.get(k), (int, float)) else ""
            lines.append(f"| {k.removeprefix('val/')} | {b} | {final[k]:.4f} | {bb} |")
    return "\n".join(lines) + "\n"


def write_model_card(
    path: Path,
    model: BiEncoder,
    *,
    adapter: bool,
    name: str | None = None,
    run_dir: Path | None = None,
) -> None:
    """A README.md with the facts a user needs to use the model correctly and to know what it is.

    Args:
        path: the folder being written.
        model: the model.
        adapter: the folder holds a PEFT adapter (loads with embedtune), not full weights.
        name: the folder's final name (for the snippets).
        run_dir: the training run's folder (``recipe.yaml``, ``metrics.jsonl``): its data, settings and
            metrics go into the card.
    """
    name = name or path.name
    s = model.settings
    source = str(s.source.get("name_or_path", "unknown"))
    hub_id = base_model_id(source)
    base = (
        f"`{hub_id}`" + (f" (embedtune name `{source}`)" if hub_id != source else "")
        if hub_id
        else f"`{source}`"
    )
    conversion = (
        f"converted from a causal decoder (`{s.source.get('model_type', '?')}`) to bidirectional attention "
        "(`config.is_causal = false`, verified at load)"
        if s.bidirectional
        else "the backbone's own attention"
    )
    qp, pp = json.dumps(s.query_prefix), json.dumps(s.passage_prefix)
    if adapter:
        front = [
            "library_name: peft",
            "pipeline_tag: feature-extraction",
            "tags: [embedtune, lora, text-embeddings]",
        ]
    else:
        front = [
            "library_name: sentence-transformers",
            "pipeline_tag: sentence-similarity",
            "tags: [embedtune, sentence-transformers, feature-extraction, text-embeddings]",
        ]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    stored = (
        "a PEFT LoRA adapter over the base model (load with embedtune, which rebuilds the encoder settings; "
        "sentence-transformers and plain transformers need the merged folder)"
        if adapter
        else "full safetensors weights"
    )
    if s.pooling == "cls":
        pool_code = "emb = hidden[:, 0]                                           # CLS pooling"
    elif s.pooling in ("last", "last_token"):
        pool_code = (
            'last = batch["attention_mask"].cumsum(1).argmax(1)          # last real token, either padding side\n'
            "emb = hidden[torch.arange(len(last)), last]"
        )
    else:
        pool_code = (
            'mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)\n'
            "emb = (hidden * mask).sum(1) / mask.sum(1)                   # mean pooling"
        )
    norm_code = "\nemb = torch.nn.functional.normalize(emb, dim=-1)" if s.normalize else ""
    caveat = []
    if s.pooling not in ("cls", "last", "last_token", "mean"):
        caveat.append(f"this model pools with `{s.pooling}`; the snippet shows mean pooling")
    if not s.pool_instruction and (s.query_prefix or s.passage_prefix):
        caveat.append("embedtune excludes the prefix tokens from pooling; the snippet does not")
    note = (
        f"\n(Approximate: {'; '.join(caveat)}. Use embedtune or sentence-transformers for the exact vectors.)\n"
        if caveat
        else ""
    )
    plain = f"""With plain transformers (no embedtune):
```python
import torch
from transformers import AutoModel, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{name}")
tok.padding_side = "{s.padding_side}"
model = AutoModel.from_pretrained("{name}").eval()  # config.json holds is_causal: false where it applies
batch = tok([{qp} + "how do vaccines work?"], padding=True, truncation=True, max_length={s.max_length},
            return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch).last_hidden_state  # (batch, seq, dim)
{pool_code}{norm_code}
```
{note}"""
    st = f"""With sentence-transformers (prompts are stored with the model):
```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("{name}")
q = model.encode(["how do vaccines work?"], prompt_name="query")
d = model.encode(["Vaccines train the immune system ..."], prompt_name="document")
```
"""
    card = f"""---
{chr(10).join(front)}
---
# Text-embedding model (embedtune)

| setting | value |
|---|---|
| base model | {base} |
| attention | {conversion} |
| pooling | `{s.pooling}`{"" if s.pool_instruction else " (prefix/instruction tokens excluded)"} |
| L2-normalised | {s.normalize} |
| embedding size | {model.dim} |
| query prefix | `{qp}` |
| passage prefix | `{pp}` |
| max tokens | {s.max_length} |
| padding side | {s.padding_side} |
| stored as | {stored} |

{_training_section(_training_facts(run_dir) if run_dir is not None else None)}
## Use it
```python
from embedtune import AutoBiEncoder
model = AutoBiEncoder.from_pretrained("{name}")
q = model.encode_queries(["how do vaccines work?"])
d = model.encode_documents(["Vaccines train the immune system ..."])
print(q @ d.T)
```
{"" if adapter else st + chr(10) + plain}"""
    (path / "README.md").write_text(card, encoding="utf-8")
