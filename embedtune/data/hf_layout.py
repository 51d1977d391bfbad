"""The Hugging Face retrieval layout NeMo AutoModel reads as ``hf://org/repo/subset``.

A data set repository (``nvidia/embed-nemotron-dataset-v1`` is the example NeMo ships) holds, per subset:

* ``<subset>/dataset_metadata.json``: ``corpus_id``, optional ``query_instruction`` /
  ``passage_instruction``, and ``ids_only`` (true means the texts must come from elsewhere: refused,
  as NeMo refuses it);
* a ``<subset>_corpus`` configuration whose ``train`` split has ``id`` and ``text`` columns;
* a ``<subset>`` configuration whose ``train`` split has ``question``, ``pos_doc`` and optionally
  ``neg_doc`` and ``question_id`` (NeMo numbers rows ``<subset>:<row>`` when it is missing).

Configurations map to files through the ``configs:`` block of the repository's ``README.md`` (the data
set card), which is what ``datasets.load_dataset(repo, name)`` reads. We read that mapping ourselves and
fetch only the files it names with ``huggingface_hub`` (``hf_hub_download`` / ``snapshot_download``,
which honour ``HF_HUB_OFFLINE`` and the hub cache), so no ``datasets`` install is needed and the
documents go into the same memory-mapped, validated :class:`~embedtune.data.corpus.Corpus` as every
other layout. A local folder with the same files (a ``git clone`` of the repository, or a snapshot in
the hub cache) reads the same way: ``path: ./embed-nemotron-dataset-v1/FEVER`` or the repository root
for all its subsets.
"""

from __future__ import annotations

import json
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from embedtune.data.corpus import Corpus, iter_jsonl
from embedtune.data.corpus_id import build_records
from embedtune.data.model import Instructions, RetrievalData
from embedtune.data.problems import DataValidationError, Problem, ProblemLog

__all__ = ["HF_PREFIX", "is_hf_layout", "parse_hf_uri", "read_hf_layout"]

HF_PREFIX = "hf://"
METADATA = "dataset_metadata.json"
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """``hf://org/repo/subset`` -> ``("org/repo", "subset")``; the subset may be absent (all subsets).

    Raises:
        ValueError: when the URI has no ``org/repo``.
    """
    if not uri.startswith(HF_PREFIX):
        raise ValueError(f"{uri!r} is not an hf:// URI")
    parts = [p for p in uri[len(HF_PREFIX) :].strip("/").split("/") if p]
    if len(parts) < 2:
        raise ValueError(
            f"{uri}: an hf:// URI needs at least org/repo, e.g. hf://nvidia/embed-nemotron-dataset-v1/FEVER"
        )
    return f"{parts[0]}/{parts[1]}", ("/".join(parts[2:]) or None)


def is_hf_layout(path: str | os.PathLike[str]) -> bool:
    """True for an ``hf://`` URI or a local folder in the layout (a subset folder or a repository root)."""
    text = str(path)
    if text.startswith(HF_PREFIX):
        return True
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / METADATA).is_file() and _find_root(p) is not None:
        return True
    return (p / "README.md").is_file() and any(p.glob(f"*/{METADATA}"))


def _find_root(subset_dir: Path) -> Path | None:
    """The repository root above a subset folder: the nearest parent with a README.md."""
    for parent in subset_dir.parents:
        if (parent / "README.md").is_file():
            return parent
    return None


def _card_configs(readme: Path) -> dict[str, dict[str, list[str]]]:
    """``{config_name: {split: [file globs]}}`` from the YAML front matter of a data set card."""
    import yaml

    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    meta = yaml.safe_load(text[3:end]) or {}
    out: dict[str, dict[str, list[str]]] = {}
    for cfg in meta.get("configs") or []:
        if not isinstance(cfg, dict) or "config_name" not in cfg:
            continue
        files = cfg.get("data_files")
        splits: dict[str, list[str]] = {}
        if isinstance(files, str):
            splits["train"] = [files]
        elif isinstance(files, list):
            for entry in files:
                if isinstance(entry, str):
                    splits.setdefault("train", []).append(entry)
                elif isinstance(entry, dict):
                    globs = entry.get("path")
                    globs = [globs] if isinstance(globs, str) else list(globs or [])
                    splits.setdefault(str(entry.get("split", "train")), []).extend(globs)
        elif isinstance(files, dict):
            for split, globs in files.items():
                splits[str(split)] = [globs] if isinstance(globs, str) else list(globs)
        out[str(cfg["config_name"])] = splits
    return out


