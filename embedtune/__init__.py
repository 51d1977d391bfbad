"""embedtune: turn language models into text-embedding models, fine-tune, evaluate and ship them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AutoBiEncoder", "BiEncoder", "__version__"]

if TYPE_CHECKING:
    from embedtune.models import AutoBiEncoder, BiEncoder


def __getattr__(name: str) -> Any:
    # Lazy: `import embedtune` (and the CLI's --help) must not pay for importing torch/transformers.
    if name in ("AutoBiEncoder", "BiEncoder"):
        from embedtune import models

        return getattr(models, name)
    raise AttributeError(f"module 'embedtune' has no attribute {name!r}")
