"""``run_finetune``: one recipe file, then validate → mine → evaluate before → train → evaluate after → export.

The run folder (``--output DIR``)::

    DIR/finetune.yaml          the recipe: a normal training recipe (``embedtune train DIR/finetune.yaml``
                               trains it) plus a ``pipeline:`` block that ``train`` ignores
    DIR/data/split.json        which training queries were held out (when no --eval is given)
    DIR/data/heldout/          the held-out queries as a BEIR folder (whole corpus, test qrels)
    DIR/data/train_mined.json  the training queries with their mined hard negatives (corpus-ID JSON)
    DIR/checkpoints/           training checkpoints (a killed run resumes from the latest)
    DIR/model/                 the fine-tuned model
    DIR/eval/{before,after}.json   metrics, 95% bootstrap CIs and per-query values
    DIR/onnx/                  the verified ONNX export (--export onnx)
    DIR/stages/<stage>.json    stage markers: a stage with an unchanged input key is skipped on rerun

The recipe is written once; a rerun reads it back, so edits to it are honoured (and change the keys of
the stages they affect).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embedtune._atomic import write_json, write_text
from embedtune.config import apply_overrides, read_yaml
from embedtune.errors import ConfigError, UsageError
from embedtune.finetune.settings import ENCODER_TYPES, choose_settings
from embedtune.finetune.split import carve_heldout
from embedtune.finetune.stages import Stage, hash_inputs, hash_path

__all__ = ["FinetuneOptions", "FinetuneResult", "run_finetune"]

RECIPE_NAME = "finetune.yaml"
STAGES = ("validate", "mine", "eval_before", "train", "eval_after", "export")
K_VALUES = (1, 10, 100)


@dataclass
class FinetuneOptions:
    """What ``embedtune finetune`` was asked to do."""

    model: str
    data: str
    output: str
    split: str = "train"
    eval: str | None = None
    eval_split: str = "test"
    export: str | None = None
    heldout_fraction: float = 0.1
    seed: int = 13
    device: str | None = None
    overrides: Sequence[str] = ()
    """``key.path=value`` applied to the chosen recipe when it is first written."""
    encode_batch_size: int = 32
    ci_resamples: int = 1000


@dataclass
class FinetuneResult:
    """What a finished (or stopped) run produced."""

    exit_code: int
    model_dir: Path | None
    recipe: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None


def _say(line: str) -> None:
    print(f"[finetune] {line}", flush=True)


def _args_block(opts: FinetuneOptions) -> dict[str, Any]:
    return {
        "model": opts.model,
        "data": str(Path(opts.data).resolve()),
        "split": opts.split,
        "eval": str(Path(opts.eval).resolve()) if opts.eval else None,
        "eval_split": opts.eval_split if opts.eval else None,
        "heldout_fraction": None if opts.eval else opts.heldout_fraction,
    }


def _fast_bf16(device: str) -> bool:
    if device == "cuda":
        return True
    from embedtune.machine import cpu_info

    _, flags = cpu_info()
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))


#: The weights' precision of both evaluations and of mining. Training saves the fine-tuned model in
#: float32 (a bfloat16 LoRA base is merged and saved in float32), so "after" is what the user gets; the
#: base is loaded in float32 too — not in its checkpoint's type (transformers' "auto": bfloat16 for most
#: hub decoders) — so that before and after differ by the training only.
EVAL_DTYPE = "float32"


def _model_kwargs(model_block: dict[str, Any]) -> dict[str, Any]:
    """``AutoBiEncoder.from_pretrained`` keyword arguments from the recipe's ``model:`` block.

    Not ``dtype``: see ``EVAL_DTYPE``.
    """
    keys = (
        "pooling",
        "normalize",
        "query_prefix",
        "passage_prefix",
        "pool_instruction",
        "max_length",
        "padding_side",
        "bidirectional",
        "attn_implementation",
    )
    return {k: model_block[k] for k in keys if model_block.get(k) is not None}


# ------------------------------------------------------------------------------------------ the recipe
def _write_recipe(opts: FinetuneOptions, out: Path, data: Any, num_train: int, device: str) -> Path:
    """Choose the settings (printed with reasons) and write ``DIR/finetune.yaml`` atomically."""
    from embedtune.models import AutoBiEncoder
    from embedtune.models.biencoder import set_attention_dropout
    from embedtune.training.config import load_train_config

    probe = AutoBiEncoder.from_pretrained(opts.model, device="cpu", verify=False)
    config = probe.config
    n_params = sum(p.numel() for p in probe.parameters())
    model_type = str(getattr(config, "model_type", ""))
    try:  # the probe is thrown away: setting its dropout only asks whether embedtune can
        own_attention_dropout = set_attention_dropout(probe.backbone, 0.0)
    except ConfigError:
        own_attention_dropout = None
    del probe
    settings = choose_settings(
        model_type=model_type,
        num_parameters=n_params,
        num_train=num_train,
        device=device,
        fast_bf16=_fast_bf16(device),
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        attention_dropout=own_attention_dropout,
    )
    kind = "encoder" if model_type in ENCODER_TYPES else "decoder (LoRA)"
    _say(
        f"settings for {opts.model} ({model_type}, {n_params / 1e6:.1f}M parameters, {kind}) "
        f"and {num_train} training queries:"
    )
    for choice in settings.choices:
        print(choice.line())
    recipe: dict[str, Any] = {
        "output_dir": str(out.resolve()),
        "seed": opts.seed,
        "model": {"name_or_path": opts.model, **settings.recipe.pop("model", {})},
        **({"peft": settings.recipe.pop("peft")} if "peft" in settings.recipe else {}),
        "data": {
            "datasets": [{"path": str((out / "data" / "train_mined.json").resolve())}],
            **settings.recipe.pop("data"),
        },
        **settings.recipe,
    }
    recipe.setdefault("checkpoint", {}).update({"keep_last": 1, "resume": "auto"})
    if device == "cpu":
        recipe["device"] = "cpu"
    recipe["pipeline"] = {
        "inputs": _args_block(opts),
        "mining": dict(settings.mining),
        "stages": list(STAGES),
    }
    recipe = apply_overrides(recipe, list(opts.overrides))  # pipeline.mining.* set the mining stage
    if recipe["pipeline"].get("inputs") != _args_block(opts):
        raise UsageError(
            "--set pipeline.inputs...: the inputs are the command's options; give them as options"
        )
    load_train_config(recipe)  # the recipe must be one `embedtune train` accepts
    header = (
        "# Written by `embedtune finetune`: a training recipe (`embedtune train THIS_FILE` trains it)\n"
        "# plus the pipeline block that `embedtune finetune` runs (ignored by train). Edit and rerun:\n"
        "# stages whose inputs changed run again.\n"
    )
    path = out / RECIPE_NAME
    write_text(path, header + yaml.safe_dump(recipe, sort_keys=False))
    _say(f"recipe: {path}")
    return path


def _read_recipe(opts: FinetuneOptions, path: Path) -> dict[str, Any]:
    raw = read_yaml(path)
    recorded = (raw.get("pipeline") or {}).get("inputs")
    if recorded != _args_block(opts):
        raise UsageError(
            f"--output {opts.output}: holds a finetune of other inputs ({path}: {json.dumps(recorded)}); "
            "give another --output folder, or delete that one to start again"
        )
    if opts.overrides:
        _say(f"recipe exists ({path}): --set is ignored; edit the recipe instead")
    return raw


# ---------------------------------------------------------------------------------------- the stages
def _write_beir(folder: Path, corpus: Any, queries: dict[str, str], qrels: dict[str, list[str]]) -> None:
    """A BEIR folder (whole corpus, ``qrels/test.tsv``), written beside then swapped in."""
    from embedtune._atomic import staged_folder

    with staged_folder(folder) as tmp:
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as f:
            ids = list(corpus.ids)
            for start in range(0, len(ids), 4096):
                rows = list(range(start, min(start + 4096, len(ids))))
                for row, text in zip(rows, corpus.texts(rows), strict=True):
                    f.write(json.dumps({"_id": ids[row], "title": "", "text": text}) + "\n")
        with open(tmp / "queries.jsonl", "w", encoding="utf-8") as f:
            for qid, text in queries.items():
                f.write(json.dumps({"_id": qid, "text": text}) + "\n")
        (tmp / "qrels").mkdir()
        with open(tmp / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for qid, docs in qrels.items():
                for d in docs:
                    f.write(f"{qid}\t{d}\t1\n")


def _validate(opts: FinetuneOptions, out: Path, data: Any) -> dict[str, Any]:
    """Check the evaluation data, or carve the held-out split; return the stage's summary."""
    if opts.eval:
        from embedtune.eval.datasets import load_eval_set

        eval_set = load_eval_set(opts.eval, opts.eval_split)
        _say(f"evaluation data: {opts.eval} ({opts.eval_split}), {len(eval_set.queries)} queries")
        return {
            "train": list(range(len(data))),
            "heldout": [],
            "eval": opts.eval,
            "eval_split": opts.eval_split,
        }
    split = carve_heldout(
        data.queries,
        [data.positives(i).tolist() for i in range(len(data))],
        fraction=opts.heldout_fraction,
        seed=opts.seed,
    )
    ids = list(data.corpus.ids)
    queries: dict[str, str] = {}
    qrels: dict[str, list[str]] = {}
    for i in split.heldout:
        qid = f"{data.query_ids[i]}" if data.query_ids[i] not in queries else f"{data.query_ids[i]}#{i}"
        queries[qid] = data.queries[i]
        qrels[qid] = [ids[int(r)] for r in data.positives(i)]
    _write_beir(out / "data" / "heldout", data.corpus, queries, qrels)
    write_json(
        out / "data" / "split.json",
        {"train": split.train, "heldout": split.heldout, "description": split.describe()},
    )
    _say(split.describe())
    return {
        "train": split.train,
        "heldout": split.heldout,
        "eval": str(out / "data" / "heldout"),
        "eval_split": "test",
        "description": split.describe(),
    }


