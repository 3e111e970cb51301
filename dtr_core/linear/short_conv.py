"""Short causal convolutions on a student's q/k/v projections (as in Gated DeltaNet and Mamba): each
channel mixes the last few tokens before the feature map, which helps a recurrent state recall
neighbouring tokens. Initialised to the identity, so a student with convolutions starts as one without.

Copied next to exported hybrids: imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_kernel(channels: int, size: int) -> torch.Tensor:
    """A depthwise kernel [channels, size] that passes every channel's current token through unchanged."""
    kernel = torch.zeros(channels, size)
    kernel[:, -1] = 1.0
    return kernel


def causal_conv(x: torch.Tensor, kernel: torch.Tensor, history: torch.Tensor | None) -> tuple:
    """Depthwise causal convolution along time.

    Args:
        x: [B, T, C] this call's inputs. kernel: [C, size], its last column weighing the current token.
        history: [B, size - 1, C], the inputs of the tokens just before (a decoding cache's), or None
            (the sequence starts here: zeros).

    Returns the outputs [B, T, C] in x's dtype and the new history (the last ``size - 1`` inputs).
    """
    size = kernel.shape[1]
    if history is None:
        history = x.new_zeros(x.shape[0], size - 1, x.shape[2])
    combined = torch.cat([history.to(x.dtype), x], dim=1)
    out = F.conv1d(combined.transpose(1, 2), kernel.to(x.dtype)[:, None, :], groups=kernel.shape[0])
    return out.transpose(1, 2), combined[:, combined.shape[1] - (size - 1):]
