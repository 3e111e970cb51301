"""The two halves of a sliding-window student (LoLCATs-style): exact softmax attention over the last
``window`` tokens, and the mechanism's linear scan over every token before them.

For query ``t`` the window covers keys ``t-W+1 .. t`` (``|t-s| < W`` for a bidirectional student) and
the scan's state covers keys ``s <= t-W``. The scan half is the mechanism's own operator run
``W`` tokens *late*: query ``t`` reads the state after key ``t-W``, decayed by the gates of the ``W``
tokens since (``lagged_queries``). Decaying a state by ``exp(sum g)`` equals scaling the query by it,
for GLA's per-key-channel decay and Gated DeltaNet's per-head one alike, so any operator runs it as is.

Both halves take a *history*: the ``W`` tokens before this call that the state does not hold yet
(zeros with ``valid = 0`` at the start of a sequence, or the window a decoding cache kept). History and
new tokens together form the "combined" sequence, indexed here with the history first.

Copied next to exported hybrids: imports only torch.
"""

from __future__ import annotations

import math

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama applies it (halves rotated): x [B, T, H, D], cos/sin [B or 1, T, D]."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None, :] + rotated_half * sin[:, :, None, :]


def rotary_tables(inv_freq: torch.Tensor, start: int, length: int, scaling: float, dtype) -> tuple:
    """cos/sin [1, length, D] for positions ``start .. start+length-1``, as the teacher's rotary module
    computes them from the same ``inv_freq`` and attention scaling."""
    positions = torch.arange(start, start + length, device=inv_freq.device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq.float()[None, :]
    angles = torch.cat([angles, angles], dim=-1)[None]
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def history_or_zeros(history: torch.Tensor | None, new: torch.Tensor, window: int) -> torch.Tensor:
    """The W history tokens before ``new`` [B, T, ...]; zeros (no key, no decay) at the start of a sequence."""
    return new.new_zeros(new.shape[0], window, *new.shape[2:]) if history is None else history


def with_history(history: torch.Tensor | None, new: torch.Tensor, window: int) -> torch.Tensor:
    """The combined sequence [B, W + T, ...]: the history (``history_or_zeros``), then the new tokens."""
    return torch.cat([history_or_zeros(history, new, window), new], dim=1)


def lagged_sequence(history: torch.Tensor | None, new: torch.Tensor, window: int) -> torch.Tensor:
    """The combined sequence's first T tokens, a contiguous copy: what a scan running W tokens late reads."""
    length = new.shape[1]
    history = history_or_zeros(history, new, window)
    if length <= window:
        return history[:, :length].clone(memory_format=torch.contiguous_format)
    return torch.cat([history, new[:, :length - window]], dim=1)


def last_window(history: torch.Tensor | None, new: torch.Tensor, window: int) -> torch.Tensor:
    """The combined sequence's last W tokens, a copy: the history a cache keeps for the next call."""
    if new.shape[1] >= window:
        return new[:, -window:].clone()
    return with_history(history, new, window)[:, -window:].clone()


def lagged_queries(q: torch.Tensor, log_decay: torch.Tensor, history_log_decay: torch.Tensor,
                   window: int) -> torch.Tensor:
    """Queries that make a scan read the state ``window`` tokens late.

    Args:
        q: [B, T, H, K] queries of the new tokens.
        log_decay: [B, T, H, K] or [B, T, H], the new tokens' log-decays (<= 0).
        history_log_decay: the same for the ``window`` history tokens before them.

    Returns [B, T, H, K]: new token ``i`` (combined index ``i + W``) scaled by the decay of combined
    tokens ``i+1 .. i+W``; a scan of the combined sequence's first ``T`` tokens pairs it with the state
    after combined token ``i``, i.e. every key at least ``W`` tokens older.
    """
    combined = torch.cat([history_log_decay, log_decay], dim=1).float()
    totals = torch.nn.functional.pad(combined.cumsum(1), (0, 0) * (combined.dim() - 2) + (1, 0))
    decay = (totals[:, window + 1:] - totals[:, 1:-window]).exp()
    if decay.dim() < q.dim():
        decay = decay[..., None]
    return (q.float() * decay).to(q.dtype)


def ring_lagged_queries(q: torch.Tensor, ring_log_decay: torch.Tensor) -> torch.Tensor:
    """``lagged_queries`` for one new token whose W-token window is a ring history already holding it (static
    decoding): q [B, 1, H, K] scaled by the decay of the ring's tokens, ``ring_log_decay`` [B, W, H, K] or
    [B, W, H] (a sum: their order does not matter)."""
    decay = ring_log_decay.sum(1, keepdim=True, dtype=torch.float32).exp()  # no fp32 copy of the ring
    if decay.dim() < q.dim():
        decay = decay[..., None]
    return (q.float() * decay).to(q.dtype)


def ring_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``window_softmax`` for one new token whose window is a ring history already holding it (static
    decoding): q [B, 1, H, D] scaled; k, v [B, W, H, D] the window's keys and values in any order; valid
    [B, W]. Returns the same three parts."""
    scores = torch.einsum("bqhd,bshd->bqhs", q.float(), k.float())
    scores = scores.masked_fill(~valid.bool()[:, None, None, :], -math.inf)
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = (scores - row_max).exp()  # exactly 0 where masked
    return torch.einsum("bqhs,bshd->bqhd", weights, v.float()), weights.sum(-1, keepdim=True), row_max


def window_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                   window: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised softmax attention of the new tokens over their window, in fp32.

    Args:
        q: [B, T, H, D] new tokens' (rotated) queries, already scaled.
        k, v: [B, W + T, H, D] combined keys and values (history first).
        valid: [B, W + T] which combined keys are real tokens.
        window: W. causal: keys ``t-W+1 .. t`` (else ``t-W+1 .. t+W-1``).

    Returns (numerator [B, T, H, D], denominator [B, T, H, 1], row maximum [B, T, H, 1]):
    ``sum_s exp(score - max) v_s``, ``sum_s exp(score - max)`` and the maximum score (0 for a query
    without any key). Queries are split into blocks of W, each block scoring only the 2 (causal) or
    3 key blocks its window can reach: the cost grows as T * W, not T^2.
    """
    batch, length, heads, dim = q.shape
    blocks = -(-length // window)
    span = (2 if causal else 3) * window
    # Combined sequence padded to (blocks + span/W - 1) blocks: block b's keys start at b * W.
    pad = blocks * window + span - window - k.shape[1]
    k, v = (torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad)) for x in (k, v))
    valid = torch.nn.functional.pad(valid, (0, pad))
    q = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, blocks * window - length))
    q_blocks = q.view(batch, blocks, window, heads, dim)
    k_blocks = k.unfold(1, span, window)  # [B, blocks, H, D, span]
    v_blocks = v.unfold(1, span, window)
    valid_blocks = valid.unfold(1, span, window)  # [B, blocks, span]

    # Query a of a block sits at combined offset W + a; key c at offset c: r = c - W - a.
    offset = (torch.arange(span, device=q.device)[None, :] - window
              - torch.arange(window, device=q.device)[:, None])
    allowed = (offset > -window) & ((offset <= 0) if causal else (offset < window))
    allowed = allowed[None, None, None] & valid_blocks[:, :, None, None, :].bool()  # [B, n, 1, W, span]

    scores = torch.einsum("bnahd,bnhdc->bnhac", q_blocks, k_blocks).masked_fill(~allowed, -math.inf)
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = (scores - row_max).exp()  # exactly 0 where masked
    numerator = torch.einsum("bnhac,bnhdc->bnahd", weights, v_blocks)
    denominator = weights.sum(-1, keepdim=True).permute(0, 1, 3, 2, 4)
    row_max = row_max.permute(0, 1, 3, 2, 4)

    def tokens(x):
        return x.reshape(batch, blocks * window, heads, x.shape[-1])[:, :length]

    return tokens(numerator), tokens(denominator), tokens(row_max)


def combine_normalised(window_parts, linear: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """One softmax-like readout over both halves: sum of weights times values over sum of weights.

    A window key weighs ``exp(score - offset_h)``, a key beyond it its feature product (the scan's
    extra all-ones value column carries their sum). Rescaled so that no exponent is positive.

    Args:
        window_parts: ``window_softmax``'s (numerator, denominator, row maximum).
        linear: [B, T, H, D + 1] the lagged scan's output (values, then the weight sum).
        offset: [H] the learned log-scale of window weights against feature products.
    """
    numerator, denominator, row_max = window_parts
    log_ratio = row_max - offset.float()[:, None]  # [B, T, H, 1]: log of window weights' common factor
    window_scale = log_ratio.clamp_max(0).exp()
    linear_scale = (-log_ratio).clamp_max(0).exp()
    linear = linear.float()
    values = window_scale * numerator + linear_scale * linear[..., :-1]
    weights = window_scale * denominator + linear_scale * linear[..., -1:]
    return values / (weights + 1e-6)
