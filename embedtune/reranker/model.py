"""``CrossEncoderReranker``: a query and a passage read together, one relevance score out.

A bi-encoder embeds queries and passages apart; a cross-encoder attends across both and is far more
accurate, at the price of one forward pass per (query, passage) pair — so it rescores a bi-encoder's
top-k instead of searching a corpus. The model is transformers' ``AutoModelForSequenceClassification``
with one output (the score head on the pooled/first token for encoders, on the last real token for
decoders), over any HF backbone. A causal decoder is converted to bidirectional attention and the
conversion is proven with the same probe the bi-encoders use.

Input formats
    * ``template=None`` (default): the pair is tokenised as a text pair (``[CLS] q [SEP] p [SEP]`` for
      BERT) — exactly what ``sentence_transformers.CrossEncoder`` does, so a saved model gives the same
      scores there.
    * ``template="question:{query} \\n \\n passage:{passage}"`` (NeMo's form; suits decoders): one
      formatted text per pair. sentence-transformers has no such template; feed it the formatted text.

NeMo AutoModel's cross-encoders (``llama_bidirec`` with ``LlamaBidirectionalForSequenceClassification``:
pooled hidden states through a bias-free ``score`` head, divided by ``temperature``) load as
:class:`embedtune.nemo.cross_encoder.LlamaBidirectionalForSequenceClassification` and score exactly as
NeMo's forward does; their template defaults to :data:`NEMO_TEMPLATE`.

Saved layout: a plain transformers sequence-classification folder (``config.json`` with
``num_labels: 1`` and, for converted decoders, ``is_causal: false``; weights; tokenizer) plus
``embedtune_reranker.json`` (template, max length). ``sentence_transformers.CrossEncoder(folder)``
loads it unchanged; its default activation is a sigmoid over our logit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedtune.errors import ConfigError, EmbedtuneError, ModelLoadError
from embedtune.models.tokenization import ensure_pad_token

SETTINGS_FILE = "embedtune_reranker.json"
#: NeMo AutoModel's reranker prompt, for decoders.
NEMO_TEMPLATE = "question:{query} \n \n passage:{passage}"


@dataclass
class RerankerSettings:
    """What beyond the weights decides a reranker's score (saved as ``embedtune_reranker.json``)."""

    template: str | None = None
    """``None``: tokenise (query, passage) as a text pair; else a string with ``{query}`` and
    ``{passage}`` formatted into one text."""
    max_length: int = 512
    """Tokens per pair; longer pairs lose the end of the passage (``only_second`` truncation for pairs)."""
    bidirectional: bool = False
    """True when a causal decoder was converted to bidirectional attention."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the weights came from."""

    def __post_init__(self) -> None:
        if self.template is not None and ("{query}" not in self.template or "{passage}" not in self.template):
            raise ConfigError(
                f"template: {self.template!r} must contain both {{query}} and {{passage}}, "
                f"e.g. {NEMO_TEMPLATE!r}"
            )
        if int(self.max_length) < 8:
            raise ConfigError(f"max_length: must be >= 8 tokens, got {self.max_length}")
        self.max_length = int(self.max_length)