class _Source:
    """Where a layout's files come from: a local folder, or a hub repository fetched on demand."""

    def __init__(self, display: str, root: Path | None = None, repo_id: str | None = None) -> None:
        self.display = display
        self.root = root
        self.repo_id = repo_id

    def file(self, relative: str) -> Path | None:
        """A single file, or None when the source has no such file."""
        if self.root is not None:
            p = self.root / relative
            return p if p.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(self.repo_id, relative, repo_type="dataset"))
        except LocalEntryNotFoundError as exc:
            raise self._unreachable(relative, exc) from None
        except EntryNotFoundError:
            return None
        except OSError as exc:  # no network, no such repository, no access
            raise self._unreachable(relative, exc) from None

    def _unreachable(self, what: str, exc: Exception) -> DataValidationError:
        return DataValidationError(
            [
                Problem(
                    self.display,
                    None,
                    what,
                    f"cannot be fetched from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                    "check the repository name and your access (huggingface-cli login); offline "
                    "(HF_HUB_OFFLINE=1) it must already be in the hub cache, or point at a local copy of the repository",
                )
            ]
        )

    def files(self, globs: list[str]) -> list[Path]:
        """The files matching the card's globs, sorted by path."""
        if self.root is None:
            from huggingface_hub import snapshot_download

            try:
                self.root = Path(snapshot_download(self.repo_id, repo_type="dataset", allow_patterns=globs))
            except OSError as exc:
                raise self._unreachable(", ".join(globs), exc) from None
        root = self.root
        found = {
            p
            for p in root.rglob("*")
            if p.is_file() and any(fnmatch(p.relative_to(root).as_posix(), g) for g in globs)
        }
        return sorted(found)

    def subsets(self) -> list[str]:
        """Every subset (folder holding ``dataset_metadata.json``), as NeMo lists them."""
        if self.root is not None and self.repo_id is None:
            return sorted(p.parent.relative_to(self.root).as_posix() for p in self.root.rglob(METADATA))
        from huggingface_hub import HfApi

        try:
            tree = list(HfApi().list_repo_tree(self.repo_id, repo_type="dataset", recursive=True))
        except OSError as exc:
            raise self._unreachable("(subset list)", exc) from None
        return sorted(
            {os.path.dirname(item.path) for item in tree if item.path.endswith(f"/{METADATA}")} - {"", "."}
        )


