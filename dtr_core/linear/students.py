"""Rebuild a student from its ``config_dict()``: the one place that maps a mechanism's ``kind`` to its class.

Copied next to exported hybrids: imports only its siblings.
"""

from __future__ import annotations

from .base import LinearAttentionStudent
from .gated_deltanet import GatedDeltaNetStudent
from .gla import GLAStudent

STUDENT_CLASSES: dict[str, type[LinearAttentionStudent]] = {
    GLAStudent.kind: GLAStudent,
    GatedDeltaNetStudent.kind: GatedDeltaNetStudent,
}


def build_student(config: dict, backend: str = "auto") -> LinearAttentionStudent:
    """The student ``config`` describes (a ``config_dict()``: ``kind`` and the constructor arguments),
    freshly initialised, running on ``backend`` (see ``gla.gla``)."""
    arguments = dict(config)
    kind = arguments.pop("kind")
    if kind not in STUDENT_CLASSES:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(map(repr, STUDENT_CLASSES))}")
    return STUDENT_CLASSES[kind](**arguments, backend=backend)
