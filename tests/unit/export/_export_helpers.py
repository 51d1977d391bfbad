"""Texts shared by the export tests."""

from __future__ import annotations

# Mixed lengths on purpose: one word next to a long sentence makes every batch heavily padded.
TEXTS = [
    "Vaccines",
    "how do vaccines train the immune system to recognise a virus it has never seen?",
    "ok",
    "The committee postponed its decision on the new railway line until the spring of 2027.",
    "Mitochondria produce ATP.",
]
