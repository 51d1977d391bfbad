"""``embedtune demo``: the main job — fine-tune a bundled model on the bundled data, before/after scores.

By default: SmolLM2-135M-Instruct converted to a bidirectional encoder, LoRA, trained on
``data/scifact-mini`` (SciFact subset) and evaluated on its held-out test split before and after
(NDCG@10, Recall@10); the merged model is saved. ``--recipe minilm_demo`` does the same for MiniLM.

The job promises 10 minutes, and the machines it runs on differ by 2x and more (AMX, AVX-512 BF16, or
AVX2 only, where bf16 is emulated and ~100x slower than fp32). So before training it *measures* this
machine — the model's encoding speed in fp32, and in bf16 where the CPU has bf16 instructions — and
plans the run: the faster precision; a held-out evaluation sized so that the two evaluations (before
and after, on the same documents) take at most a third of the budget; the rest for training. The plan
is printed with its reasons, and what was really spent is printed at the end. ``--no-plan`` runs the
recipe as written. Settings given on the command line are never re-planned.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELP = "the main job: fine-tune the bundled SmolLM2-135M (LoRA) on bundled data, evaluate before/after"

# The file that says "embedtune demo made this folder": only such a folder's checkpoints are ever deleted.
MARKER = ".embedtune-demo"
BUDGET_S = 600.0  # the promise: the whole job in 10 minutes
EVAL_SHARE = 1 / 3  # the before + after evaluations take at most this share of what is left
MIN_EVAL_LENGTH = 128  # documents are never cut shorter than this for evaluation
MIN_DISTRACTORS = 200  # a smaller corpus keeps every relevant document plus at least this many others
TRAIN_COST = 3.0  # a training step costs about 3 forward passes of its tokens (forward + backward)
MIN_STEPS = 40  # fewer predicted steps than this: train on shorter passages (down to MIN_TRAIN_LENGTH)
MIN_TRAIN_LENGTH = 64
RESERVE_S = 30.0  # loading the model for training, merging LoRA and saving at the end
# A LoRA run that fits fewer steps than the recipe's takes larger ones: its learning rate is multiplied
# by MAX_LR_SCALE when at most half the recipe's steps fit, by 1 when all fit, linearly in between.
# Chosen on a validation split carved from the training data (benchmarks/demo_lr.py: at ~40 of 80 steps
# 4x the recipe's rate beat 2x and 1x), never on the held-out split the demo reports.
MAX_LR_SCALE = 4.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments: ``--recipe``, ``--no-plan`` and overrides."""
    parser.add_argument(
        "--recipe",
        default="smollm2_135m_demo",
        help="a shipped recipe name or YAML file (default: smollm2_135m_demo; also: minilm_demo)",
    )
    parser.add_argument(
        "--no-plan",
        action="store_true",
        help="run the recipe as written: no measuring, no re-planned precision or evaluation set",
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=BUDGET_S / 60,
        help="the whole job's wall-time budget that the plan fits (default: 10)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as for `embedtune train`"
    )


def check(args: argparse.Namespace) -> None:
    """The budget, the recipe (closest shipped name when misspelled) and the overrides, before torch."""
    from embedtune.commands import _checks

    if not args.budget_minutes > 0:
        raise _checks.UsageError(f"--budget-minutes {args.budget_minutes:g}: must be > 0 (default 10)")
    _checks.load_recipe(args.recipe, args.overrides)


def _bundled_path(path: str) -> str:
    """Relative data paths resolve against the current folder, else against the source checkout."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return path
    root = Path(__file__).resolve().parents[2]  # the repository root of a source checkout
    return str(root / p) if (root / p).exists() else path


# ------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class Measured:
    """What the demo timed on this machine before planning.

    Attributes:
        tokens_per_s: encoding speed (tokens/s, forward pass without gradients) per precision timed,
            ``"fp32"`` and, where the CPU has bf16 instructions, ``"bf16"``.
        elapsed_s: seconds already spent (configuration, model load, measuring).
        notes: what was measured, or why a precision was not timed.
    """

    tokens_per_s: dict[str, float]
    elapsed_s: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalShape:
    """The held-out set's size in tokens, as the tokenizer counts them (before truncation)."""

    query_tokens: int  # all queries together
    doc_tokens: tuple[int, ...]  # one entry per document
    n_relevant: int  # documents judged relevant for some query (always kept)
    n_queries: int


