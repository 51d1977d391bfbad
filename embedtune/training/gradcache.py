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
step 3. Every input tensor of a chunk (``pooling_mask`` included) goes through the same encoder call in
both steps, which is why instruction tokens excluded from pooling stay excluded in the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager

import torch
from torch import Tensor
from torch.utils.checkpoint import get_device_states, set_device_states

__all__ = ["GradCache", "RandContext", "split_inputs"]

Inputs = Mapping[str, Tensor]


class RandContext(AbstractContextManager["RandContext"]):
    """Capture the RNG state now; ``with ctx:`` replays it (and restores the outer state on exit).

    Args:
        tensors: tensors whose devices' RNG states must be captured too (CUDA), besides the CPU's.
    """

    def __init__(self, *tensors: Tensor) -> None:
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)
        self._fork: AbstractContextManager[None] | None = None

    def __enter__(self) -> RandContext:
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._fork is not None
        self._fork.__exit__(*exc)  # type: ignore[arg-type]
        self._fork = None


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
    """

    def __init__(self, encode: Callable[[dict[str, Tensor]], Tensor], chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.encode = encode
        self.chunk_size = chunk_size

    def _encode_no_grad(self, inputs: Inputs) -> tuple[Tensor, list[dict[str, Tensor]], list[RandContext]]:
        chunks = split_inputs(inputs, self.chunk_size)
        states: list[RandContext] = []
        reps: list[Tensor] = []
        with torch.no_grad():
            for chunk in chunks:
                states.append(RandContext(*chunk.values()))
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
