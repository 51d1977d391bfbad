"""``AutoBiEncoder``: one entry point that turns any checkpoint into a ``BiEncoder``.

Routing by ``config.model_type``:

* ``llama`` / ``llama_bidirec`` (incl. NeMo checkpoints and ``LlamaForCausalLM`` weights) →
  :class:`~embedtune.models.llama.LlamaBidirectionalModel`;
* ``ministral3`` / ``ministral3_bidirec``, and the language tower of a ``mistral3`` checkpoint →
  :class:`~embedtune.models.ministral3.Ministral3BidirectionalModel`;
* FP8 checkpoints of those (``quantization_config.quant_method: fp8``, e.g. the original
  ``Ministral-3-3B-Instruct-2512``) are dequantised on load (:mod:`embedtune.models.fp8`), as NeMo does;
* any other model → ``transformers.AutoModel``; a probe tells causal decoders (mistral, qwen2, qwen3, …),
  which are converted generically with ``config.is_causal = False``, from encoders (bert, xlm-roberta,
  modernbert, …), which keep their own attention.

Every converted model is proved bidirectional by :func:`verify_bidirectional` unless ``verify=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from embedtune.errors import BidirectionalityError, ConfigError, ModelLoadError
from embedtune.models import zoo
from embedtune.models.bidirectional import attends_to_future, make_bidirectional, verify_bidirectional
from embedtune.models.biencoder import BiEncoder
from embedtune.models.fp8 import BF16_HINT, fp8_quantization, load_dequantized
from embedtune.models.llama import LlamaBidirectionalConfig, LlamaBidirectionalModel
from embedtune.models.ministral3 import Ministral3BidirectionalConfig, Ministral3BidirectionalModel
from embedtune.models.pooling import FROM_SENTENCE_TRANSFORMERS, canonical_pooling
from embedtune.models.settings import SETTINGS_FILE, EncoderSettings
from embedtune.models.tokenization import ensure_pad_token

if TYPE_CHECKING:
    from embedtune.export.runtime import OnnxBiEncoder

logger = logging.getLogger(__name__)

LLAMA_TYPES = ("llama", "llama_bidirec")
MINISTRAL3_TYPES = ("ministral3", "ministral3_bidirec")
# Keys of a config dict that describe the file, not the architecture.
_META_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "pooling", "temperature")
# Checkpoint key prefixes of the language tower inside a mistral3 (vision-language) checkpoint.
MISTRAL3_TEXT_KEYS = {
    r"^model\.language_model\.": "",
    r"^language_model\.model\.": "",
    r"^language_model\.": "",
}
# EncoderSettings fields that from_pretrained's keyword arguments may override.
OVERRIDABLE_SETTINGS = (
    "pooling",
    "normalize",
    "query_prefix",
    "passage_prefix",
    "pool_instruction",
    "max_length",
    "padding_side",
)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(
            f"dtype: unknown {dtype!r} — use one of {', '.join(sorted(_DTYPES))} or 'auto'"
        ) from None


def _optional_file(name_or_path: str, filename: str, **hub_kwargs: Any) -> dict[str, Any] | None:
    """Read a JSON file from a local folder or a hub repo; None when it does not exist."""
    local = Path(name_or_path) / filename
    if Path(name_or_path).is_dir():
        if not local.is_file():
            return None
        path = local
    else:
        from transformers.utils import cached_file

        try:
            found = cached_file(
                name_or_path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs
            )
        except Exception:  # offline or no such repo: the main load reports that clearly
            return None
        if found is None:
            return None
        path = Path(found)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg}) — fix or delete the file"
        ) from exc


def sentence_transformers_settings(name_or_path: str) -> dict[str, Any]:
    """Settings implied by a sentence-transformers layout (pooling, normalisation, prompts, length)."""
    modules = _optional_file(name_or_path, "modules.json")
    if not modules:
        return {}
    out: dict[str, Any] = {"normalize": any(str(m.get("type", "")).endswith("Normalize") for m in modules)}
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            cfg = _optional_file(name_or_path, f"{module.get('path', '1_Pooling')}/config.json") or {}
            mode = cfg.get("pooling_mode")
            if mode is None:
                legacy = {
                    "pooling_mode_cls_token": "cls",
                    "pooling_mode_mean_tokens": "mean",
                    "pooling_mode_weightedmean_tokens": "weightedmean",
                    "pooling_mode_lasttoken": "lasttoken",
                }
                active = [v for k, v in legacy.items() if cfg.get(k)]
                mode = active[0] if len(active) == 1 else None
            if isinstance(mode, str) and mode in FROM_SENTENCE_TRANSFORMERS:
                out["pooling"] = FROM_SENTENCE_TRANSFORMERS[mode]
            if "include_prompt" in cfg:
                out["pool_instruction"] = bool(cfg["include_prompt"])
    st_cfg = _optional_file(name_or_path, "sentence_bert_config.json") or {}
    if st_cfg.get("max_seq_length"):
        out["max_length"] = int(st_cfg["max_seq_length"])
    prompts = (_optional_file(name_or_path, "config_sentence_transformers.json") or {}).get("prompts") or {}
    for ours, theirs in (("query_prefix", ("query",)), ("passage_prefix", ("document", "passage", "corpus"))):
        for key in theirs:
            if prompts.get(key):
                out[ours] = prompts[key]
                break
    return out


def _plain_kwargs(config_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config_dict.items() if k not in _META_KEYS}


class AutoBiEncoder:
    """Load any supported checkpoint as a :class:`BiEncoder` (see the module docstring for the routing)."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        pool_instruction: bool | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
        verify: bool = True,
        bidirectional: bool | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        backend: str = "torch",
    ) -> BiEncoder | OnnxBiEncoder:
        """Load ``name_or_path`` as a bi-encoder.

        Args:
            name_or_path: a local folder, a hub id, or a short name (``minilm``, ``smollm2-135m``,
                ``tiny-llama``, ...; see ``embedtune.models.zoo``). A ``.gguf`` file path works too.
            pooling, normalize, query_prefix, passage_prefix, pool_instruction, max_length, padding_side:
                override the saved settings (``embedtune.json``, else the sentence-transformers config,
                else defaults: mean pooling, L2 normalisation, no prefixes, 512 tokens).
            dtype: weights dtype ("float32", "bfloat16", "auto", or a torch dtype); default: transformers'.
            attn_implementation: "sdpa", "eager", "flash_attention_2", ...; default: transformers' choice.
            gguf_file: a GGUF file inside ``name_or_path``; dequantised once into a cached plain folder.
            trust_remote_code: allow the checkpoint's own Python code (off unless you trust the source).
            verify: prove that a converted decoder attends bidirectionally (a few-token probe).
            bidirectional: None (default) converts causal decoders and leaves encoders alone; False keeps a
                decoder causal; True insists on bidirectional attention and fails if it cannot be had.
            device: move the model there ("cpu", "cuda", ...).
            revision: hub revision.
            backend: "torch" (default), "onnx" (a folder written by ``embedtune export onnx``, run by
                ONNX Runtime), or "auto" (ONNX for an export folder, else torch).

        Returns:
            A :class:`BiEncoder` in eval mode (call ``.train()`` to fine-tune it), or an
            ``OnnxBiEncoder`` with the same inference API for the ONNX backend.

        Raises:
            ModelLoadError: the path is not a model, or a needed package is missing.
            BidirectionalityError: bidirectional attention was asked for and cannot be had.
        """
        name = str(name_or_path)
        if backend not in ("torch", "onnx", "auto"):
            raise ConfigError(f"backend: {backend!r} is not one of torch, onnx, auto")
        if backend != "torch":
            from embedtune.export.runtime import OnnxBiEncoder, is_onnx_export

            if backend == "onnx" or is_onnx_export(name):
                return OnnxBiEncoder.from_pretrained(name, max_length=max_length, padding_side=padding_side)
        path = zoo.resolve(name)
        hub_kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        local = Path(path).expanduser()
        if local.is_file() and local.suffix == ".gguf":
            gguf_file, local = local.name, local.parent
        if local.exists():
            path = str(local)
            if not local.is_dir():
                raise ModelLoadError(f"{local}: not a model folder — give the folder that holds config.json")
            if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
                return cls._from_adapter(local, locals())
            if gguf_file is None and not (local / "config.json").is_file():
                if (local / "model.onnx").is_file():
                    raise ModelLoadError(
                        f"{local}: an ONNX export — load it with backend='onnx' (CLI: --runtime onnx)"
                    )
                raise ModelLoadError(
                    f"{local}: not a model folder (no config.json) — give a folder written by save_pretrained, "
                    f"a hub id such as 'BAAI/bge-small-en-v1.5', or a short name: {', '.join(zoo.ZOO)}"
                )
        elif _looks_like_local_path(path):
            raise ModelLoadError(
                f"{path}: no such file or folder — check the path, or use a hub id or a short name: "
                f"{', '.join(zoo.ZOO)}"
            )
        if gguf_file is not None:
            path = cls._dequantized_gguf(path, gguf_file)

        # Settings: explicit arguments > embedtune.json > sentence-transformers files > defaults.
        saved = _optional_file(path, SETTINGS_FILE, **hub_kwargs)
        base_settings = (
            EncoderSettings.from_dict(saved, origin=f"{path}/{SETTINGS_FILE}").__dict__.copy()
            if saved
            else sentence_transformers_settings(path)
        )

        with zoo.quiet_transformers():
            try:
                config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **hub_kwargs)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(
                    f"{name}: cannot read the model config ({exc}) — is this a model?"
                ) from exc
            model_type = getattr(config, "model_type", "?")
            if saved is None and getattr(config, "pooling", None):  # NeMo llama_bidirec configs carry it
                base_settings.setdefault("pooling", canonical_pooling(config.pooling))
            load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **hub_kwargs}
            if dtype is not None:
                load_kwargs["dtype"] = _resolve_dtype(dtype)
            if attn_implementation is not None:
                load_kwargs["attn_implementation"] = attn_implementation
            backbone, converted = cls._load_backbone(path, config, bidirectional, load_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub_kwargs)

        if converted and verify:
            verify_bidirectional(backbone)
        ensure_pad_token(tokenizer, name)
        if hasattr(backbone.config, "use_cache"):
            backbone.config.use_cache = False  # an encoder never decodes: building a KV cache is waste

        arguments = locals()
        overrides = {key: arguments[key] for key in OVERRIDABLE_SETTINGS}
        values = {**base_settings, **{k: v for k, v in overrides.items() if v is not None}}
        values.setdefault("padding_side", getattr(tokenizer, "padding_side", "right") or "right")
        values.setdefault("max_length", min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512))
        values["bidirectional"] = bool(converted or values.get("bidirectional", False))
        source = dict(values.get("source") or {})
        source.setdefault("name_or_path", name)
        source.setdefault("model_type", str(model_type).replace("_bidirec", ""))
        values["source"] = source
        settings = EncoderSettings(**values)
        model = BiEncoder(backbone, tokenizer, settings)
        model.eval()  # as transformers returns models: dropout off until the caller trains
        if device is not None:
            model.to(device)
        return model

    # --------------------------------------------------------------------------------- internals
    @staticmethod
    def _load_backbone(
        path: str, config: Any, bidirectional: bool | None, load_kwargs: dict[str, Any]
    ) -> tuple[torch.nn.Module, bool]:
        """Build the backbone; returns (model, converted_to_bidirectional)."""
        model_type = getattr(config, "model_type", None)
        keep_causal = bidirectional is False
        if model_type in LLAMA_TYPES or model_type in MINISTRAL3_TYPES or model_type == "mistral3":
            if model_type == "mistral3":  # a vision-language checkpoint: take its language tower
                text = config.text_config
                if getattr(text, "model_type", None) not in MINISTRAL3_TYPES:
                    raise ModelLoadError(
                        f"{path}: mistral3 checkpoint with a {text.model_type!r} language tower — "
                        "only ministral3 towers are supported"
                    )
                load_kwargs = {**load_kwargs, "key_mapping": MISTRAL3_TEXT_KEYS}
                config_dict = text.to_dict()
            else:
                config_dict = config.to_dict()
            fp8 = fp8_quantization(config)
            if fp8 is not None:
                # Dequantised below from the FP8 tensors and their scales; the plain model must not
                # try to quantise itself again.
                config_dict = {k: v for k, v in config_dict.items() if k != "quantization_config"}
            is_llama = model_type in LLAMA_TYPES
            if keep_causal:
                from transformers import LlamaConfig, LlamaModel, Ministral3Config, Ministral3Model

                cfg_cls, model_cls = (
                    (LlamaConfig, LlamaModel) if is_llama else (Ministral3Config, Ministral3Model)
                )
                cfg = cfg_cls(**{**_plain_kwargs(config_dict), "is_causal": True})
            else:
                cfg_cls, model_cls = (
                    (LlamaBidirectionalConfig, LlamaBidirectionalModel)
                    if is_llama
                    else (Ministral3BidirectionalConfig, Ministral3BidirectionalModel)
                )
                cfg = cfg_cls(**_plain_kwargs(config_dict))
            if "attn_implementation" in load_kwargs:
                cfg._attn_implementation = load_kwargs["attn_implementation"]
            if fp8 is not None:
                dtype = load_kwargs.get("dtype")
                dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
                logger.warning(
                    "%s: FP8 checkpoint (quantization_config.quant_method=%s): dequantising to %s on load, as "
                    "NeMo AutoModel does; %s",
                    path,
                    fp8.get("quant_method"),
                    dtype,
                    BF16_HINT,
                )
                mapping = load_kwargs.get("key_mapping")
                return load_dequantized(model_cls(cfg), path, mapping, dtype), not keep_causal
            model = model_cls.from_pretrained(path, config=cfg, **load_kwargs)
            return model, not keep_causal

        try:
            model = AutoModel.from_pretrained(path, config=config, **load_kwargs)
        except ValueError as exc:
            raise ModelLoadError(f"{path}: transformers cannot load it with AutoModel ({exc})") from exc
        if attends_to_future(model):
            return model, False  # an encoder: its own (bidirectional) attention
        if keep_causal:
            logger.warning(
                "%s: keeping causal attention (bidirectional=False); 'last' pooling suits it best", path
            )
            return model, False
        make_bidirectional(model)
        if not attends_to_future(model):
            raise BidirectionalityError(
                f"{path}: model type {model_type!r} still attends causally after setting config.is_causal=False — "
                "its attention does not honour the flag. Load it with bidirectional=False (and pooling='last') to "
                "use it as a causal embedding model."
            )
        return model, True

    @staticmethod
    def _dequantized_gguf(path: str, gguf_file: str) -> str:
        key = hashlib.sha256(f"{Path(path).resolve() if Path(path).exists() else path}/{gguf_file}".encode())
        name = f"gguf-{Path(gguf_file).stem}-{key.hexdigest()[:10]}"
        return str(zoo._build_once(name, lambda out: zoo.dequantize_gguf(Path(path), gguf_file, out)))

    @classmethod
    def _from_adapter(cls, folder: Path, kwargs: dict[str, Any]) -> BiEncoder:
        """Load a PEFT adapter folder: its base model, then the adapter on top."""
        from peft import PeftModel

        adapter_cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        settings = EncoderSettings.load(folder)
        base_name = (settings.source.get("name_or_path") if settings else None) or adapter_cfg.get(
            "base_model_name_or_path"
        )
        if not base_name:
            raise ModelLoadError(
                f"{folder}/adapter_config.json: no base_model_name_or_path — cannot find the base"
            )
        load_keys = ("dtype", "attn_implementation", "trust_remote_code", "verify", "bidirectional")
        options = {k: kwargs[k] for k in (*OVERRIDABLE_SETTINGS, *load_keys)}
        for key in OVERRIDABLE_SETTINGS:  # the adapter's own settings unless the caller overrides them
            if options[key] is None and settings is not None:
                options[key] = getattr(settings, key)
        base = cls.from_pretrained(base_name, **options)
        with zoo.quiet_transformers(), zoo.peft_wrapping():
            base.backbone = PeftModel.from_pretrained(base.backbone, str(folder))
        base.eval()
        if kwargs.get("device") is not None:
            base.to(kwargs["device"])
        return base
