"""The distillation KL term between a bi-encoder's and a cross-encoder's scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedtune.errors import ConfigError
from embedtune.training.distill import DistillConfig, distillation_kl, group_scores


def test_matches_torch_kl_div_with_temperatures():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 3
    ours = distillation_kl(s, t, student_temperature=0.05, teacher_temperature=2.0)
    ref = F.kl_div(
        F.log_softmax(s / 0.05, -1), F.log_softmax(t / 2.0, -1), log_target=True, reduction="batchmean"
    )
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_zero_only_when_the_distributions_agree():
    t = torch.tensor([[3.0, 1.0, -2.0]])
    # Same distribution: student logits / τ_s equal teacher logits / τ_t.
    assert distillation_kl(t * 0.02, t, student_temperature=0.02).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_kl(t.flip(-1) * 0.02, t, student_temperature=0.02).item() > 0.1


def test_a_gradient_step_moves_the_student_towards_the_teacher():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=g).requires_grad_()
    t = torch.randn(4, 6, generator=g)
    before = distillation_kl(s, t, student_temperature=1.0)
    before.backward()
    assert t.grad is None  # the teacher gets no gradient
    with torch.no_grad():
        after = distillation_kl(s - 0.5 * s.grad, t, student_temperature=1.0)
    assert after < before


def test_masked_passages_are_ignored():
    s = torch.tensor([[1.0, 0.5, 9.0]])
    t = torch.tensor([[2.0, 0.0, -9.0]])
    mask = torch.tensor([[True, True, False]])
    masked = distillation_kl(s, t, student_temperature=1.0, mask=mask)
    assert torch.isfinite(masked)
    assert masked.item() == pytest.approx(
        distillation_kl(s[:, :2], t[:, :2], student_temperature=1.0).item(), rel=1e-6
    )


def test_group_scores_use_each_query_own_group():
    q = torch.eye(3)
    p = torch.arange(18, dtype=torch.float).view(6, 3)  # 2 passages per query
    gs = group_scores(q, p, 2)
    assert gs.shape == (3, 2)
    assert gs[1, 0].item() == p[2, 1].item() and gs[2, 1].item() == p[5, 2].item()


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="same"):
        distillation_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="teacher_temperature"):
        DistillConfig(teacher_temperature=0)


class _LengthTeacher:
    """A deterministic stand-in cross-encoder: the score is minus the passage length."""

    def predict(self, queries, passages, **_):
        import numpy as np

        return -np.array([len(p) for p in passages], dtype=np.float32) / 10

    def fingerprint(self) -> str:
        return "length-teacher"


def test_teacher_scores_round_trip_through_a_mined_file(tmp_path):
    import json

    from embedtune.data.formats import read_training_file
    from embedtune.mining import MiningSettings, mine_hard_negatives, write_mined
    from embedtune.models import AutoBiEncoder
    from embedtune.training.distill import OnlineTeacher, TeacherScores

    src = tmp_path / "train.jsonl"
    src.write_text(
        "".join(
            json.dumps({"query": f"question {i}", "pos_doc": f"answer {i} " + "x" * i}) + "\n"
            for i in range(12)
        )
    )
    data = read_training_file(src, cache_dir=tmp_path / "c")
    enc = AutoBiEncoder.from_pretrained("tiny-bert", max_length=16)
    teacher = _LengthTeacher()
    res = mine_hard_negatives(enc, data, MiningSettings(3, 0, 8, margin=None), reranker=teacher)
    assert res.info["reranker"]["weights_fingerprint"] == "length-teacher"
    for name in ("mined.json", "mined.jsonl"):
        out = write_mined(data, res, tmp_path / name, input_path=src)[0]
        lookup = TeacherScores.from_mined_file(str(out))
        back = read_training_file(out, cache_dir=tmp_path / "c2")
        queries = [back.queries[i] for i in range(4)]
        passages = [back.corpus.texts([*back.positives(i), *back.negatives(i)]) for i in range(4)]
        scores, mask = lookup.matrix(queries, passages)
        assert mask.all()
        expected, _ = OnlineTeacher(teacher).matrix(queries, passages)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    _unknown, mask = lookup.matrix(["never seen"], [["nothing"]])
    assert not mask.any()


def test_distillation_recipe_adds_exactly_the_weighted_kl_and_trains(tmp_path):
    import json

    from embedtune.data.formats import read_training_file
    from embedtune.mining import MiningSettings, mine_hard_negatives, write_mined
    from embedtune.models import AutoBiEncoder
    from embedtune.training.config import load_train_config
    from embedtune.training.distill import DistillTask
    from embedtune.training.recipe import Recipe

    src = tmp_path / "pairs.jsonl"
    src.write_text(
        "".join(
            json.dumps({"query": f"question {i}", "pos_doc": f"answer {i} " + "x" * i}) + "\n"
            for i in range(12)
        )
    )
    data = read_training_file(src, cache_dir=tmp_path / "c")
    enc = AutoBiEncoder.from_pretrained("tiny-bert", max_length=16)
    res = mine_hard_negatives(enc, data, MiningSettings(3, 0, 8, margin=None), reranker=_LengthTeacher())
    mined = write_mined(data, res, tmp_path / "mined.jsonl")[0]
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
        "num_threads": 1,
        "model": {"name_or_path": "tiny-bert"},
        "data": {"datasets": [{"path": str(mined)}], "n_passages": 3, "q_max_len": 16, "p_max_len": 24},
        "optimizer": {"lr": 1e-3},
        "step_scheduler": {"global_batch_size": 4, "max_steps": 2},
        "logging": {"progress_bar": False, "plot": False},
        "distill": {"weight": 0.5, "teacher_temperature": 2.0},
    }
    r = Recipe(load_train_config(recipe))
    r.setup()
    task = r.task
    assert isinstance(task, DistillTask)
    batch = r.data.batch(0, 0, 4)  # teacher scores are batch fields, collated with the examples
    assert batch["teacher"].shape == (4, 3) and batch["teacher_mask"].all()
    r.model.eval()  # no dropout: the step's loss and the terms below see the same embeddings
    total = task.forward_backward(r.model, batch, r.parallel, scale=1.0)
    r.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        q = r.model(**batch["query"])
        p = r.model(**batch["passages"])
        base = task.contrastive_loss(q, p, task.passage_keys(batch, q.device), r.parallel, n_passages=3)
        kl = distillation_kl(
            group_scores(q, p, 3),
            batch["teacher"],
            student_temperature=r.cfg.loss.temperature,
            teacher_temperature=2.0,
        )
    r.model.train()
    assert kl > 0
    assert (total - base).item() == pytest.approx(0.5 * kl.item(), rel=1e-4)
    try:
        result = r.train()
    finally:
        r.cleanup()
    assert result.exit_code == 0 and result.state.step == 2 and task.last_kl is not None
    import yaml

    from embedtune.cli import main

    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["rerank", "distill", str(path), f"output_dir={tmp_path / 'cli-run'}"]) == 0
    assert (tmp_path / "cli-run").is_dir()
    assert main(["rerank", "distill", str(path), "distill.teacher_temperature=0"]) == 2
    # `embedtune train` sees the distill: block and runs the same recipe
    assert main(["train", str(path), f"output_dir={tmp_path / 'train-run'}"]) == 0
    assert (tmp_path / "train-run").is_dir()
    assert main(["train", str(path), "distill.teacher_temperature=0"]) == 2
