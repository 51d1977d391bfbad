"""NeMo AutoModel's data files and data semantics, read unchanged.

The fixtures in ``tests/fixtures/nemo`` mirror NeMo's own layouts key for key: a corpus-ID file whose
``corpus`` is an object (what NeMo's ``data_preparation.py`` writes) over a corpus folder with
``merlin_metadata.json`` instructions, and a local copy of a repository in the ``hf://`` layout
(``<subset>/dataset_metadata.json`` and ``<subset>`` / ``<subset>_corpus`` configurations).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from embedtune.data.config import DataConfig, DatasetConfig
from embedtune.data.dataset import TrainDataset, load_datasets
from embedtune.data.formats import detect_format, read_training_file
from embedtune.data.problems import DataValidationError
from embedtune.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "nemo"
OBJECT_CORPUS = FIXTURES / "corpus_id_object" / "train.json"
HF_REPO = FIXTURES / "hf_layout" / "embed-nemotron-mini"
FEVER_INSTRUCTION = "Instruct: Given a claim, retrieve documents that support or refute the claim\nQuery:"


def _nemo_negatives(negatives: list[str], k: int) -> list[str]:
    """NeMo AutoModel's selection (``_transform_func``): the first k in order, repeating when short."""
    return [negatives[i % len(negatives)] for i in range(k)]


# ----------------------------------------------------------------------------- corpus-ID, object corpus


def test_object_corpus_reads_like_the_list_form(tmp_path: Path) -> None:
    data = read_training_file(OBJECT_CORPUS)
    assert data.format == "corpus_id" and len(data) == 4
    assert data.query_ids == ["q_001", "q_002", "q_003", "q_004"]
    # The same file with the list form NeMo's docs show gives the same examples.
    doc = json.loads(OBJECT_CORPUS.read_text())
    doc["corpus"] = [doc["corpus"]]
    shutil.copytree(OBJECT_CORPUS.parent / "wiki_corpus", tmp_path / "wiki_corpus")
    (tmp_path / "train.json").write_text(json.dumps(doc))
    listed = read_training_file(tmp_path / "train.json")
    assert [data.corpus.texts(data.negatives(i)) for i in range(4)] == [
        listed.corpus.texts(listed.negatives(i)) for i in range(4)
    ]
    assert data.instructions_of(0).query == (
        "Instruct: Given a question, retrieve passages that answer the question\nQuery:"
    )


def test_corpus_that_is_neither_object_nor_list_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text('{"corpus": 3, "data": []}')
    with pytest.raises(DataValidationError, match=r"corpus: expected an object or a list, got a number"):
        read_training_file(tmp_path / "train.json")


# ----------------------------------------------------------------------------- hf:// layout


def test_hf_layout_subset_folder_reads_queries_corpus_and_instructions() -> None:
    fever = HF_REPO / "FEVER"
    assert detect_format(fever) == "hf"
    data = read_training_file(fever)
    assert data.format == "hf" and len(data) == 2
    # A missing question_id gets NeMo's "<subset>:<row>"; a scalar pos_doc is wrapped into a list.
    assert data.query_ids == ["fever-0", "FEVER:1"]
    assert data.corpus.texts(data.positives(1)) == ["Rome is the capital of Italy."]
    assert data.corpus.texts(data.negatives(0)) == [
        "Berlin is the capital of Germany.",
        "Madrid is in Spain.",
        "Rome is the capital of Italy.",
    ]
    assert data.instructions_of(0).query == FEVER_INSTRUCTION


def test_hf_layout_repository_root_reads_every_subset_with_its_own_instructions() -> None:
    data = read_training_file(HF_REPO)
    assert len(data) == 3
    assert sorted(data.query_ids) == ["FEVER:1", "fever-0", "sf-1"]
    by_qid = {q: data.instructions_of(i).query for i, q in enumerate(data.query_ids)}
    assert by_qid["fever-0"] == FEVER_INSTRUCTION and by_qid["sf-1"] is None
    sf = data.query_ids.index("sf-1")
    assert data.corpus.texts(data.positives(sf)) == ["Aspirin reduces fever."]


def _hub_cache(tmp_path: Path, repo: str) -> Path:
    """A hub cache holding ``repo`` as ``snapshot_download`` leaves it (refs/main -> snapshot)."""
    cache = tmp_path / "hub"
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    shutil.copytree(HF_REPO, folder / "snapshots" / "0123abcd")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    return cache


def test_hf_uri_goes_through_the_hub_client_and_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(_hub_cache(tmp_path, "acme/mini")))
    uri = "hf://acme/mini/FEVER"
    assert detect_format(uri) == "hf"
    data = read_training_file(uri)
    local = read_training_file(HF_REPO / "FEVER")
    assert data.queries == local.queries
    assert [data.corpus.texts(data.negatives(i)) for i in range(2)] == [
        local.corpus.texts(local.negatives(i)) for i in range(2)
    ]
    # A repository that is not in the cache, offline: a clear message, not a traceback.
    with pytest.raises(
        DataValidationError, match=r"hf://acme/absent/FEVER: .*cannot be fetched.*HF_HUB_OFFLINE"
    ):
        read_training_file("hf://acme/absent/FEVER")


