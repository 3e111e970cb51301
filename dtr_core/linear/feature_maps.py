"""Feature maps applied to a student's queries and keys per head, before the linear-attention scan.

Kept functional: a map's weight is a parameter of the student (``feature_weight``), so that student
state dicts keep one flat set of keys whatever the map.

Copied next to exported hybrids: imports only torch.
"""

from __future__ import annotations

import torch

FEATURE_MAPS = ("hedgehog", "identity")


def feature_dim(feature_map: str, head_dim: int) -> int:
    """Width of the features of a ``head_dim``-wide head: the scan's key dimension K."""
    return 2 * head_dim if feature_map == "hedgehog" else head_dim


def initial_hedgehog_weight(num_heads: int, head_dim: int) -> torch.Tensor:
    """Hedgehog's starting projection W [H, D, D]: the identity per head, so features start as the
    softmax of the raw projections."""
    return torch.eye(head_dim).repeat(num_heads, 1, 1)


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog features (Zhang et al., 2024): per head ``[softmax(xW), softmax(-xW)]``, positive and
    spiky like exp(q·k), so a linear scan can mimic softmax attention.

    Args:
        x: [B, T, H, D]. weight: [H, D, D].

    Returns:
        [B, T, H, 2D].
    """
    projected = torch.einsum("bthd,hde->bthe", x, weight)
    return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], dim=-1)
