"""How a global batch is cut into the rows each rank processes in each accumulation step.

Rank ``r`` at accumulation step ``a`` takes the contiguous rows ``[a·W·m + r·m, a·W·m + (r+1)·m)`` of the
global batch (W ranks, m queries per pass), so the W ranks of one pass together cover exactly the rows a
single process with ``local_batch_size = W·m`` would see. One process is the case ``W = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedtune.training.process_group import DistributedError

__all__ = ["BatchPlan", "plan_batches", "slice_batch"]


@dataclass(frozen=True)
class BatchPlan:
    """How one global batch is split across ranks and accumulation steps.

    ``global_batch_size = micro_batch_size × world_size × accumulation_steps``. At accumulation step
    ``a``, rank ``r`` processes the global-batch positions
    ``[a·W·m + r·m, a·W·m + (r+1)·m)``: the W ranks together cover one contiguous block of ``W·m``
    examples, in rank order. With cross-rank negatives that block is exactly the micro-batch a single
    process with ``local_batch_size = W·m`` would see, so both runs compute the same loss.
    """

    global_batch_size: int
    micro_batch_size: int
    """Queries per rank per forward/backward pass."""
    world_size: int
    rank: int

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def positions(self, step: int) -> range:
        """Positions (within the global batch) of this rank's queries at accumulation step ``step``."""
        start = step * self.world_size * self.micro_batch_size + self.rank * self.micro_batch_size
        return range(start, start + self.micro_batch_size)

    def all_positions(self) -> list[range]:
        """This rank's positions for every accumulation step, in order."""
        return [self.positions(a) for a in range(self.accumulation_steps)]


def plan_batches(
    global_batch_size: int,
    local_batch_size: int | None,
    world_size: int,
    rank: int,
    *,
    gradcache: bool = False,
) -> BatchPlan:
    """Check ``global = local × ranks × accumulation`` and return the split for this rank.

    Args:
        global_batch_size: queries per optimizer step over all ranks (``step_scheduler.global_batch_size``).
        local_batch_size: queries per rank per forward/backward (``step_scheduler.local_batch_size``);
            None means one micro-batch per rank (``global / ranks``). With GradCache the whole rank share
            is one micro-batch, encoded in chunks, so this is ignored.
        world_size: number of ranks.
        rank: this rank.
        gradcache: GradCache on (each rank processes its whole share at once).

    Raises:
        DistributedError: the sizes are inconsistent; the message explains the rule and suggests values.
    """
    if global_batch_size % world_size:
        lo = global_batch_size - global_batch_size % world_size
        raise DistributedError(
            f"step_scheduler.global_batch_size={global_batch_size} cannot be split over {world_size} ranks: "
            f"the global batch is local_batch_size × ranks × accumulation steps, so it must be a multiple "
            f"of {world_size}; use {lo or world_size} or {lo + world_size}"
        )
    share = global_batch_size // world_size
    if gradcache or local_batch_size is None:
        micro = share
    else:
        micro = local_batch_size
        if micro > share or share % micro:
            divisors = [d for d in range(1, share + 1) if share % d == 0]
            raise DistributedError(
                f"step_scheduler.local_batch_size={micro} does not divide the per-rank share of the global "
                f"batch: global_batch_size={global_batch_size} over {world_size} ranks is {share} queries "
                f"per rank, and global = local × ranks × accumulation steps. Use a local_batch_size in "
                f"{divisors}, or set global_batch_size to {micro * world_size} × the accumulation steps "
                f"you want (e.g. {micro * world_size * max(1, share // micro)})"
            )
    return BatchPlan(global_batch_size, micro, world_size, rank)


def slice_batch(batch: dict[str, Any], rows: range) -> dict[str, Any]:
    """The queries ``rows`` of a collated batch, with their passages and document IDs.

    Args:
        batch: ``{"query": {...}: (B, Sq), "passages": {...}: (B·n, Sp), "doc_ids": (B, n)}``, passages
            grouped per query (the collator's layout); extra keys are left out.
        rows: contiguous query rows to keep.

    Returns:
        The same layout with ``len(rows)`` queries.
    """
    assert rows.step == 1, "slice_batch takes contiguous rows"
    b = batch["query"]["input_ids"].shape[0]
    n = batch["passages"]["input_ids"].shape[0] // b
    out: dict[str, Any] = {
        "query": {k: v[rows.start : rows.stop] for k, v in batch["query"].items()},
        "passages": {k: v[rows.start * n : rows.stop * n] for k, v in batch["passages"].items()},
    }
    if "doc_ids" in batch and batch["doc_ids"] is not None:
        out["doc_ids"] = batch["doc_ids"][rows.start : rows.stop]
    return out
