"""Token rows into padded ``input_ids``/``attention_mask`` tensors (shared by capture and the targets)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, *, width: int | None = None,
             left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` padded to ``width`` (default: the longest row) on the right, or on the left: both ``[B, T]``."""
    width = max(len(row) for row in rows) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