def read_hf_layout(
    path: str | os.PathLike[str], on_bad_row: str = "error", cache_dir: str | os.PathLike[str] | None = None
) -> RetrievalData:
    """Read an ``hf://org/repo[/subset]`` URI or a local folder in the same layout.

    Several subsets (a URI or folder without a subset) become one data set over their corpora, each
    subset keeping its own instructions.

    Raises:
        DataValidationError: naming the file and field (missing metadata, ``ids_only``, a config
            missing from the card, bad rows, unknown document IDs, ...).
    """
    name = str(path)
    log = ProblemLog(on_bad_row)
    if name.startswith(HF_PREFIX):
        try:
            repo_id, subset = parse_hf_uri(name)
        except ValueError as exc:
            raise log.fatal(
                Problem(name, None, "path", str(exc), "write hf://<org>/<repo>/<subset>")
            ) from None
        source = _Source(name, repo_id=repo_id)
        subsets = [subset] if subset else source.subsets()
    else:
        p = Path(path)
        if (p / METADATA).is_file():
            root = _find_root(p)
            assert root is not None  # is_hf_layout checked it
            source = _Source(name, root=root)
            subsets = [p.relative_to(root).as_posix()]
        else:
            source = _Source(name, root=p)
            subsets = source.subsets()
    if not subsets:
        raise log.fatal(
            Problem(name, None, METADATA, "no subset holds one", f"point at a subset: {name}/<subset>")
        )
    readme = source.file("README.md")
    configs = _card_configs(readme) if readme is not None else {}

    corpora: list[Corpus] = []
    instructions: list[Instructions] = []
    by_id: dict[str, int] = {}
    corpus_names: list[str] = []
    records: list[Any] = []
    lines: list[int] = []
    for subset in subsets:
        where = f"{name}/{subset}" if not name.endswith(subset) else name
        meta_file = source.file(f"{subset}/{METADATA}")
        if meta_file is None:
            raise log.fatal(
                Problem(where, None, METADATA, "missing", f"add {subset}/{METADATA} with a corpus_id")
            )
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise log.fatal(
                Problem(str(meta_file), None, "(file)", f"invalid JSON ({exc})", "fix the JSON")
            ) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("corpus_id"), str) or not meta["corpus_id"]:
            raise log.fatal(
                Problem(
                    str(meta_file), None, "corpus_id", "missing or not a string", 'add "corpus_id": "<name>"'
                )
            )
        if meta.get("ids_only", False):
            raise log.fatal(
                Problem(
                    str(meta_file),
                    None,
                    "ids_only",
                    "true: this subset holds document IDs only, the texts live in another source",
                    "materialise the texts first (NeMo's data_preparation.py writes a corpus-ID .json file) "
                    "and point at that file",
                )
            )
        corpus_files = _config_files(source, configs, f"{subset}_corpus", where, log)
        query_files = _config_files(source, configs, subset, where, log)
        corpus = Corpus._build(
            corpus_files,
            [str(f) for f in corpus_files],
            {"id": "id", "text": "text", "title": None},
            on_bad_row,
            cache_dir,
        )
        corpus_id = meta["corpus_id"]
        if corpus_id in by_id:
            raise log.fatal(
                Problem(
                    where,
                    None,
                    "corpus_id",
                    f"{corpus_id!r} is also the corpus_id of another subset",
                    "give each subset its own corpus_id",
                )
            )
        by_id[corpus_id] = len(corpora)
        corpora.append(corpus)
        corpus_names.append(corpus_id)
        instructions.append(
            Instructions(meta.get("query_instruction") or None, meta.get("passage_instruction") or None)
        )
        for row, rec in enumerate(_rows(query_files, log)):
            if isinstance(rec, dict):
                rec = dict(rec)
                if rec.get("question_id") is None:
                    rec["question_id"] = f"{subset}:{row}"  # NeMo's default question id
                rec["corpus_id"] = corpus_id
                if rec.get("neg_doc") is None:
                    rec.pop("neg_doc", None)
                for key in ("pos_doc", "neg_doc"):  # NeMo wraps a scalar into a list
                    if key in rec and not isinstance(rec[key], list):
                        rec[key] = [rec[key]]
            records.append(rec)
            lines.append(row + 1)
    return build_records(name, "hf", records, lines, corpora, by_id, corpus_names, instructions, log)


def _config_files(
    source: _Source, configs: dict[str, dict[str, list[str]]], config: str, where: str, log: ProblemLog
) -> list[Path]:
    """The ``train`` files of one configuration, or a fatal problem saying what the card lacks."""
    globs = configs.get(config, {}).get("train")
    if not globs:
        known = ", ".join(sorted(configs)) or "none"
        raise log.fatal(
            Problem(
                where,
                None,
                f"README.md configs.{config}",
                f"the data set card names no 'train' files for configuration {config!r} (configurations: {known})",
                f"add to README.md: configs: [{{config_name: {config}, data_files: [{{split: train, path: <files>}}]}}]",
            )
        )
    files = [f for f in source.files(globs) if f.suffix in _DATA_SUFFIXES]
    if not files:
        raise log.fatal(
            Problem(
                where,
                None,
                f"README.md configs.{config}",
                f"no .parquet/.jsonl files match {globs}",
                "fix the paths",
            )
        )
    return files


def _rows(files: list[Path], log: ProblemLog) -> list[Any]:
    """Every row of the query files (Parquet or JSON Lines), in file order."""
    out: list[Any] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            out.extend(pq.read_table(f).to_pylist())
            continue
        for _line, obj, problem in iter_jsonl(f, str(f)):
            if problem is not None:
                if problem.field == "(file)":
                    raise log.fatal(problem)
                log.add(problem)
                log.skipped_rows += 1
                continue
            out.append(obj)
    return out
