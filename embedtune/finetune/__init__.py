"""``embedtune finetune``: query–document pairs to a better model in one command.

Modules:
    split     ``carve_heldout``: a held-out split with no shared document and no near-identical query.
    settings  ``choose_settings``: recipe settings from the model's size and kind and the data's size,
              each with its reason.
    stages    ``Stage``: a marker file per stage, keyed by a hash of the stage's inputs (done = skipped).
    pipeline  ``run_finetune``: write the recipe, then validate → mine → evaluate before → train →
              evaluate after → export.

Nothing here but ``pipeline`` imports torch.
"""

from embedtune.finetune.settings import Choice, FinetuneSettings, choose_settings
from embedtune.finetune.split import HeldoutSplit, carve_heldout, normalise_query
from embedtune.finetune.stages import Stage, hash_inputs, hash_path

__all__ = [
    "Choice",
    "FinetuneSettings",
    "HeldoutSplit",
    "Stage",
    "carve_heldout",
    "choose_settings",
    "hash_inputs",
    "hash_path",
    "normalise_query",
]