class CrossEncoderReranker(nn.Module):
    """A sequence-classification backbone with one output, its tokenizer and settings.

    Args:
        backbone: a transformers ``...ForSequenceClassification`` model with ``num_labels == 1``.
        tokenizer: its tokenizer (pad token set).
        settings: template, max length.
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, settings: RerankerSettings) -> None:
        super().__init__()
        if int(getattr(backbone.config, "num_labels", 1)) != 1:
            raise ModelLoadError(
                f"the reranker needs one output score, the model has num_labels={backbone.config.num_labels}"
            )
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.settings = settings

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def name_or_path(self) -> str | None:
        return self.settings.source.get("name_or_path")

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        template: str | None = None,
        max_length: int | None = None,
        bidirectional: bool | None = None,
        pooling: str | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        verify: bool = True,
    ) -> CrossEncoderReranker:
        """Load a saved reranker, or start one from any backbone (the score head is then new).

        Args:
            name_or_path: a folder, a hub id, or an embedtune short name (``minilm``, ``tiny-bert``, ...).
            template: override the saved template (see the module docstring); default: saved, else none.
            max_length: tokens per pair; default: saved, else min(512, the tokenizer's limit).
            bidirectional: None converts causal decoders, False keeps them causal.
            pooling: ``avg``, ``cls`` or ``last`` puts NeMo AutoModel's head on a Llama backbone
                (:class:`embedtune.nemo.cross_encoder.LlamaBidirectionalForSequenceClassification`: the
                pooled hidden states through a bias-free score head), as NeMo's cross-encoder recipe
                does; None keeps transformers' head (or the checkpoint's own).
            dtype: weights dtype (default float32).
            device: where to put the model.
            verify: prove a converted decoder attends bidirectionally.

        Raises:
            ModelLoadError: the path is not a model.
            BidirectionalityError: the conversion did not take.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from embedtune.models import zoo
        from embedtune.models.bidirectional import attends_to_future, make_bidirectional, verify_bidirectional
        from embedtune.nemo.cross_encoder import is_nemo_cross_encoder  # registers NeMo's class

        name = str(name_or_path)
        path = zoo.resolve(name)
        saved: dict[str, Any] = {}
        settings_file = Path(path) / SETTINGS_FILE
        if settings_file.is_file():
            saved = json.loads(settings_file.read_text(encoding="utf-8"))
        with zoo.quiet_transformers():
            try:
                config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(
                    f"{name}: cannot read a model config ({exc}) — is this a model folder?"
                ) from exc
            if pooling is not None:
                if getattr(config, "model_type", None) not in ("llama", "llama_bidirec"):
                    raise ModelLoadError(
                        f"{name}: pooling={pooling!r} (NeMo's cross-encoder head) needs a Llama backbone, "
                        f"got model_type {getattr(config, 'model_type', '?')!r}; leave pooling unset"
                    )
                if pooling not in ("avg", "cls", "last"):
                    raise ConfigError(f"pooling: {pooling!r} is not one of avg, cls, last")
                if config.model_type == "llama":
                    from embedtune.models.llama import LlamaBidirectionalConfig

                    data = {
                        k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")
                    }
                    config = LlamaBidirectionalConfig(**data)
                    config.architectures = ["LlamaBidirectionalForSequenceClassification"]
                    config.temperature = 1.0
                config.pooling = pooling
            nemo = is_nemo_cross_encoder(config)
            if getattr(config, "model_type", None) == "llama_bidirec" and not nemo:
                # A NeMo bi-encoder as the start of a reranker: its contrastive temperature (0.02) is
                # not a score scale; NeMo's cross-encoder recipe sets temperature 1.0 too.
                config.temperature = 1.0
            config.num_labels = 1
            tokenizer = AutoTokenizer.from_pretrained(path)
            ensure_pad_token(tokenizer, str(path))
            if getattr(config, "pad_token_id", None) is None:
                # Decoder heads find the last real token through pad_token_id.
                config.pad_token_id = tokenizer.pad_token_id
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=dtype or torch.float32
            )
        converted = (
            bool(saved.get("bidirectional", False)) or getattr(config, "model_type", None) == "llama_bidirec"
        )
        base = model.base_model
        if converted and bidirectional is not False:
            make_bidirectional(model)
        elif bidirectional is not False and not attends_to_future(base):
            make_bidirectional(model)
            converted = True
        if converted and verify:
            verify_bidirectional(base)
        tokenizer.padding_side = "right"
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        default_len = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
        settings = RerankerSettings(
            # NeMo's checkpoints carry no template; its recipes and collator default to NEMO_TEMPLATE.
            template=template
            if template is not None
            else saved.get("template", NEMO_TEMPLATE if nemo else None),
            max_length=max_length or saved.get("max_length") or default_len,
            bidirectional=converted,
            source=saved.get("source")
            or {"name_or_path": name, "model_type": getattr(config, "model_type", "?")},
        )
        out = cls(model, tokenizer, settings)
        if device is not None:
            out.to(device)
        return out

    # ------------------------------------------------------------------------------------ scoring
    def tokenize(
        self, queries: Sequence[str], passages: Sequence[str], max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenise pairs the way ``sentence_transformers.CrossEncoder`` does (or with the template).

        Returns:
            ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for BERT-like models), (batch, seq).
        """
        if len(queries) != len(passages):
            raise EmbedtuneError(
                f"{len(queries)} queries but {len(passages)} passages — give one query per passage"
            )
        length = max_length or self.settings.max_length
        if self.settings.template is None:
            return self.tokenizer(
                list(queries),
                list(passages),
                padding=True,
                truncation=True,
                max_length=length,
                return_tensors="pt",
            )
        texts = [self.settings.template.format(query=q, passage=p) for q, p in zip(queries, passages)]
        return self.tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")

    def forward(self, **features: torch.Tensor) -> torch.Tensor:
        """Scores (logits) of a tokenised batch, shape (batch,), float32."""
        out = self.backbone(**features)
        return out.logits.float().squeeze(-1)

    def predict(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        *,
        batch_size: int = 32,
        bf16: bool = False,
        max_length: int | None = None,
        show_progress: bool | None = None,
        activation: str = "none",
    ) -> np.ndarray:
        """Score (query, passage) pairs without gradients, in length-sorted batches; input order kept.

        Args:
            queries: one query per pair.
            passages: one passage per pair.
            batch_size: pairs per forward pass.
            bf16: bfloat16 autocast.
            max_length: tokens per pair (default: settings).
            show_progress: progress bar (default: more than 512 pairs).
            activation: ``none`` (raw logits, what training optimises) or ``sigmoid`` (what
                sentence-transformers' ``CrossEncoder.predict`` returns by default).

        Returns:
            (num_pairs,) float32 scores.
        """
        from tqdm.auto import tqdm

        if activation not in ("none", "sigmoid"):
            raise ConfigError(f"activation: {activation!r} is not 'none' or 'sigmoid'")
        n = len(queries)
        if len(passages) != n:
            raise EmbedtuneError(f"{n} queries but {len(passages)} passages — give one query per passage")
        out = np.empty(n, dtype=np.float32)
        if n == 0:
            return out
        order = np.argsort([-(len(q) + len(p)) for q, p in zip(queries, passages)], kind="stable")
        device = self.device
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), autocast:
                for start in tqdm(
                    range(0, n, batch_size),
                    total=math.ceil(n / batch_size),
                    disable=not (show_progress if show_progress is not None else n > 512),
                    desc="rerank",
                    unit="batch",
                ):
                    idx = order[start : start + batch_size]
                    feats = self.tokenize([queries[i] for i in idx], [passages[i] for i in idx], max_length)
                    feats = {k: v.to(device) for k, v in feats.items()}
                    out[idx] = self(**feats).float().cpu().numpy()
        finally:
            self.train(was_training)
        if activation == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-out.astype(np.float64)))
            out = out.astype(np.float32)
        return out

    def rerank(
        self, query: str, passages: Sequence[str], *, top_k: int | None = None, **kwargs: Any
    ) -> list[tuple[int, float]]:
        """Order ``passages`` for one query: ``[(index, score), ...]`` best first."""
        scores = self.predict([query] * len(passages), passages, **kwargs)
        order = np.argsort(-scores, kind="stable")[: top_k or len(passages)]
        return [(int(i), float(scores[i])) for i in order]

    def fingerprint(self) -> str:
        """Hash of the weights and settings (recorded by mining when it rescores)."""
        from embedtune.eval.cache import weights_fingerprint

        return weights_fingerprint(self.backbone)

    # ------------------------------------------------------------------------------------- saving
    def save_pretrained(self, path: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write a folder that transformers, ``sentence_transformers.CrossEncoder`` and embedtune load.

        Args:
            path: the folder.
            state_dict: the backbone's weights to write instead of its own (an FSDP2-sharded reranker's
                full state, gathered to this rank's CPU; keys without the ``backbone.`` prefix).

        Returns:
            The folder.
        """
        from embedtune.models.saving import stock_config_dict

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(folder), state_dict=state_dict)
        from embedtune.nemo.cross_encoder import LlamaBidirectionalForSequenceClassification

        if isinstance(self.backbone, LlamaBidirectionalForSequenceClassification):
            # NeMo's layout, kept as is: stock transformers has no avg-pooled, temperature-scaled head, so
            # rewriting it as a stock Llama would make every other loader score it differently.
            config = self.backbone.config.to_dict()
            config["architectures"] = ["LlamaBidirectionalForSequenceClassification"]
            config.pop("auto_map", None)  # points at NeMo's Python files, which this folder does not hold
        else:
            config = stock_config_dict(self.backbone.config)
        # A converted decoder must load bidirectional anywhere: transformers reads is_causal from config.
        if self.settings.bidirectional:
            config["is_causal"] = False
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        self.tokenizer.save_pretrained(str(folder))
        (folder / SETTINGS_FILE).write_text(
            json.dumps({"format_version": 1, **asdict(self.settings)}, indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        return folder
