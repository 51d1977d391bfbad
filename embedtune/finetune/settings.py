"""Recipe settings chosen from the model (kind and size) and the data (size), each with its reason.

The choices are starting points reasoned from measurements in this project (``MEASURED.md``) and from
the peers' published recipes, not the result of a sweep; every one is printed with its reason and lands
in the recipe file, where the user can change it and rerun.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENCODER_TYPES", "Choice", "FinetuneSettings", "choose_settings"]

#: ``model_type`` values of bidirectional encoders; anything else is treated as a decoder (LoRA).
ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "mpnet",
        "electra",
        "deberta",
        "deberta-v2",
        "modernbert",
        "nomic_bert",
        "camembert",
        "albert",
        "new",
        "gte",
    }
)


@dataclass(frozen=True)
class Choice:
    """One setting: where it goes in the recipe, its value, and why."""

    key: str
    value: Any
    reason: str

    def line(self) -> str:
        """``key = value  (reason)``."""
        return f"  {self.key} = {self.value}  ({self.reason})"


@dataclass
class FinetuneSettings:
    """The recipe blocks and mining settings chosen for one run."""

    recipe: dict[str, Any]
    mining: dict[str, Any]
    choices: list[Choice] = field(default_factory=list)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


#: Why an encoder fine-tunes without dropout on its attention probabilities (measured, see the docs).
ATTENTION_DROPOUT_REASON = (
    "no dropout on attention probabilities instead of the model's own {own} (hidden-state dropout stays): "
    "PyTorch's fused CPU attention has none, so 0 lets it run; MiniLM on SciFact, 3 epochs, 3 seeds: "
    "NDCG@10 0.6839 vs 0.6816 with 0.1 in 0.64x the training time, measured against PyTorch's unfused path "
    "(benchmarks/attention_dropout_quality.py; embedtune's blockwise dropout attention now narrows that gap)"
)

#: Why a small encoder run trains 2 epochs, not the reference's 3 (measured, see the docs).
TWO_EPOCHS_REASON = (
    "2 epochs, not the reference's 3: chosen on a validation split carved from scifact-mini train "
    "(MiniLM, 376 queries, 161 held out; 2 training seeds): NDCG@10 0.7043 vs 0.7008 for 3 epochs "
    "(+0.0052 and +0.0017) in 2/3 of the training steps; on one carved from full SciFact train (566 "
    "queries, 243 held out) 3 - 2 epochs was +0.0030 and -0.0040 (benchmarks/finetune_settings.py)"
)

#: LoRA runs of at most this many steps take the larger rate measured on short runs (see ``choose_settings``).
SHORT_LORA_STEPS = 100


def _pow2_at_most(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def choose_settings(
    *,
    model_type: str,
    num_parameters: int,
    num_train: int,
    device: str,
    fast_bf16: bool,
    max_position_embeddings: int | None = None,
    attention_dropout: float | None = None,
) -> FinetuneSettings:
    """Choose training and mining settings.

    Args:
        model_type: the backbone's ``config.model_type``.
        num_parameters: parameters of the backbone.
        num_train: training examples (queries) after any held-out split.
        device: ``cpu`` or ``cuda``.
        fast_bf16: bfloat16 compute is fast here (a GPU, or a CPU with AMX / avx512_bf16).
        max_position_embeddings: the model's position limit (caps the passage length).
        attention_dropout: the model's own dropout on attention probabilities, when embedtune can set
            it on the model's attention layers (None otherwise).

    Returns:
        The recipe blocks (model, peft, data, loss, optimizer, lr_scheduler, step_scheduler, checkpoint),
        the mining settings and the list of choices with reasons.
    """
    recipe: dict[str, Any] = {}
    choices: list[Choice] = []

    def pick(key: str, value: Any, reason: str) -> None:
        if not key.startswith("pipeline.mining."):
            _set(recipe, key, value)
        choices.append(Choice(key, value, reason))

    batch = min(32, max(4, _pow2_at_most(max(1, num_train // 8))))
    encoder = model_type in ENCODER_TYPES
    if num_train < 2000 and encoder:
        epochs, why = 2, f"{num_train} training queries (< 2,000) with a mined negative: {TWO_EPOCHS_REASON}"
    elif num_train < 2000:
        epochs, why = 3, f"{num_train} training queries (< 2,000): 3 epochs, as the reference"
    elif num_train < 20000:
        epochs, why = 2, f"{num_train} training queries (< 20,000): 2 epochs"
    else:
        epochs, why = 1, f"{num_train} training queries: one epoch is enough"
    steps = max(1, num_train // batch) * epochs
    millions = num_parameters / 1e6
    if encoder:
        pick(
            "optimizer.lr",
            2.0e-5,
            f"full fine-tuning of a {millions:.0f}M-parameter encoder: "
            "sentence-transformers' reference rate, measured at parity here",
        )
        pick("optimizer.weight_decay", 0.01, "AdamW default for full fine-tuning")
        if attention_dropout:
            pick("model.attention_dropout", 0.0, ATTENTION_DROPOUT_REASON.format(own=attention_dropout))
    else:
        pick(
            "peft",
            {"r": 16, "alpha": 32, "dropout": 0.0, "match_all_linear": True, "merge_on_save": True},
            f"{model_type} is a decoder ({millions:.0f}M parameters): LoRA r=16 on every linear layer, "
            "converted to bidirectional attention",
        )
        pick("model.bidirectional", True, "a causal decoder becomes an encoder")
        pick("model.pooling", "mean", "mean pooling over a bidirectional decoder (NV-Embed / LLM2Vec)")
        pick("model.query_prefix", "query: ", "decoders need to tell queries from passages")
        pick("model.passage_prefix", "passage: ", "the same prefixes at training and inference")
        if fast_bf16:
            pick(
                "model.dtype",
                "bfloat16",
                "the frozen base in bfloat16 halves memory; LoRA weights stay float32",
            )
        else:
            pick(
                "model.dtype",
                "float32",
                "no fast bfloat16 here: a bfloat16 base would run emulated bfloat16 matmuls "
                "(6x slower than float32, measured on an AVX2-only EPYC)",
            )
        if steps <= SHORT_LORA_STEPS:
            pick(
                "optimizer.lr",
                1.2e-3,
                f"a short LoRA run ({steps} steps <= {SHORT_LORA_STEPS}): 4x the shipped recipe's 3e-4, "
                "chosen on a validation split carved from scifact-mini train (SmolLM2-135M, in-batch "
                "negatives, 32-44 steps: NDCG@10 gain +0.27 at 3e-4, +0.55 at 1.2e-3, +0.55 at 2.4e-3; "
                "benchmarks/demo_lr.py)",
            )
        else:
            pick(
                "optimizer.lr",
                3.0e-4,
                f"LoRA adapters need ~10x the full fine-tuning rate (shipped SmolLM2 recipe); {steps} steps "
                f"is longer than the {SHORT_LORA_STEPS}-step runs the larger rate was measured on",
            )
        pick("optimizer.weight_decay", 0.0, "no decay on LoRA adapters")
        if device == "cpu":
            pick("model.attn_implementation", "eager", "eager attention trains faster than sdpa on CPUs")
        if num_parameters > 1_000_000_000:
            pick(
                "model.gradient_checkpointing",
                True,
                "over 1B parameters: recompute activations to fit memory",
            )

    pick("loss.temperature", 0.05, "scale 20, sentence-transformers' MNRL default, measured at parity here")
    pick("loss.in_batch_negatives", True, "every other passage of the batch is a negative too")
    if encoder:
        pick(
            "data.n_passages",
            2,
            "1 positive + 1 mined hard negative per query; more costs a forward pass each",
        )
        pick("data.negative_selection", "random", "each epoch takes another of the mined negatives")
    else:
        pick(
            "data.n_passages",
            1,
            "in-batch negatives only, no mining: a converted decoder is not yet a retriever and scores "
            "every document alike, so the positive-aware margin leaves it no negatives (SmolLM2-135M on "
            "scifact-mini: 26,199 of 26,850 window candidates dropped, 514 of 537 queries left with none); "
            "to train on mined negatives, mine with a retriever: "
            "--set data.n_passages=2 --set pipeline.mining.model=minilm",
        )
    pick("data.q_max_len", 64, "queries are short")
    cap = 512 if device == "cuda" else (256 if encoder else 128)
    if max_position_embeddings:
        cap = min(cap, max_position_embeddings - max_position_embeddings % 8)
    pick(
        "data.p_max_len",
        cap,
        "passage tokens: "
        + (
            "a GPU affords 512"
            if device == "cuda"
            else "a CPU pays per token; 256 as sentence-transformers' reference"
            if encoder
            else "a CPU pays per token; decoders are slower per token"
        ),
    )
    pick("model.max_length", cap, "encode at the training length")
    pick(
        "step_scheduler.global_batch_size",
        batch,
        "32 (the reference) when the data allows; smaller so that an epoch has at least 8 steps"
        if batch < 32
        else "sentence-transformers' reference batch; more in-batch negatives cost memory",
    )
    pick("step_scheduler.num_epochs", epochs, why)
    pick("lr_scheduler.name", "linear", "linear decay after warmup, as the reference")
    pick("lr_scheduler.warmup_ratio", 0.1, f"10% of the {steps} steps warm up")
    pick(
        "step_scheduler.ckpt_every_steps",
        max(1, steps // 4),
        "four checkpoints per run: a killed run resumes",
    )
    pick(
        "bf16",
        fast_bf16,
        "bfloat16 compute over float32 weights: fast here"
        if fast_bf16
        else "no fast bfloat16 on this machine (no GPU, no AMX / avx512_bf16): float32",
    )

    mining = {
        "model": None,
        "num_negatives": 4,
        "range_start": 0,
        "range_end": 50,
        "margin": 0.95,
        "margin_type": "perc",
        "sampling": "top",
        "seed": 0,
    }
    pick(
        "pipeline.mining.model",
        None,
        "mine with the base model, already a retriever"
        if encoder
        else "not used while data.n_passages is 1 (nothing is mined); the base model when mining",
    )
    pick("pipeline.mining.num_negatives", 4, "4 per query, rotated through by the epochs")
    pick("pipeline.mining.range", "0:50", "the 50 best-scoring non-positives of the base model")
    pick(
        "pipeline.mining.margin",
        "perc 0.95",
        "positive-aware: drop candidates scoring above 95% of the positive "
        "(likely unlabelled positives; NV-Retriever's TopK-PercPos)",
    )
    return FinetuneSettings(recipe=recipe, mining=mining, choices=choices)
