"""`embedtune finetune` end to end on tiny models: stages, rerun, kill + resume, the recipe it writes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _train_helpers import cli_env, final_weights, write_pairs

from embedtune.finetune.pipeline import FinetuneOptions, run_finetune
from embedtune.finetune.split import normalise_query

# Small and quick: 8 steps, one thread, no margin filter (a random model scores everything alike).
SETTINGS = [
    "num_threads=1",
    "step_scheduler.max_steps=8",
    "step_scheduler.ckpt_every_steps=2",
    "data.p_max_len=32",
    "data.q_max_len=16",
    "model.max_length=32",
    "logging.progress_bar=false",
    "logging.plot=false",
    "pipeline.mining.margin=null",
]


def _options(data: Path, out: Path, **kw) -> FinetuneOptions:
    return FinetuneOptions(
        model="tiny-bert", data=str(data), output=str(out), overrides=SETTINGS, ci_resamples=50, **kw
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    tmp = tmp_path_factory.mktemp("finetune")
    mp = pytest.MonkeyPatch()
    mp.setenv("EMBEDTUNE_CACHE_DIR", str(tmp / "cache"))
    data = write_pairs(tmp / "pairs.jsonl", n=48)
    result = run_finetune(_options(data, tmp / "run"))
    yield tmp, data, result
    mp.undo()


def test_whole_pipeline(finished) -> None:
    tmp, _, result = finished
    out = tmp / "run"
    assert result.exit_code == 0 and result.ran == ["validate", "mine", "eval_before", "train", "eval_after"]
    assert (out / "model" / "config.json").is_file() and result.model_dir == out / "model"
    mined = json.loads((out / "data" / "train_mined.json").read_text())
    assert sum(len(r["neg_doc"]) for r in mined["data"]) > 0  # hard negatives were mined
    for name in ("before", "after"):
        assert 0 <= json.loads((out / "eval" / f"{name}.json").read_text())["metrics"]["ndcg@10"] <= 1
    assert result.before != result.after  # the model changed
    recipe = yaml.safe_load((out / "finetune.yaml").read_text())
    assert recipe["model"]["attention_dropout"] == 0.0  # tiny-bert's own is 0.1


def test_a_carved_split_is_evaluated_on_minings_corpus_embeddings_with_the_folders_numbers(finished) -> None:
    """The corpus is encoded once per model: mining's base-model embeddings serve "before" (the held-out
    folder's copy of the corpus had another fingerprint, so "before" re-encoded it: 3 entries, not 2),
    and the written folder, evaluated on its own, gives the command's numbers."""
    from embedtune.eval.datasets import load_eval_set
    from embedtune.eval.retrieval import run_evaluation
    from embedtune.finetune.pipeline import K_VALUES
    from embedtune.models import AutoBiEncoder

    tmp, _, result = finished
    out = tmp / "run"
    entries = [json.loads(p.read_text()) for p in (tmp / "cache" / "embeddings").glob("*.json")]
    documents = [e for e in entries if e["kind"] == "document"]
    assert len(documents) == 2, [(e["corpus"], e["model"][:80]) for e in documents]  # base, fine-tuned
    assert len({e["corpus"] for e in documents}) == 1
    tuned = AutoBiEncoder.from_pretrained(str(out / "model"), max_length=32, device="cpu").eval()
    folder = run_evaluation(
        tuned, load_eval_set(out / "data" / "heldout", "test"), K_VALUES, cache_dir=tmp / "own_cache"
    )
    assert folder.metrics == pytest.approx(result.after, abs=1e-6)


