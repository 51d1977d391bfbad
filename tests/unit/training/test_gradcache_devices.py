"""GradCache replays the RNG of the device the model runs on, not only of its (CPU) input tensors."""

from __future__ import annotations

import math

import pytest
import torch

from embedtune.training import gradcache
from embedtune.training.gradcache import GradCache, RandContext
from embedtune.training.loss import InfoNCELoss, LossConfig

N_PASSAGES = 3
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


def _inputs(g: torch.Generator, n: int, seq: int, vocab: int = 100) -> dict[str, torch.Tensor]:
    """Right-padded random tokens on the CPU, as the collator hands them over."""
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (n,), generator=g)
    attn = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * attn, "attention_mask": attn, "pooling_mask": attn.clone()}


def _fake_device_rng(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.device]]:
    """Route RNG get/set of non-CPU devices to a log (the CPU generator stays real)."""
    log: list[tuple[str, torch.device]] = []

    def get(device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return torch.get_rng_state()
        log.append(("get", device))
        return torch.zeros(8, dtype=torch.uint8)

    def set_(device: torch.device, state: torch.Tensor) -> None:
        if device.type == "cpu":
            return torch.set_rng_state(state)
        log.append(("set", device))

    # raising=False: on code without these functions the log stays empty and the asserts say so.
    monkeypatch.setattr(gradcache, "get_rng_state", get, raising=False)
    monkeypatch.setattr(gradcache, "set_rng_state", set_, raising=False)
    return log


def _tiny_step(**gradcache_kwargs: object) -> tuple[int, int]:
    from _training_tiny import TinyEncoder

    g = torch.Generator().manual_seed(0)
    q, p = _inputs(g, 4, 6, vocab=50), _inputs(g, 4 * N_PASSAGES, 8, vocab=50)
    model = TinyEncoder(dropout=0.1)
    loss_fn = InfoNCELoss(LossConfig())
    GradCache(lambda x: model(**x), 2, **gradcache_kwargs)(
        q, p, lambda a, b: loss_fn(a, b, n_passages=N_PASSAGES)
    )
    return math.ceil(4 / 2), math.ceil(4 * N_PASSAGES / 2)


def test_each_chunk_captures_and_replays_the_named_model_device(monkeypatch):
    log = _fake_device_rng(monkeypatch)
    fake = torch.device("cuda", 0)  # the model's device; the inputs stay on the CPU
    nq, np_ = _tiny_step(devices=[fake])
    chunks = nq + np_
    assert log.count(("get", fake)) >= chunks  # captured before every chunk's first forward
    assert log.count(("set", fake)) >= 2 * chunks  # replayed for every second forward, then restored


def test_by_default_the_current_accelerator_is_captured(monkeypatch):
    """Today's code captured only the devices of the chunk's input tensors: none for CPU inputs."""
    log = _fake_device_rng(monkeypatch)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    nq, np_ = _tiny_step()
    captured = {d for op, d in log if op == "get"}
    assert torch.device("cuda", 0) in captured
    assert log.count(("set", torch.device("cuda", 0))) >= 2 * (nq + np_)


def test_rand_context_restores_the_outer_state_of_every_device():
    ctx = RandContext(devices=["cpu"])
    a = torch.rand(3)
    with ctx:
        b = torch.rand(3)
    c = torch.rand(3)
    assert torch.equal(a, b) and not torch.equal(c, a)
    assert ctx.devices == [torch.device("cpu")]


# ----------------------------------------------------------------------- real dropout on a real device
def _tiny_bert(device: str, attn: str = "eager") -> torch.nn.Module:
    from _tiny_bert import dropout_bert

    from embedtune.models.attention import use_blockwise_dropout_attention
    from embedtune.models.dropout import use_cpu_dropout

    # float64: the comparison then measures the RNG replay, not float32 summation order.
    model = dropout_bert({"blockwise": "sdpa", "cpu-dropout": "eager"}.get(attn, attn))
    model = model.to(device=device, dtype=torch.float64).train()
    if attn == "blockwise":  # embedtune's CPU dropout attention, which also runs in the no-grad pass
        assert use_blockwise_dropout_attention(model)
    if attn in ("blockwise", "cpu-dropout"):  # and its CPU dropout (hidden states; eager: attention too)
        assert use_cpu_dropout(model)
    return model


def _encoder(model: torch.nn.Module, device: str):
    def encode(x: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = x["attention_mask"].to(device)  # inputs arrive on the CPU, like the recipe's batches
        h = model(input_ids=x["input_ids"].to(device), attention_mask=mask).last_hidden_state
        m = x["pooling_mask"].to(device).unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    return encode


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference_and_cached(device: str, devices: list[str] | None, attn: str = "eager") -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(1)
    b, chunk = 6, 4
    q, p = _inputs(g, b, 10), _inputs(g, b * N_PASSAGES, 12)
    model = _tiny_bert(device, attn)
    enc = _encoder(model, device)
    loss_fn = InfoNCELoss(LossConfig(temperature=0.05))

    def loss_of(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return loss_fn(a, c, n_passages=N_PASSAGES)

    # Plain: the same chunks with autograd kept, so its dropout draws are the ones GradCache must replay.
    torch.manual_seed(123)
    q_emb = torch.cat([enc({k: v[i : i + chunk] for k, v in q.items()}) for i in range(0, b, chunk)])
    p_emb = torch.cat(
        [enc({k: v[i : i + chunk] for k, v in p.items()}) for i in range(0, b * N_PASSAGES, chunk)]
    )
    loss_of(q_emb, p_emb).backward()
    plain = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    kwargs = {} if devices is None else {"devices": devices}
    GradCache(enc, chunk, **kwargs)(q, p, loss_of)
    return plain, _grads(model)


@pytest.mark.parametrize(
    ("device", "attn"),
    [
        ("cpu", "eager"),
        ("cpu", "blockwise"),
        ("cpu", "cpu-dropout"),
        pytest.param(*CUDA.values, "eager", marks=CUDA.marks),
    ],
)
def test_cached_gradients_equal_plain_ones_with_dropout_on_the_model_device(device, attn):
    plain, cached = _reference_and_cached(device, devices=[device], attn=attn)
    assert plain.keys() == cached.keys() and plain
    for name in plain:
        torch.testing.assert_close(
            cached[name], plain[name], rtol=1e-6, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_without_the_model_device_the_replay_draws_other_masks():
    """Guards the test above: replaying only the CPU generator (today's behaviour) changes the gradients."""
    plain, cached = _reference_and_cached("cuda", devices=["cpu"])
    assert any(not torch.allclose(cached[n], plain[n], rtol=1e-6, atol=1e-10) for n in plain)
