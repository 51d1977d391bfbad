"""Full-corpus retrieval evaluation: trec_eval metrics, blocked exact search, caching, validation.

Modules:
    metrics     NDCG@k, Recall@k, MRR@k, MAP@k, Precision@k with trec_eval semantics.
    search      exact top-k by blocked matrix products (bounded memory), optional FAISS.
    cache       on-disk corpus-embedding cache keyed by model + settings + corpus fingerprints.
    datasets    ``load_eval_set`` for BEIR folders, corpus-ID JSON and inline JSONL.
    retrieval   ``evaluate_retrieval``: encode, search, score.
    config      ``ValidationConfig``, the recipe's ``validation:`` block.
    validator   ``Validator``: what the trainer calls every N steps.
    mteb        ``MTEBEncoder``: the ``encode(sentences, task_name=..., prompt_type=...)`` protocol.
"""