def test_heldout_split_shares_no_document_and_no_query_with_training(finished) -> None:
    tmp, _, _ = finished
    out = tmp / "run"
    mined = json.loads((out / "data" / "train_mined.json").read_text())
    held_q = [json.loads(line)["text"] for line in (out / "data" / "heldout" / "queries.jsonl").open()]
    held_docs = {
        line.split("\t")[1] for line in list((out / "data" / "heldout" / "qrels" / "test.tsv").open())[1:]
    }
    train_docs = {d["id"] for r in mined["data"] for d in r["pos_doc"] + r["neg_doc"]}
    assert held_q and held_docs
    assert not held_docs & train_docs
    assert not {normalise_query(q) for q in held_q} & {normalise_query(r["question"]) for r in mined["data"]}


def test_rerun_skips_done_stages(finished, capsys) -> None:
    tmp, data, first = finished
    again = run_finetune(_options(data, tmp / "run"))
    assert again.ran == [] and again.skipped == first.ran
    assert again.after == first.after
    assert "skipped" in capsys.readouterr().out


def test_export_added_later_runs_only_the_export_stage(finished) -> None:
    pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra")
    tmp, data, first = finished
    again = run_finetune(_options(data, tmp / "run", export="onnx"))
    assert again.ran == ["export"] and again.skipped == first.ran
    assert (tmp / "run" / "onnx" / "embedtune.json").is_file()


def test_other_inputs_in_the_same_folder_are_refused(finished) -> None:
    tmp, data, _ = finished
    with pytest.raises(Exception, match="other inputs"):
        run_finetune(_options(data, tmp / "run", heldout_fraction=0.2))


@pytest.mark.slow
def test_written_recipe_trains_to_the_same_model(finished) -> None:
    """`embedtune train DIR/finetune.yaml` (pipeline block ignored) gives the model finetune saved."""
    tmp, _, _ = finished
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedtune",
            "train",
            str(tmp / "run" / "finetune.yaml"),
            f"output_dir={tmp / 'by_train'}",
        ],
        capture_output=True,
        text=True,
        env={**cli_env(), "EMBEDTUNE_CACHE_DIR": str(tmp / "cache")},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = final_weights(tmp / "run" / "model"), final_weights(tmp / "by_train" / "model")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_decoder_trains_under_lora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder gets a peft block (LoRA), bidirectional attention and prefixes; adapter and merged model saved."""
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "pairs.jsonl", n=48)
    opts = _options(data, tmp_path / "run")
    opts.model = "tiny-llama"
    result = run_finetune(opts)
    recipe = yaml.safe_load((tmp_path / "run" / "finetune.yaml").read_text())
    assert recipe["peft"]["match_all_linear"] and recipe["model"]["bidirectional"]
    assert recipe["model"]["query_prefix"] == "query: "
    assert recipe["data"]["n_passages"] == 1 and "mine" in result.ran  # in-batch only: nothing mined
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert result.exit_code == 0 and (tmp_path / "run" / "model" / "config.json").is_file()
    assert result.before != result.after


def test_a_bfloat16_checkpoint_is_evaluated_before_and_after_in_the_saved_models_float32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Most hub decoders ship bfloat16; "before" must not run in it while the saved model is float32."""
    from safetensors import safe_open

    from embedtune.models import AutoBiEncoder

    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    AutoBiEncoder.from_pretrained("tiny-llama").save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    opts = _options(write_pairs(tmp_path / "pairs.jsonl", n=48), tmp_path / "run")
    opts.model, opts.overrides = str(tmp_path / "bf16"), [*SETTINGS, "model.dtype=bfloat16"]
    assert run_finetune(opts).exit_code == 0
    with safe_open(str(tmp_path / "run" / "model" / "model.safetensors"), "pt") as f:
        names = f.keys()
        saved = {str(f.get_tensor(k).dtype).removeprefix("torch.") for k in names}
    evaluated = [
        json.loads((tmp_path / "run" / "eval" / f"{n}.json").read_text())["dtype"]
        for n in ("before", "after")
    ]
    assert saved == {"float32"} and evaluated == ["float32", "float32"]
    assert "(weights in float32, before and after)" in capsys.readouterr().out


class _Stopped:
    exit_code = 3


def _stop_training(cfg: object) -> _Stopped:
    return _Stopped()


