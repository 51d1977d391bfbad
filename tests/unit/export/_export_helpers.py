"""Texts shared by the export tests."""

from __future__ import annotations

import pytest

from embedtune.export.errors import int8_unsupported_reason

# int8 export needs onnxruntime >= 1.24; below that (make test-min's floor is 1.20) these tests skip.
needs_int8 = pytest.mark.skipif(int8_unsupported_reason() is not None, reason=str(int8_unsupported_reason()))

# Mixed lengths on purpose: one word next to a long sentence makes every batch heavily padded.
TEXTS = [
    "Vaccines",
    "how do vaccines train the immune system to recognise a virus it has never seen?",
    "ok",
    "The committee postponed its decision on the new railway line until the spring of 2027.",
    "Mitochondria produce ATP.",
]
