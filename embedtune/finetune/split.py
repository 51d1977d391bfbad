"""A held-out split carved from training data, honest enough for before/after numbers.

Two examples that share a positive document, or whose queries are the same after normalisation
(case, accents, punctuation, spacing), are *linked*; linked examples always land on the same side.
Whole linked groups are moved to the held-out side until it holds about ``fraction`` of the queries, so:

* no held-out positive document is a positive of a training example, and
* no held-out query is a near-duplicate (same normalised text) of a training query.

Training negatives that are held-out positives are removed later (:func:`heldout_rows`), so the held-out
relevant documents are never seen in training at all.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["HeldoutSplit", "carve_heldout", "normalise_query"]

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise_query(text: str) -> str:
    """Lower-case, accent-free, punctuation-free text with single spaces (``"What's  X?"`` → ``"what s x"``)."""
    decomposed = unicodedata.normalize("NFKD", str(text))
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _NON_WORD.sub(" ", stripped.casefold()).strip()


@dataclass(frozen=True)
class HeldoutSplit:
    """Example indices of each side, and what linked them."""

    train: list[int]
    heldout: list[int]
    groups: int
    """Linked groups (components) among the examples."""
    largest_group: int
    """Examples in the largest group (groups larger than the held-out target stay in training)."""

    def describe(self) -> str:
        """One line for the output."""
        return (
            f"held-out split carved from the training data: {len(self.heldout)} queries held out, "
            f"{len(self.train)} train; no shared positive document, no near-identical query "
            f"({self.groups} linked groups, largest {self.largest_group})"
        )


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def carve_heldout(
    queries: Sequence[str],
    positives: Sequence[Sequence[int]],
    *,
    fraction: float = 0.1,
    max_queries: int = 1000,
    seed: int = 0,
) -> HeldoutSplit:
    """Split examples into train and held-out sides with no shared positive and no near-identical query.

    Args:
        queries: each example's query text.
        positives: each example's positive documents (corpus rows or ids; anything hashable).
        fraction: target share of held-out queries (at least one query when there are two examples).
        max_queries: cap on the held-out queries.
        seed: the groups are visited in a seeded random order.

    Returns:
        The split; both sides sorted.

    Raises:
        ValueError: fewer than two examples, or every example is linked into one group.
    """
    n = len(queries)
    if n != len(positives):
        raise ValueError(f"queries ({n}) and positives ({len(positives)}) differ in length")
    if n < 2:
        raise ValueError(f"a held-out split needs at least 2 examples, got {n}; pass --eval HELD_OUT")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: must be in (0, 1), got {fraction}")
    uf = _UnionFind(n)
    first_with: dict[object, int] = {}
    for i, (query, docs) in enumerate(zip(queries, positives, strict=True)):
        for key in [("q", normalise_query(query))] + [("d", d) for d in docs]:
            j = first_with.setdefault(key, i)
            if j != i:
                uf.union(i, j)
    components: dict[int, list[int]] = {}
    for i in range(n):
        components.setdefault(uf.find(i), []).append(i)
    groups = sorted(components.values())
    target = max(1, min(max_queries, round(fraction * n)))
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    heldout: list[int] = []
    for g in order:
        if len(heldout) >= target:
            break
        if len(heldout) + len(groups[g]) <= target:
            heldout.extend(groups[g])
    if not heldout or len(heldout) == n:
        raise ValueError(
            f"cannot carve a held-out split: the {n} examples are linked into {len(groups)} group(s) by shared "
            "positive documents or repeated queries (largest "
            f"{max(map(len, groups))}); pass --eval HELD_OUT"
        )
    held = set(heldout)
    return HeldoutSplit(
        train=[i for i in range(n) if i not in held],
        heldout=sorted(heldout),
        groups=len(groups),
        largest_group=max(map(len, groups)),
    )