def _run_until_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str]) -> tuple:
    """Validate, mine and evaluate the base with ``overrides``; training stops at once. (result, mined)."""
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    opts = _options(write_pairs(tmp_path / "pairs.jsonl", n=48), tmp_path / "run")
    opts.overrides = overrides
    result = run_finetune(opts, train_fn=_stop_training)
    return result, json.loads((tmp_path / "run" / "data" / "train_mined.json").read_text())


def test_one_passage_per_query_writes_the_training_queries_unmined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from embedtune.data.formats import read_training_file

    result, mined = _run_until_training(tmp_path, monkeypatch, [*SETTINGS, "data.n_passages=1"])
    assert result.exit_code == 3 and "mine: not needed" in capsys.readouterr().out
    split = json.loads((tmp_path / "run" / "data" / "split.json").read_text())
    assert len(mined["data"]) == len(split["train"]) and mined["mining"]["not_mined"]
    assert all(r["neg_doc"] == [] and r["pos_doc"] and "score" not in r["pos_doc"][0] for r in mined["data"])
    back = read_training_file(tmp_path / "run" / "data" / "train_mined.json")
    assert list(back.queries) == [r["question"] for r in mined["data"]]


def test_mining_model_mines_instead_of_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, mined = _run_until_training(tmp_path, monkeypatch, [*SETTINGS, "pipeline.mining.model=tiny-llama"])
    assert mined["mining"]["model"]["name_or_path"] == "tiny-llama"
    assert sum(len(r["neg_doc"]) for r in mined["data"]) > 0


def test_a_miner_that_scores_documents_alike_is_named_as_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A random tiny model scores everything alike: the 95% margin leaves (almost) no negatives.
    no_margin_override = [s for s in SETTINGS if not s.startswith("pipeline.mining.margin")]
    _, mined = _run_until_training(tmp_path, monkeypatch, no_margin_override)
    empty = sum(1 for r in mined["data"] if not r["neg_doc"])
    assert empty * 2 > len(mined["data"])
    out = capsys.readouterr().out
    assert f"warning: {empty} of {len(mined['data'])} training queries have no mined negative" in out
    assert "pipeline.mining.model" in out


# ------------------------------------------------------------------------------------ killed runs
def _cmd(data: Path, out: Path) -> list[str]:
    sets = [a for s in SETTINGS for a in ("--set", s)]
    return [
        sys.executable,
        "-m",
        "embedtune",
        "finetune",
        "--model",
        "tiny-bert",
        "--data",
        str(data),
        "--output",
        str(out),
        "--ci-resamples",
        "50",
        *sets,
    ]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stdout.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("timed out waiting for the moment to kill")


@pytest.mark.slow
@pytest.mark.parametrize("during", ["mine", "train"])
def test_killed_run_resumes_to_the_uninterrupted_model(tmp_path: Path, during: str) -> None:
    env = {**cli_env(), "EMBEDTUNE_CACHE_DIR": str(tmp_path / "cache")}
    data = write_pairs(tmp_path / "pairs.jsonl", n=48)
    whole = subprocess.run(
        _cmd(data, tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=900
    )
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(data, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if during == "mine":
        # Killed once the split is done and before mining has finished.
        _kill_when(proc, lambda: (out / "stages" / "validate.json").is_file())
        assert not (out / "stages" / "mine.json").exists()
    else:
        _kill_when(proc, lambda: any((out / "checkpoints").glob("step_*/checkpoint.json")))
        assert not (out / "stages" / "train.json").exists()
    proc.stdout.close()

    rerun = subprocess.run(_cmd(data, out), env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if during == "train":  # mining is not redone; training continues from its checkpoint
        assert "mine: done earlier" in rerun.stdout and "resumed from" in rerun.stdout
    else:
        assert "validate: done earlier" in rerun.stdout and "mine: running" in rerun.stdout
    a, b = final_weights(tmp_path / "whole" / "model"), final_weights(out / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