def _write_unmined(
    data: Any, split: dict[str, Any], mining: dict[str, Any], out: Path, opts: FinetuneOptions
) -> dict[str, Any]:
    """The training queries without negatives (``data.n_passages`` 1: in-batch negatives only)."""
    from embedtune.mining import MiningSettings, unmined, write_mined

    train = data.select(split["train"])
    result = unmined(train, MiningSettings(**mining), "data.n_passages is 1: in-batch negatives only")
    paths = write_mined(
        train, result, out / "data" / "train_mined.json", input_path=opts.data, output_format="corpus_id"
    )
    _say(
        f"mine: not needed (data.n_passages 1 trains on in-batch negatives only); wrote the {len(train)} "
        "training queries as they are"
    )
    return {"written": [str(p) for p in paths], "negatives": 0, "queries": len(train), "mined": False}


def _mine(
    encoder: Any,
    data: Any,
    split: dict[str, Any],
    mining: dict[str, Any],
    cfg: Any,
    out: Path,
    opts: FinetuneOptions,
) -> dict[str, Any]:
    """Hard negatives for the training queries from ``encoder``; held-out positives never kept."""
    from embedtune.eval.cache import default_cache_dir
    from embedtune.mining import MiningSettings, mine_hard_negatives, write_mined

    train = data.select(split["train"])
    settings = MiningSettings(**mining)
    result = mine_hard_negatives(
        encoder,
        train,
        settings,
        batch_size=opts.encode_batch_size,
        max_length=cfg.data.p_max_len,
        query_max_length=cfg.data.q_max_len,
        cache_dir=default_cache_dir(),
    )
    held = {int(r) for i in split["heldout"] for r in data.positives(i)}
    dropped = 0
    for ex in result.examples:
        keep = [k for k, row in enumerate(ex.negatives) if int(row) not in held]
        dropped += len(ex.negatives) - len(keep)
        ex.negatives = [ex.negatives[k] for k in keep]
        ex.negative_scores = [ex.negative_scores[k] for k in keep]
    paths = write_mined(
        train, result, out / "data" / "train_mined.json", input_path=opts.data, output_format="corpus_id"
    )
    counts = [len(ex.negatives) for ex in result.examples]
    margin = "off" if settings.margin is None else f"{settings.margin_type} {settings.margin}"
    _say(
        f"mined {sum(counts)} hard negatives for {len(counts)} queries (window {settings.range_start}:"
        f"{settings.range_end}, margin {margin}); {dropped} negatives that are held-out documents left out"
    )
    empty = sum(1 for c in counts if c == 0)
    if empty * 2 > len(counts):
        window = len(counts) * (settings.range_end - settings.range_start)
        _say(
            f"warning: {empty} of {len(counts)} training queries have no mined negative (the margin dropped "
            f"{result.stats.get('candidates_dropped_by_margin', '?')} of {window} window candidates: the "
            "miner scores documents alike); they train on random fills. Mine with a retriever "
            "(--set pipeline.mining.model=NAME), relax pipeline.mining.margin, or set data.n_passages=1"
        )
    return {"written": [str(p) for p in paths], "negatives": sum(counts), "queries": len(counts)}