def test_ids_only_subset_is_refused_naming_the_field() -> None:
    with pytest.raises(
        DataValidationError, match=r"dataset_metadata.json: ids_only: true.*data_preparation.py"
    ):
        read_training_file(FIXTURES / "hf_layout" / "ids-only-repo" / "IdsOnly")


def test_missing_configuration_in_the_card_names_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(HF_REPO, repo)
    card = (repo / "README.md").read_text().replace("config_name: FEVER_corpus", "config_name: Other")
    (repo / "README.md").write_text(card)
    with pytest.raises(
        DataValidationError, match=r"README.md configs.FEVER_corpus: .*names no 'train' files"
    ):
        read_training_file(repo / "FEVER")


# ----------------------------------------------------------------------------- mixing with num_samples


def test_num_samples_keeps_nemos_random_subset_in_both_spellings() -> None:
    as_dict = DataConfig(datasets=[{"path": str(OBJECT_CORPUS), "num_samples": 2}], seed=42)
    as_list = DataConfig(datasets=[[2, str(OBJECT_CORPUS)]], seed=42)
    (a,) = load_datasets(as_dict)
    (b,) = load_datasets(as_list)
    full = read_training_file(OBJECT_CORPUS)
    # NeMo: random.Random(seed).sample(data_items, num_samples)
    expected = [full.query_ids[i] for i in random.Random(42).sample(range(len(full)), 2)]
    assert a.query_ids == b.query_ids == expected
    assert [a.corpus.texts(a.negatives(i)) for i in range(2)] == [
        full.corpus.texts(full.negatives(full.query_ids.index(q))) for q in expected
    ]


def test_num_samples_mixes_next_to_weights() -> None:
    cfg = DataConfig(
        datasets=[[1, str(OBJECT_CORPUS)], {"path": str(HF_REPO / "FEVER"), "weight": 3.0}],
        n_passages=2,
        samples_per_epoch=8,
    )
    ds = TrainDataset.from_config(cfg)
    picks = [ds[i].dataset for i in range(len(ds))]
    assert len(ds) == 8 and picks.count(0) == 2 and picks.count(1) == 6


def test_bad_dataset_entries_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"datasets\[0\]: expected a mapping .*\[num_samples, path\]"):
        DataConfig(datasets=[["x", 2]])
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.num_samples: must be an integer >= 1"):
        DataConfig(datasets=[{"path": "x.jsonl", "num_samples": 0}])


# ----------------------------------------------------------------------------- selection semantics


def _dataset(**options: object) -> TrainDataset:
    return TrainDataset.from_config(DataConfig(datasets=[DatasetConfig(path=str(OBJECT_CORPUS))], **options))


@pytest.mark.parametrize("n_passages", [2, 4, 6])
def test_negative_selection_first_is_nemos_selection(n_passages: int) -> None:
    ds = _dataset(n_passages=n_passages, negative_selection="first", fill_negatives="repeat")
    data = ds.datasets[0]
    for example in range(len(data)):
        ids = [data.corpus.ids[r] for r in data.negatives(example)]
        for epoch in (0, 1, 5):
            got = [data.corpus.ids[r] for r in ds.sample_negatives(0, example, epoch)]
            assert got == _nemo_negatives(ids, n_passages - 1)


def test_random_selection_is_not_nemos_for_a_long_list() -> None:
    # The control for the test above: embedtune's default rotates, so some epoch differs from "first".
    ds = _dataset(n_passages=2, negative_selection="random")
    data = ds.datasets[0]
    firsts = {tuple(ds.sample_negatives(0, 2, e)) for e in range(5)}
    assert len(firsts) > 1 and firsts != {tuple(data.negatives(2)[:1].tolist())}


def test_cycle_positive_docs() -> None:
    on = _dataset(n_passages=1)
    off = _dataset(n_passages=1, cycle_positive_docs=False)
    texts = lambda ds, epoch: ds.item(0, 0, epoch).passages[0]  # noqa: E731
    assert texts(on, 0) != texts(on, 1)  # q_001 has two positives: epoch 1 takes the second
    assert (
        texts(off, 0) == texts(off, 1) == "Transformers are a type of neural network built on self-attention."
    )


def test_dataset_instructions_and_their_separator() -> None:
    instruction = "Instruct: Given a question, retrieve passages that answer the question\nQuery:"
    assert _dataset(n_passages=1).item(0, 0, 0).query_instruction == instruction  # embedtune: concatenated
    nemo = _dataset(n_passages=1, instruction_separator=" ").item(0, 0, 0)
    assert nemo.query_instruction + nemo.query == f"{instruction} Explain transformers"  # NeMo's f"{i} {q}"
    # An empty metadata instruction stays empty (no stray separator), and use_dataset_instruction
    # false ignores the metadata altogether, as NeMo does by default.
    assert nemo.passage_instruction is None
    assert _dataset(n_passages=1, use_dataset_instruction=False).item(0, 0, 0).query_instruction is None


def test_unknown_negative_selection_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"negative_selection: 'hardest' is not one of: random, first"):
        DataConfig(datasets=["x.jsonl"], negative_selection="hardest")