@dataclass
class Plan:
    """The planned run: precision, evaluation set, training budget, and why."""

    precision: str
    eval_max_length: int
    eval_docs: int  # documents searched (all, or relevant + distractors)
    all_docs: int  # documents in the held-out corpus
    eval_s: float  # predicted seconds for one evaluation
    train_s: float  # seconds left for training steps
    step_s: float  # predicted seconds per training step
    steps: int  # predicted training steps (capped by the recipe's max_steps)
    p_max_len: int  # training passage length
    time_budget_s: float  # what the training loop may spend (its evaluations included)
    needed_s: float  # the whole job at the cheapest plan with MIN_STEPS steps, at the measured speed
    reasons: list[str] = field(default_factory=list)
    lr_scale: float = 1.0  # the LoRA learning rate's factor for a run shorter than the recipe's

    @property
    def fits(self) -> bool:
        """Whether the budget leaves room for training at all (one step or more)."""
        return self.steps >= 1


def _eval_tokens(shape: EvalShape, max_length: int, n_docs: int) -> float:
    """Tokens of one evaluation: all queries + ``n_docs`` documents truncated to ``max_length``."""
    cut = [min(n, max_length) for n in shape.doc_tokens]
    mean = sum(cut) / max(len(cut), 1)
    return shape.query_tokens + (sum(cut) if n_docs >= len(cut) else mean * n_docs)


def lr_scale_for(steps: int, max_steps: int) -> float:
    """The LoRA learning rate's factor for ``steps`` of the recipe's ``max_steps``: 1 when all fit,
    ``MAX_LR_SCALE`` at half of them or fewer, linear in between."""
    if steps >= max_steps:
        return 1.0
    short = min(1.0, 2.0 * (1.0 - steps / max_steps))  # 0 at max_steps, 1 at half of them
    return 1.0 + (MAX_LR_SCALE - 1.0) * short