def _evaluate(
    encoder: Any,
    split: dict[str, Any],
    cfg: Any,
    out: Path,
    name: str,
    opts: FinetuneOptions,
    corpus: Any = None,
) -> dict[str, Any]:
    """Evaluate on the held-out data; ``corpus``: the training corpus, when the split was carved from it.

    A carved split's BEIR folder holds a copy of the training corpus. Its file differs from the
    training file, so its content fingerprint (the embedding cache's key) does too: evaluating the
    folder re-encoded every document that mining had just encoded with the same base model (115 s of
    2,249 MiniLM documents on a 2-core CPU). The same texts in the same order are evaluated from the
    training corpus instead, so "before" reuses mining's embeddings; the folder stays for ``embedtune
    eval`` and gives the same numbers.
    """
    import dataclasses

    from embedtune.eval.cache import default_cache_dir
    from embedtune.eval.datasets import load_eval_set
    from embedtune.eval.retrieval import run_evaluation
    from embedtune.eval.stats import metric_intervals

    eval_set = load_eval_set(split["eval"], split["eval_split"])
    if corpus is not None:
        if list(corpus.ids) != list(eval_set.corpus.ids):
            raise RuntimeError(f"{split['eval']}: its corpus is not the training corpus it was carved with")
        eval_set = dataclasses.replace(eval_set, corpus=corpus)
    result = run_evaluation(
        encoder,
        eval_set,
        K_VALUES,
        batch_size=opts.encode_batch_size,
        max_length=cfg.model.max_length,
        cache_dir=default_cache_dir(),  # reuses the corpus embeddings of mining (same base model)
    )
    ci = (
        metric_intervals(
            result.per_query, ["ndcg@10", "recall@10", "recall@100"], n_resamples=opts.ci_resamples, seed=0
        )
        if opts.ci_resamples
        else {}
    )
    dtype = str(next(encoder.parameters()).dtype).removeprefix("torch.")
    record = {
        "dtype": dtype,
        "metrics": result.metrics,
        "ci": ci,
        "num_queries": result.num_queries,
        "num_docs": result.num_docs,
        "per_query": result.per_query,
    }
    write_json(out / "eval" / f"{name}.json", record)
    return {"metrics": result.metrics, "ci": ci, "num_queries": result.num_queries, "dtype": dtype}


