"""Text identity for audits: a normalised-text hash for exact duplicates, MinHash/LSH for near ones.

* :func:`normalize` -- Unicode NFKC, case-folded, every run of non-word characters one space. Two
  texts that differ only in case, punctuation or spacing normalise to the same string.
* :func:`text_key` -- a 64-bit hash of the normalised text: equal keys = exact duplicates.
* :func:`shingles` -- the set a near-duplicate test compares: word 3-grams for texts of
  ``SHORT_TEXT_WORDS`` words or more, single words below (a short query with one changed word keeps
  a Jaccard similarity of ``(n-1)/(n+1)``, 0.82 for ten words; 3-grams would drop it to 0.45).
* :class:`NearDuplicateIndex` -- candidates from datasketch's ``MinHashLSH`` (sub-linear lookup, so
  it scales to millions of texts), each *verified* by the exact Jaccard similarity of the shingle
  sets, so a reported pair is never an LSH false positive. LSH is run at a lower threshold than the
  verified one to miss fewer true pairs (its recall at the threshold itself is about 50 %).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from embedtune.errors import ConfigError

#: Texts with fewer words are shingled by single words, longer ones by word 3-grams.
SHORT_TEXT_WORDS = 20
#: MinHash permutations (the estimate's standard error is about 1/sqrt(num_perm) = 0.09).
NUM_PERM = 128

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Lower-case, NFKC-normalised text with punctuation and whitespace runs replaced by one space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _key_of_normalized(norm: str) -> int:
    digest = hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _shingles_of_normalized(norm: str) -> frozenset[str]:
    words = norm.split()
    if len(words) < SHORT_TEXT_WORDS:
        return frozenset(words)
    return frozenset(" ".join(words[i : i + 3]) for i in range(len(words) - 2))


def text_key(text: str) -> int:
    """A 63-bit hash of the normalised text (exact-duplicate identity)."""
    return _key_of_normalized(normalize(text))


def shingles(text: str) -> frozenset[str]:
    """The shingle set of a text (see the module docstring); empty for a text without words."""
    return _shingles_of_normalized(normalize(text))


def key_and_shingles(text: str) -> tuple[int, frozenset[str]]:
    """``(text_key(text), shingles(text))``, normalising once."""
    norm = normalize(text)
    return _key_of_normalized(norm), _shingles_of_normalized(norm)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Exact Jaccard similarity of two sets (0 for two empty sets)."""
    if not a and not b:
        return 0.0
    return len(a & b) / len(a | b)


def _require_datasketch() -> Any:
    try:
        import datasketch
    except ModuleNotFoundError:
        raise ConfigError(
            "near-duplicate detection needs the datasketch package: pip install 'embedtune[audit]' "
            "(or datasketch), or pass --no-near-duplicates to check exact duplicates only"
        ) from None
    return datasketch


def datasketch_available() -> bool:
    """Whether the MinHash/LSH back-end can be imported."""
    try:
        import datasketch  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


class NearDuplicateIndex:
    """Texts indexed for near-duplicate lookup (Jaccard of shingle sets >= ``threshold``).

    Args:
        threshold: the verified Jaccard similarity a pair must reach.
        num_perm: MinHash permutations.
        seed: MinHash seed (fixed: the same data gives the same report).
    """

    def __init__(self, threshold: float = 0.7, *, num_perm: int = NUM_PERM, seed: int = 1) -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        ds = _require_datasketch()
        self.threshold = threshold
        self.num_perm = num_perm
        self.seed = seed
        self._ds = ds
        self._lsh = ds.MinHashLSH(threshold=max(0.2, threshold - 0.2), num_perm=num_perm)
        self._sets: dict[Hashable, frozenset[str]] = {}

    def _minhashes(self, sets: Sequence[frozenset[str]]) -> list[Any]:
        data = [[s.encode("utf-8", "surrogatepass") for s in x] for x in sets]
        # CRC-32 instead of datasketch's default SHA-1: 5x faster, and the MinHash permutations on top
        # of it only need a well-spread 32-bit value per shingle.
        return self._ds.MinHash.bulk(data, num_perm=self.num_perm, seed=self.seed, hashfunc=zlib.crc32)

    def add(self, keys: Sequence[Hashable], sets: Sequence[frozenset[str]]) -> None:
        """Index texts by their shingle sets (empty sets are not indexed)."""
        pairs = [(k, s) for k, s in zip(keys, sets) if s and k not in self._sets]
        for (k, s), mh in zip(pairs, self._minhashes([s for _, s in pairs])):
            self._lsh.insert(k, mh)
            self._sets[k] = s

    def __len__(self) -> int:
        return len(self._sets)

    def query(self, sets: Sequence[frozenset[str]]) -> list[list[tuple[Hashable, float]]]:
        """For each shingle set, the indexed keys whose verified Jaccard similarity reaches the threshold.

        Returns:
            Per query, ``[(key, jaccard), ...]`` best first (ties by key order of insertion).
        """
        out: list[list[tuple[Hashable, float]]] = [[] for _ in sets]
        todo = [i for i, s in enumerate(sets) if s]
        for i, mh in zip(todo, self._minhashes([sets[i] for i in todo])):
            hits = []
            for key in self._lsh.query(mh):
                sim = jaccard(sets[i], self._sets[key])
                if sim >= self.threshold:
                    hits.append((key, sim))
            hits.sort(key=lambda kv: -kv[1])
            out[i] = hits
        return out


def key_groups(keys: Iterable[int]) -> dict[int, list[int]]:
    """Positions of equal keys: ``{key: [i, j, ...]}`` for keys that occur at least once."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return groups
