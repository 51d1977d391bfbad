"""NeMo AutoModel compatibility: its recipes, checkpoints and data semantics, with no NeMo install.

* :mod:`embedtune.nemo.recipe` converts a NeMo retrieval recipe (``TrainBiEncoderRecipe`` /
  ``TrainCrossEncoderRecipe`` YAML) into an embedtune recipe and lists what still differs;
* :mod:`embedtune.nemo.cross_encoder` loads NeMo's ``LlamaBidirectionalForSequenceClassification``
  checkpoints (pooled hidden states through a ``score`` head, divided by ``temperature``).

Nothing here imports NeMo or anything a YAML file names: ``_target_`` values are matched against an
allowlist of the classes NeMo's shipped recipes use, as strings. See ``docs/nemo.md``.
"""