def plan_demo(
    measured: Measured,
    shape: EvalShape,
    *,
    max_length: int,
    train_tokens_per_step: Callable[[int], float],
    p_max_len: int,
    max_steps: int,
    budget_s: float = BUDGET_S,
    lora_lr: float | None = None,
) -> Plan:
    """Plan the demo from measurements: precision, evaluation set, training time. Pure: no clock, no I/O.

    Args:
        measured: encoding speed per precision and the time already spent.
        shape: the held-out set's token counts.
        max_length: the recipe's document length for evaluation.
        train_tokens_per_step: tokens one training step processes (queries + passages, padded) when
            passages are cut to the given length.
        p_max_len: the recipe's training passage length.
        max_steps: the recipe's step limit.
        budget_s: the whole job's wall-time promise.
        lora_lr: the recipe's learning rate when it trains LoRA adapters (scaled up for a run shorter
            than the recipe's); None: full fine-tuning, the rate is kept.

    Returns:
        The plan; its ``reasons`` say why each choice was made.
    """
    precision = max(measured.tokens_per_s, key=lambda p: measured.tokens_per_s[p])
    tps = measured.tokens_per_s[precision]
    reasons = []
    if len(measured.tokens_per_s) > 1:
        other = min(measured.tokens_per_s, key=lambda p: measured.tokens_per_s[p])
        reasons.append(
            f"precision {precision}: {tps / measured.tokens_per_s[other]:.2f}x the speed of {other}, measured"
        )
    else:
        reasons.append(f"precision {precision}: the only one worth timing here")
    left = budget_s - measured.elapsed_s - RESERVE_S
    per_eval = EVAL_SHARE * left / 2

    # Cheaper evaluations, most faithful first: shorter documents (down to MIN_EVAL_LENGTH), then a
    # smaller corpus (every relevant document + MIN_DISTRACTORS others), then both further (64 tokens,
    # half the distractors). The first that fits its share of the budget is taken.
    n_all = len(shape.doc_tokens)
    floor = min(n_all, shape.n_relevant + MIN_DISTRACTORS)
    low = min(n_all, shape.n_relevant + MIN_DISTRACTORS // 2)

    def fit_docs(length: int, at_least: int) -> int:
        mean = (_eval_tokens(shape, length, n_all) - shape.query_tokens) / max(n_all, 1)
        return max(at_least, min(n_all, int((per_eval * tps - shape.query_tokens) / mean)))

    ladder = [(n, n_all) for n in range(max_length, MIN_EVAL_LENGTH - 1, -32)] or [(max_length, n_all)]
    short = min(max_length, MIN_EVAL_LENGTH)
    ladder += [(short, fit_docs(short, floor)), (64, fit_docs(64, floor)), (64, fit_docs(64, low))]
    length, n_docs = next(
        ((n, d) for n, d in ladder if _eval_tokens(shape, n, d) / tps <= per_eval), ladder[-1]
    )
    if length < max_length:
        reasons.append(
            f"evaluation documents cut to {length} tokens (recipe: {max_length}) so that the before and "
            f"after evaluations fit {EVAL_SHARE:.0%} of the time left"
        )
    if n_docs < n_all:
        reasons.append(
            f"evaluation corpus: {n_docs} of {n_all} documents — every relevant one ({shape.n_relevant}) plus "
            f"{n_docs - shape.n_relevant} fixed random others, the same set before and after (scores on a "
            "smaller corpus are higher than on the full one; the gain is what compares)"
        )
    if length == max_length and n_docs == n_all:
        reasons.append(f"evaluation: the full held-out set at {length} tokens fits the budget")
    if _eval_tokens(shape, length, n_docs) / tps > per_eval:
        reasons.append(
            "this machine is too slow for the 10-minute promise even with the cheapest honest evaluation"
        )
    eval_s = _eval_tokens(shape, length, n_docs) / tps
    train_s = max(0.0, left - 2 * eval_s)
    p_len = p_max_len
    step_s = TRAIN_COST * train_tokens_per_step(p_len) / tps
    while train_s // step_s < min(MIN_STEPS, max_steps) and p_len > MIN_TRAIN_LENGTH:
        p_len = max(MIN_TRAIN_LENGTH, p_len - 32)
        step_s = TRAIN_COST * train_tokens_per_step(p_len) / tps
    steps = min(max_steps, int(train_s // step_s))
    if p_len < p_max_len:
        reasons.append(
            f"training passages cut to {p_len} tokens (recipe: {p_max_len}) so that more steps fit "
            f"(at {p_max_len} tokens: ~{int(train_s // (TRAIN_COST * train_tokens_per_step(p_max_len) / tps))})"
        )
    reasons.append(
        f"training: {train_s:.0f} s left after set-up and both evaluations, ~{step_s:.1f} s per step "
        f"predicted ({TRAIN_COST:g}x a forward pass) -> ~{steps} steps (recipe: up to {max_steps})"
    )
    lr_scale = 1.0
    if lora_lr is not None and 0 < steps < max_steps:
        lr_scale = lr_scale_for(steps, max_steps)
        reasons.append(
            f"LoRA learning rate {lora_lr * lr_scale:.2g} (recipe: {lora_lr:.2g} for {max_steps} steps): ~{steps} "
            f"steps take larger ones, x{lr_scale:.2g} (x{MAX_LR_SCALE:g} at half the recipe's steps or fewer; "
            "chosen on a validation split carved from the training data, benchmarks/demo_lr.py)"
        )
    needed = measured.elapsed_s + 2 * eval_s + min(MIN_STEPS, max_steps) * step_s + RESERVE_S
    return Plan(
        precision=precision,
        eval_max_length=length,
        eval_docs=n_docs,
        all_docs=n_all,
        eval_s=eval_s,
        train_s=train_s,
        step_s=step_s,
        steps=steps,
        p_max_len=p_len,
        time_budget_s=left,
        needed_s=needed,
        reasons=reasons,
        lr_scale=lr_scale,
    )


def _overridden(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def apply_plan(cfg: Any, plan: Plan, overrides: list[str]) -> None:
    """Write the plan into the training config, leaving alone every key set on the command line."""

    def put(obj: Any, attr: str, key: str, value: Any) -> None:
        if not _overridden(overrides, key):
            setattr(obj, attr, value)

    bf16 = plan.precision == "bf16"
    put(cfg, "bf16", "bf16", bf16)
    if not bf16 and str(cfg.model.dtype) in ("bfloat16", "torch.bfloat16"):
        put(cfg.model, "dtype", "model.dtype", "float32")  # bf16 weights run bf16 matmuls
    put(cfg.data, "p_max_len", "data.p_max_len", plan.p_max_len)
    if plan.lr_scale != 1.0:
        put(cfg.optimizer, "lr", "optimizer.lr", cfg.optimizer.lr * plan.lr_scale)
    sched = cfg.step_scheduler
    put(sched, "max_time_minutes", "step_scheduler.max_time_minutes", plan.time_budget_s / 60)
    if cfg.validation is not None:
        v = cfg.validation
        put(v, "bf16", "validation.bf16", bf16)
        if plan.eval_max_length != (v.max_length or cfg.model.max_length):
            put(
                v, "max_length", "validation.max_length", plan.eval_max_length
            )  # the saved model keeps its own
        if plan.eval_docs < plan.all_docs and v.max_corpus is None:
            put(v, "max_corpus", "validation.max_corpus", plan.eval_docs)
    # A linear schedule decays over max_steps: bring it near the steps that fit, so the learning rate
    # is not cut off early in its decay. +50 %: the step time is a prediction (a faster machine than
    # predicted still uses its time); the time budget stops the loop if it is slower.
    if plan.steps and sched.max_steps and plan.steps * 1.5 < sched.max_steps:
        put(sched, "max_steps", "step_scheduler.max_steps", max(1, math.ceil(plan.steps * 1.5)))


# ---------------------------------------------------------------------------------------- measuring
def _eval_shape(cfg: Any, tokenizer: Any) -> tuple[EvalShape, list[str]]:
    """Token counts of the held-out set (and a few of its documents for timing)."""
    from embedtune.eval.datasets import load_eval_set

    v = cfg.validation
    es = load_eval_set(v.data, v.split).subset(v.max_queries, v.max_corpus, v.seed)
    docs = es.corpus.texts(list(range(len(es.corpus))))
    prefix_q, prefix_p = cfg.model.query_prefix or "", cfg.model.passage_prefix or ""
    doc_tokens = [len(x) for x in tokenizer([prefix_p + d for d in docs])["input_ids"]]
    q_tokens = sum(len(x) for x in tokenizer([prefix_q + q for q in es.queries.values()])["input_ids"])
    relevant = {d for rel in es.qrels.values() for d, r in rel.items() if r >= 1}
    n_relevant = min(len(relevant), len(docs))
    shape = EvalShape(q_tokens, tuple(doc_tokens), n_relevant, len(es.queries))
    longest = sorted(range(len(docs)), key=lambda i: -doc_tokens[i])
    return shape, [docs[i] for i in longest[:4]]


def step_tokens(cfg: Any, shape: EvalShape) -> Callable[[int], float]:
    """Tokens one training step processes, for a passage length: queries and passages at padded length.

    Held-out documents stand in for training passages (the same kind of text); a batch pads to its
    longest text, so the padded length is close to the cut for long documents.
    """
    d, batch = cfg.data, cfg.step_scheduler.global_batch_size
    q_len = min(d.q_max_len, 1.5 * shape.query_tokens / max(shape.n_queries, 1))

    def tokens(p_len: int) -> float:
        p_mean = sum(min(n, p_len) for n in shape.doc_tokens) / max(len(shape.doc_tokens), 1)
        return batch * (q_len + d.n_passages * min(p_len, 1.2 * p_mean))

    return tokens


def _measure(cfg: Any, t_start: float) -> tuple[Measured, EvalShape]:
    """Load the model once, time its encoding in each precision worth timing; (measured, held-out shape)."""
    import gc

    import torch

    from embedtune.machine import machine_info, measure_matmul_gflops
    from embedtune.models import AutoBiEncoder

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    m = cfg.model
    enc = AutoBiEncoder.from_pretrained(
        m.name_or_path,
        **{**m.encoder_kwargs(), "dtype": "float32"},
        device="cpu",
        verify=False,  # the training run verifies the model it loads
    )
    shape, sample = _eval_shape(cfg, enc.tokenizer)
    length = cfg.validation.max_length or m.max_length or 512
    feats = enc.tokenize(sample, "document", max_length=length)
    n_tokens = int(feats["attention_mask"].sum())
    info = machine_info(measure=False)
    precisions = ["fp32"] + (["bf16"] if info.native_bf16 else [])
    tps: dict[str, float] = {}
    notes = []
    with torch.inference_mode():
        enc(**enc.tokenize(sample[:1], "document", max_length=16))  # warm-up: first-call allocations
        for p in precisions:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=p == "bf16")
            with ctx:
                best = float("inf")
                for _ in range(2):
                    t0 = time.perf_counter()
                    enc(**feats)
                    best = min(best, time.perf_counter() - t0)
            tps[p] = n_tokens / best
            notes.append(
                f"{p} encoding: {tps[p]:,.0f} tokens/s ({len(sample)} held-out documents, {n_tokens} tokens)"
            )
    if not info.native_bf16:
        fp32 = measure_matmul_gflops("float32", budget_s=0.3)
        bf16 = measure_matmul_gflops("bfloat16", budget_s=0.3)
        notes.append(
            f"bf16 not timed: this CPU has no bf16 instructions (neither AMX nor avx512_bf16), bf16 is "
            f"emulated — matmul fp32 {fp32:.0f} vs bf16 {bf16:.1f} GFLOP/s"
        )
    del enc, feats
    gc.collect()
    return Measured(tps, time.perf_counter() - t_start, tuple(notes)), shape


# ---------------------------------------------------------------------------------- output folder
def prepare_output(cfg: Any) -> None:
    """Make the output folder (marked as the demo's), or clear a previous *demo* run's checkpoints.

    Raises:
        EmbedtuneError: the checkpoint folder holds checkpoints that no demo run made (no marker, or a
            ``checkpoint.dir`` outside the demo's output folder): nothing is deleted.
    """
    from embedtune.errors import EmbedtuneError

    out = Path(cfg.output_dir)
    ckpt = cfg.checkpoint_dir
    if cfg.checkpoint.resume is None and ckpt.is_dir() and any(ckpt.iterdir()):
        ours = (out / MARKER).is_file() and ckpt.resolve().is_relative_to(out.resolve())
        if not ours:
            raise EmbedtuneError(
                f"{ckpt} holds checkpoints that `embedtune demo` did not create (no {MARKER} file in "
                f"{out}); nothing was deleted. Pick a new folder with output_dir=..., resume with "
                "checkpoint.resume=latest, or remove the folder yourself"
            )
        print(f"removing the previous demo run's checkpoints in {ckpt}", flush=True)
        shutil.rmtree(ckpt)
    if not out.exists():
        out.mkdir(parents=True)
        (out / MARKER).write_text(
            json.dumps(
                {"created_by": "embedtune demo", "note": "this folder may be cleared by the next demo"}
            )
            + "\n",
            encoding="utf-8",
        )


# ---------------------------------------------------------------------------------------------- run
def _print_plan(cfg: Any, plan: Plan, measured: Measured, shape: EvalShape, budget_s: float) -> None:
    from embedtune.machine import machine_info

    print(machine_info(measure=False).describe(), flush=True)
    print("measured:")
    for note in measured.notes:
        print(f"  {note}")
    print(f"plan ({budget_s / 60:g}-minute budget):")
    rows = [
        ("precision", plan.precision),
        (
            "evaluation",
            f"{shape.n_queries} queries x {plan.eval_docs} documents at {plan.eval_max_length} tokens, "
            f"~{plan.eval_s:.0f} s each (before and after)",
        ),
        (
            "training",
            f"~{plan.steps} steps of {cfg.step_scheduler.global_batch_size} queries, passages at "
            f"{plan.p_max_len} tokens, in ~{plan.train_s:.0f} s (~{plan.step_s:.1f} s/step)",
        ),
        (
            "budget",
            f"{measured.elapsed_s:.0f} s set-up + 2 x {plan.eval_s:.0f} s evaluation + {plan.train_s:.0f} s "
            f"training + {RESERVE_S:.0f} s load/save = {measured.elapsed_s + 2 * plan.eval_s + plan.train_s + RESERVE_S:.0f} s",
        ),
    ]
    for name, value in rows:
        print(f"  {name:<11} {value}")
    print("why:")
    for reason in plan.reasons:
        print(f"  - {reason}")
    print(flush=True)


def run(args: argparse.Namespace) -> int:
    """Measure, plan, train the demo recipe and print the before/after table; returns the exit code."""
    t0 = time.perf_counter()
    from embedtune.training.config import load_train_config

    cfg = load_train_config(args.recipe, args.overrides)
    for ds in cfg.data.datasets:
        ds.path = _bundled_path(ds.path)
    if cfg.validation is not None:
        cfg.validation.data = _bundled_path(cfg.validation.data)
        cfg.validation.eval_at_start = True  # the "before" number
    prepare_output(cfg)

    print(
        f"embedtune demo: {cfg.model.name_or_path} on {', '.join(d.path for d in cfg.data.datasets)}",
        flush=True,
    )
    plan = None
    if not args.no_plan and cfg.validation is not None:
        measured, shape = _measure(cfg, t0)
        plan = plan_demo(
            measured,
            shape,
            max_length=cfg.validation.max_length or cfg.model.max_length or 512,
            train_tokens_per_step=step_tokens(cfg, shape),
            p_max_len=cfg.data.p_max_len,
            max_steps=cfg.step_scheduler.max_steps or 1000,
            budget_s=60 * args.budget_minutes,
            lora_lr=cfg.optimizer.lr if cfg.peft is not None else None,
        )
        apply_plan(cfg, plan, list(args.overrides))
        _print_plan(cfg, plan, measured, shape, 60 * args.budget_minutes)
        if not plan.fits:
            print(
                f"embedtune demo: this machine is too slow right now for a {args.budget_minutes:g}-minute run "
                f"(measured {max(measured.tokens_per_s.values()):,.0f} tokens/s; a busy shared machine counts). "
                f"Nothing was trained. At this speed the job needs about {plan.needed_s / 60:.0f} minutes: "
                f"rerun with --budget-minutes {math.ceil(plan.needed_s / 60)}, later on a quieter machine, or "
                "with --recipe minilm_demo (a smaller model)",
                flush=True,
            )
            return 1

    from embedtune.training.monitor import read_metrics
    from embedtune.training.recipe import train

    result = train(cfg)
    wall = time.perf_counter() - t0
    if result.exit_code != 0:
        return result.exit_code

    vals = [r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if "val/ndcg@10" in r]
    print()
    print(
        f"model: {cfg.model.name_or_path}"
        + (f" + LoRA r={cfg.peft.r}" if cfg.peft else " (full fine-tuning)")
        + f", {'bf16' if cfg.bf16 else 'fp32'}"
    )
    print(f"trained {result.state.step} steps ({result.stop_reason}), {result.state.examples_seen} examples")
    if cfg.validation is not None and len(vals) >= 2:
        before, after = vals[0], vals[-1]
        v = cfg.validation
        docs = f"{v.max_corpus} documents (all relevant + fixed others)" if v.max_corpus else "all documents"
        print(
            f"held-out evaluation: {v.data}, {docs}, {v.max_length or cfg.model.max_length} tokens, "
            "same set before and after"
        )
        print(f"{'':8} {'NDCG@10':>8} {'Recall@10':>10} {'seconds':>8}")
        for name, r in (("before", before), ("after", after)):
            secs = r.get("val/eval_seconds", float("nan"))
            print(f"{name:8} {r['val/ndcg@10']:8.4f} {r['val/recall@10']:10.4f} {secs:8.0f}")
        gain = after["val/ndcg@10"] - before["val/ndcg@10"]
        print(f"{'gain':8} {gain:+8.4f} {after['val/recall@10'] - before['val/recall@10']:+10.4f}")
        if gain <= 0:
            print("warning: no gain on the held-out split — check the recipe (lr, steps, data)")
    if plan is not None:
        print(f"planned ~{plan.steps} steps, trained {result.state.step}")
    print(f"saved: {result.model_dir}")
    print(f"wall time: {wall / 60:.1f} min ({wall:.0f} s)")
    return 0