def _table(before: dict[str, Any], after: dict[str, Any]) -> str:
    rows = [
        ("NDCG@10", "ndcg@10"),
        ("Recall@10", "recall@10"),
        ("Recall@100", "recall@100"),
        ("MRR@10", "mrr@10"),
    ]
    lines = [f"{'metric':<11} {'before':>8} {'after':>8} {'change':>8}   after 95% CI"]
    for title, key in rows:
        b, a = before["metrics"].get(key), after["metrics"].get(key)
        if b is None or a is None:
            continue
        ci = after.get("ci", {}).get(key)
        span = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        lines.append(f"{title:<11} {b:>8.4f} {a:>8.4f} {a - b:>+8.4f}   {span}")
    return "\n".join(lines)


def _set_aside(folder: Path) -> None:
    """Rename an earlier run's checkpoints out of the way (never deleted: nothing saved is lost)."""
    if folder.is_dir() and any(folder.iterdir()):
        aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        _say(f"the recipe or data changed since the last training: earlier checkpoints moved to {aside}")


def run_finetune(opts: FinetuneOptions, *, train_fn: Callable[[Any], Any] | None = None) -> FinetuneResult:
    """Run (or resume) a whole finetune; see the module docstring for the folder it fills.

    Args:
        opts: the command's options.
        train_fn: the training entry point (default ``embedtune.training.recipe.train``).

    Returns:
        The result; ``exit_code`` 0 when every stage finished, else the training's exit code.
    """
    import torch

    from embedtune.data.formats import read_training_file
    from embedtune.models import AutoBiEncoder
    from embedtune.training.config import load_train_config

    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe_path = out / RECIPE_NAME
    ran: list[str] = []
    skipped: list[str] = []

    # The data is read (and validated, naming file/line/field) before anything else.
    data = read_training_file(opts.data, split=opts.split)
    data_key = hash_inputs(hash_path(opts.data), opts.split, _args_block(opts))
    if recipe_path.is_file():
        raw = _read_recipe(opts, recipe_path)
        _say(f"recipe: {recipe_path} (existing; edits are honoured)")
    else:
        n_train = len(data) if opts.eval else len(data) - max(1, round(opts.heldout_fraction * len(data)))
        _write_recipe(opts, out, data, n_train, device)
        raw = read_yaml(recipe_path)
    pipeline = raw.get("pipeline") or {}
    cfg = load_train_config(recipe_path)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    train_recipe = {k: v for k, v in raw.items() if k != "pipeline"}

    def stage(name: str, key: str) -> Stage:
        s = Stage(out, name, key)
        (skipped if s.done() else ran).append(name)
        if s.done():
            _say(f"{name}: done earlier with the same inputs — skipped")
        else:
            _say(f"{name}: running")
        return s

    encoders: dict[str, Any] = {}

    def base_encoder() -> Any:
        if "base" not in encoders:
            encoders["base"] = AutoBiEncoder.from_pretrained(
                cfg.model.name_or_path,
                device=device,
                dtype=EVAL_DTYPE,
                **_model_kwargs(train_recipe.get("model", {})),
            )
            encoders["base"].eval()
        return encoders["base"]

    # 1. validate: the evaluation data, or the held-out split.
    s_val = stage("validate", hash_inputs("validate", data_key, opts.seed))
    split = s_val.summary() if s_val.done() else None
    if split is None:
        split = _validate(opts, out, data)
        s_val.finish(split)
    elif split.get("description"):
        _say(split["description"])

    # 2. mine hard negatives with the base model (or pipeline.mining.model); none for in-batch only.
    mining = dict(pipeline.get("mining") or {})
    miner_name = mining.pop("model", None)
    model_block = train_recipe.get("model", {})
    s_mine = stage(
        "mine",
        hash_inputs(
            "mine",
            s_val.key,
            model_block,
            mining,
            miner_name,
            cfg.data.n_passages > 1,
            cfg.data.p_max_len,
            cfg.data.q_max_len,
        ),
    )
    if not s_mine.done():
        if cfg.data.n_passages <= 1:
            s_mine.finish(_write_unmined(data, split, mining, out, opts))
        else:
            if miner_name:
                _say(f"mining with {miner_name} (pipeline.mining.model), not the base model")
                miner = AutoBiEncoder.from_pretrained(str(miner_name), device=device, dtype=EVAL_DTYPE)
                miner.eval()
            else:
                miner = base_encoder()
            s_mine.finish(_mine(miner, data, split, mining, cfg, out, opts))
            del miner

    # 3. evaluate the base model. A carved split is evaluated over the training corpus itself, whose
    # document embeddings mining has just cached (see _evaluate).
    carved_corpus = data.corpus if split["heldout"] else None
    eval_key = hash_inputs(split["eval"], split["eval_split"], s_val.key, cfg.model.max_length)
    # EVAL_DTYPE in the key: earlier runs evaluated the base in its checkpoint's type; those are redone.
    s_before = stage("eval_before", hash_inputs("eval_before", eval_key, model_block, EVAL_DTYPE))
    before = s_before.summary() or None
    if before is None:
        before = _evaluate(base_encoder(), split, cfg, out, "before", opts, carved_corpus)
        s_before.finish(before)
    encoders.clear()

    # 4. train (resumes from the latest checkpoint when killed).
    s_train = stage("train", hash_inputs("train", s_mine.key, train_recipe))
    model_dir = out / "model"
    if not s_train.done():
        started = Stage(out, "train.started", s_train.key)
        if started.marker() is not None and not started.done():
            _set_aside(cfg.checkpoint_dir)
        started.finish()
        if train_fn is None:
            from embedtune.training.recipe import train as train_fn
        result = train_fn(cfg)
        if result.exit_code != 0:
            _say(f"training stopped (exit {result.exit_code}); rerun the same command to resume")
            return FinetuneResult(result.exit_code, None, recipe_path, ran, skipped, before["metrics"])
        model_dir = Path(result.model_dir)
        s_train.finish({"model_dir": str(model_dir), "steps": result.state.step})
    else:
        model_dir = Path(s_train.summary().get("model_dir", model_dir))

    # 5. evaluate the fine-tuned model.
    s_after = stage("eval_after", hash_inputs("eval_after", eval_key, s_train.key))
    after = s_after.summary() or None
    if after is None:
        from embedtune.export.runtime import load_encoder

        tuned = load_encoder(str(model_dir), "torch", device=device, dtype=EVAL_DTYPE)
        tuned.eval()
        after = _evaluate(tuned, split, cfg, out, "after", opts, carved_corpus)
        s_after.finish(after)
    where = (
        "the held-out split carved from the training data"
        if not opts.eval
        else f"{opts.eval} ({opts.eval_split})"
    )
    # A stage done before precisions were recorded has none: said so, not printed as "None".
    weights = [r.get("dtype") or "not recorded" for r in (before, after)]
    precision = (
        ""
        if weights == ["not recorded"] * 2
        else f" (weights in {weights[0]}, before and after)"
        if weights[0] == weights[1]
        else f" (weights: before {weights[0]}, after {weights[1]})"
    )
    _say(f"retrieval on {where}, {after['num_queries']} queries{precision}:")
    print(_table(before, after))

    # 6. export (verified against PyTorch).
    if opts.export == "onnx":
        s_export = stage("export", hash_inputs("export", s_train.key, "onnx"))
        if not s_export.done():
            from embedtune.export.onnx import describe, export_onnx

            exported = export_onnx(str(model_dir), out / "onnx", verify=True, log=_say)
            _say(describe(exported))
            s_export.finish({"folder": str(out / "onnx")})
    _say(f"model: {model_dir}")
    sys.stdout.flush()
    return FinetuneResult(0, model_dir, recipe_path, ran, skipped, before["metrics"], after["metrics"])
