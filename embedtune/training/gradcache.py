"""GradCache: contrastive loss over a large batch with the activation memory of a small chunk.

Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup". A
contrastive loss couples every query with every passage, so the batch cannot simply be split into
independent micro-batches without losing negatives. GradCache splits the work instead:

1. encode all chunks **without** autograd, keeping only the embeddings (B x d, tiny);
2. compute the loss on those embeddings with autograd and backpropagate it to the embeddings only,
   caching d(loss)/d(embedding);
3. re-encode each chunk **with** autograd and backpropagate the cached embedding gradients through it.

Step 3 must reproduce step 1 exactly, dropout included, or the cached gradient belongs to a different
forward pass; so the RNG state is captured before each chunk in step 1 and restored for its re-run in
step 3 — on every device that draws random numbers: the CPU *and* the device the model runs on (the
chunk's input tensors may still be on the CPU, so their devices say nothing). Every input tensor of a
chunk (``pooling_mask`` included) goes through the same encoder call in both steps, which is why
instruction tokens excluded from pooling stay excluded in the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager

import torch
from torch import Tensor

__all__ = ["GradCache", "RandContext", "default_rng_devices", "split_inputs"]

Inputs = Mapping[str, Tensor]


def _normalize(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: RNG state belongs to one device, so name it."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.get_device_module(device.type).current_device())
    return device


def get_rng_state(device: torch.device) -> Tensor:
    """The RNG state of one device (the CPU generator for ``cpu``)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def set_rng_state(device: torch.device, state: Tensor) -> None:
    """Restore the RNG state of one device."""
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


def default_rng_devices() -> list[torch.device]:
    """The CPU and, when one is available, the current accelerator device (e.g. ``cuda:0``)."""
    devices = [torch.device("cpu")]
    if torch.accelerator.is_available():
        acc = torch.accelerator.current_accelerator()
        assert acc is not None
        devices.append(torch.device(acc.type, torch.accelerator.current_device_index()))
    return devices


class RandContext(AbstractContextManager["RandContext"]):
    """Capture RNG states now; ``with ctx:`` replays them (and restores the outer states on exit).

    The CPU generator is always captured. Dropout on a GPU draws from *that GPU's* generator, so the
    devices the model runs on must be named in ``devices``: the devices of ``tensors`` are added too, but
    the inputs of an encoder are often still on the CPU (the collator's tensors), which is how a replay
    silently draws new dropout masks.

    Args:
        tensors: tensors whose devices' RNG states are captured too.
        devices: devices whose RNG states are captured (e.g. the model's device).
    """

    def __init__(self, *tensors: Tensor, devices: Iterable[torch.device | str] = ()) -> None:
        wanted = [torch.device("cpu"), *(t.device for t in tensors), *devices]
        self.devices: list[torch.device] = list(
            dict.fromkeys(_normalize(d) for d in wanted if torch.device(d).type != "meta")
        )
        self.states = [get_rng_state(d) for d in self.devices]
        self._outer: list[Tensor] | None = None

    def __enter__(self) -> RandContext:
        self._outer = [get_rng_state(d) for d in self.devices]
        for d, state in zip(self.devices, self.states):
            set_rng_state(d, state)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._outer is not None
        for d, state in zip(self.devices, self._outer):
            set_rng_state(d, state)
        self._outer = None


def split_inputs(inputs: Inputs, chunk_size: int) -> list[dict[str, Tensor]]:
    """Split a dict of (n, ...) tensors into dicts of at most ``chunk_size`` rows, in order."""
    n = next(iter(inputs.values())).shape[0]
    return [{k: v[i : i + chunk_size] for k, v in inputs.items()} for i in range(0, n, chunk_size)]


class GradCache:
    """Compute a contrastive loss over a whole batch, encoding it ``chunk_size`` rows at a time.

    Args:
        encode: maps a dict of tokenised inputs (``input_ids``, ``attention_mask``, ``pooling_mask``) to
            (n, d) embeddings; autocast and the like are the caller's business.
        chunk_size: rows encoded per forward pass (bounds activation memory).
        devices: the devices ``encode`` runs the model on, whose RNG (with the CPU's) is captured before
            each chunk and replayed for its second forward; default :func:`default_rng_devices` (the CPU
            and the current accelerator). Pass the model's device.
    """

    def __init__(
        self,
        encode: Callable[[dict[str, Tensor]], Tensor],
        chunk_size: int,
        *,
        devices: Iterable[torch.device | str] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.encode = encode
        self.chunk_size = chunk_size
        self.devices = list(devices) if devices is not None else default_rng_devices()

    def _encode_no_grad(self, inputs: Inputs) -> tuple[Tensor, list[dict[str, Tensor]], list[RandContext]]:
        chunks = split_inputs(inputs, self.chunk_size)
        states: list[RandContext] = []
        reps: list[Tensor] = []
        with torch.no_grad():
            for chunk in chunks:
                states.append(RandContext(*chunk.values(), devices=self.devices))
                reps.append(self.encode(chunk))
        return torch.cat(reps), chunks, states

    def __call__(
        self,
        queries: Inputs,
        passages: Inputs,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        scale: float = 1.0,
    ) -> Tensor:
        """Run forward and backward for one batch; gradients accumulate into the parameters' ``.grad``.

        Args:
            queries: tokenised queries, (B, Sq) tensors.
            passages: tokenised passages, (N, Sp) tensors.
            loss_fn: ``loss_fn(query_embeddings, passage_embeddings) -> scalar``.
            scale: multiplies the loss before backpropagation (e.g. 1 / accumulation steps).

        Returns:
            The (unscaled) loss, detached. If it is not finite, no gradient is propagated into the model
            so that the caller can stop before the optimizer step.
        """
        q_reps, q_chunks, q_states = self._encode_no_grad(queries)
        p_reps, p_chunks, p_states = self._encode_no_grad(passages)

        # Step 2: loss on detached embeddings -> d(loss)/d(embedding).
        q_leaf = q_reps.detach().requires_grad_(True)
        p_leaf = p_reps.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(q_leaf, p_leaf)
        if not torch.isfinite(loss):
            return loss.detach()
        (loss * scale).backward()
        assert q_leaf.grad is not None and p_leaf.grad is not None

        # Step 3: replay each chunk with autograd and push its cached gradient through the encoder.
        for leaf_grad, chunks, states in (
            (q_leaf.grad, q_chunks, q_states),
            (p_leaf.grad, p_chunks, p_states),
        ):
            start = 0
            for chunk, state in zip(chunks, states):
                n = next(iter(chunk.values())).shape[0]
                with state:
                    reps = self.encode(chunk)
                # Dot with the cached gradient: backward of this surrogate gives exactly J^T * grad.
                torch.autograd.backward(reps, grad_tensors=leaf_grad[start : start + n].to(reps.dtype))
                start += n
        return loss.detach()
