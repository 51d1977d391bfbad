"""Re-mining under torchrun: ``ShardedEncoder`` splits the encoding over the ranks, every rank gets it all.

2 gloo ranks on the CPU. Each rank embeds half of the texts (the odd one out padded, so both run the
same number of forward passes, as FSDP2 requires), and the gathered embeddings equal one process
encoding everything itself.
"""

from __future__ import annotations

import numpy as np
from _dist_harness import run_ranks
from _dist_workers import sharded_encoding_worker, tiny_encoder

TEXTS = [
    [f"document number {i} about {'cells ' * (i % 5)}and proteins" for i in range(7)],  # 7: odd
    ["a single text"],  # fewer texts than ranks
]


def test_two_ranks_each_encode_half_and_gather_what_one_process_computes(tmp_path):
    run_ranks(sharded_encoding_worker, 2, str(tmp_path), TEXTS, timeout=240)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    enc = tiny_encoder()
    enc.eval()
    for i, group in enumerate(TEXTS):
        docs = enc.encode_documents(group, batch_size=2)
        queries = enc.encode_queries(group, batch_size=2)
        for r in ranks:
            assert r[f"docs_{i}"].shape == (len(group), docs.shape[1])
            np.testing.assert_allclose(r[f"docs_{i}"], docs, atol=1e-5, rtol=0)
            np.testing.assert_allclose(r[f"queries_{i}"], queries, atol=1e-5, rtol=0)
    # Each rank embedded its own share, 4 and 4 of 7 (one padded) and 1 and 1 of 1: equal work ...
    assert ranks[0]["seen"].tolist() == ranks[1]["seen"].tolist() == [4, 1]
    # ... and the same number of forward passes on both (documents and queries, batches of 2).
    assert int(ranks[0]["forwards"][0]) == int(ranks[1]["forwards"][0]) > 0
    assert str(ranks[0]["fingerprint"]) == str(ranks[1]["fingerprint"])
