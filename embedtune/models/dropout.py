"""Dropout on CPU tensors with the mask drawn 16 bits at a time.

``nn.Dropout`` draws its mask with ``bernoulli_``, which on CPUs runs MKL's vectorised generator on
Intel only; elsewhere (AMD EPYC) it draws one element at a time. BERT-family encoders apply such a
dropout to their hidden states twice per layer, so a training step spends more time drawing masks than
in the layer norms and activations together (measured on an AMD EPYC, 2 threads: 34 ms per
(64 x 128 x 384) mask against 11 ms here, which is a 4-million-entry draw plus a ``where``).

:class:`CpuDropout` draws the mask the way :func:`embedtune.models.attention.draw_keep_mask` does for
attention probabilities: from the default CPU generator (so ``torch.manual_seed`` and GradCache's RNG
replay repeat it), dropping an entry with probability ``round(p * 65536) / 65536`` and scaling the kept
ones by ``1 / (1 - that probability)``; the mask is kept as booleans for the backward pass. It is the
same distribution as ``nn.Dropout`` with other random numbers. Outside training, for ``p`` of 0 or 1,
and on other devices (a GPU's dropout is fast already) it is ``nn.Dropout``.

:func:`use_cpu_dropout` swaps a model's ``nn.Dropout`` modules (hidden states, PEFT's LoRA dropout, and
attention probabilities where the attention is eager) for it. Dropout modules hold no weights, so what
is saved does not change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from embedtune.models.attention import draw_keep_mask, realised_drop

__all__ = ["CpuDropout", "use_cpu_dropout"]


class _MaskedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        keep = draw_keep_mask(tuple(x.shape), p)
        ctx.scale = 1.0 / (1.0 - realised_drop(p))
        ctx.save_for_backward(keep)
        return torch.where(keep, x, 0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad_out, 0).mul_(ctx.scale), None


class CpuDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training mask is drawn 16 bits per entry (see the module docstring)."""

    def forward(self, input: Tensor) -> Tensor:
        if (
            not self.training
            or not 0 < realised_drop(self.p) < 1
            or input.device.type != "cpu"
            or not input.is_floating_point()
        ):
            return super().forward(input)
        return _MaskedDropout.apply(input, self.p)


def use_cpu_dropout(model: nn.Module) -> int:
    """Replace every ``nn.Dropout`` of ``model`` with a :class:`CpuDropout` of the same rate.

    Returns how many of them drop something (rate above 0). Subclasses of ``nn.Dropout`` other than
    the plain class are left as they are.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                new = CpuDropout(child.p, inplace=child.inplace)
                new.train(child.training)
                setattr(parent, name, new)
                swapped += child.p > 0
    return swapped
