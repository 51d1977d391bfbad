"""Shared helpers for the training recipe tests: a small synthetic data set and CLI runners."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
]


def write_pairs(path: Path, n: int = 40, n_neg: int = 3, seed: int = 0) -> Path:
    """An inline JSONL training file: query, positive, hard negatives (word-overlap based)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            w = rng.sample(WORDS, 3)
            negs = [
                f"{rng.choice(WORDS)} {rng.choice(WORDS)} unrelated passage {i}-{j}" for j in range(n_neg)
            ]
            f.write(
                json.dumps(
                    {
                        "query": f"what is {w[0]} {w[1]}?",
                        "pos_doc": f"{w[0]} {w[1]} {w[2]}: document {i}.",
                        "neg_doc": negs,
                    }
                )
                + "\n"
            )
    return path


def tiny_recipe(tmp: Path, backbone: str = "tiny-llama", **sections) -> dict:
    """A recipe that trains a tiny random model for a few steps on :func:`write_pairs` data."""
    data = write_pairs(tmp / "train.jsonl")
    recipe = {
        "output_dir": str(tmp / "run"),
        "seed": 7,
        "num_threads": 1,  # deterministic and polite on a shared 2-core machine
        "model": {"name_or_path": backbone},
        "data": {"datasets": [{"path": str(data)}], "n_passages": 3, "q_max_len": 16, "p_max_len": 24},
        "optimizer": {"lr": 1e-3},
        "lr_scheduler": {"name": "linear", "warmup_steps": 2},
        "step_scheduler": {
            "global_batch_size": 8,
            "local_batch_size": 4,
            "max_steps": 8,
            "ckpt_every_steps": 2,
        },
        "logging": {"progress_bar": False, "plot": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def train_cmd(recipe: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "embedtune.cli", "train", str(recipe), *overrides]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embedtune.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
    )


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def final_weights(model_dir: Path) -> dict:
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def teacher_reranker(path: Path) -> Path:
    """A tiny cross-encoder saved to ``path`` (seeded: the same teacher every time), for distillation."""
    if not (path / "embedtune_reranker.json").is_file():
        import torch

        from embedtune.reranker.model import CrossEncoderReranker

        torch.manual_seed(0)
        CrossEncoderReranker.from_pretrained("tiny-bert", max_length=48).save_pretrained(path)
    return path


def task_sections(task: str, tmp: Path, backbone: str = "tiny-llama") -> dict:
    """The recipe blocks that select ``task`` (``biencoder``, ``distill``, ``rerank``) — one schema for all.

    ``distill`` learns from a tiny cross-encoder scoring every batch on the fly; ``rerank`` trains
    ``backbone`` itself as a cross-encoder (groups of ``data.n_passages``).
    """
    if task == "biencoder":
        return {"model": {"name_or_path": backbone}}
    if task == "distill":
        teacher = teacher_reranker(tmp.parent / "teacher")
        return {"model": {"name_or_path": backbone}, "distill": {"weight": 0.5, "teacher": str(teacher)}}
    if task == "rerank":
        return {"recipe": "rerank", "model": {"name_or_path": backbone, "max_length": 40}}
    raise ValueError(task)
