"""The Triton kernels of decoding, with their launchers: GLA's in-place state step and the split-key
attention of one new token over preallocated key/value buffers.

Both read lengths and states on the device and never move memory, so a captured CUDA graph replays them
(see ``decoding.py``). The PyTorch forms they must agree with live beside their callers (``gla.gla_step_``,
``decoding.decode_attention``), which also choose between the two.

Copied next to exported hybrids: imports only torch and (inside try) Triton.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton comes with fla (and with CUDA builds of torch); without it decoding steps use PyTorch ops
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# decode_attention's launch configuration, from a sweep on an H200 at 64K context (Qwen2.5-1.5B shape at
# batch 76 and 147, Llama-3.2-1B shape at 64 and 128; BENCHMARKS.md): 128 keys per block, 8 warps
# and at least 4 splits per sequence read 4.4-4.6 TB/s at every shape, within 1-5% of the best
# configuration of each and at or above cuDNN's SDPA (3.9-4.6 TB/s).
_KEY_BLOCK = 128
_NUM_WARPS = 8
_NUM_STAGES = 3
_MIN_SPLITS = 4
_PROGRAMS_PER_SM = 8
_MAX_SPLITS = 64  # the combining kernel holds every split's partial output of a head at once


def gla_step_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                    state: torch.Tensor) -> torch.Tensor:
    """One GLA step on ``state`` in place, by ``_gla_step_kernel``; checked by ``gla.gla_step_``.

    Args:
        q, k, g: [B, 1, H, K]. v: [B, 1, H, V].
        state: fp32 [B, H, K, V] stored V-first (``state.transpose(-1, -2)`` contiguous).

    Returns:
        o [B, 1, H, V] in q's dtype.
    """
    B, _, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty(B, 1, H, V, dtype=q.dtype, device=q.device)
    block_k = triton.next_power_of_2(K)
    block_v = max(1, min(32, 8192 // block_k))  # a [block_v, block_k] fp32 tile per program
    _gla_step_kernel[(triton.cdiv(V, block_v), B * H)](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), state, o, scale,
        K=K, V=V, BLOCK_K=block_k, BLOCK_V=block_v,
    )
    return o


def decode_attention_triton(query: torch.Tensor, key_buffer: torch.Tensor, value_buffer: torch.Tensor,
                            length: torch.Tensor, scale: float, num_splits: int | None,
                            start: torch.Tensor | None = None) -> torch.Tensor:
    """``decoding.decode_attention`` by ``_split_attention_kernel`` + ``_combine_splits_kernel``; arguments
    as there (already checked: query [B, Hq, 1, D], buffers [B, Hkv, capacity, D], D a power of two,
    ``start`` None or int64 [B]).

    Returns:
        [B, 1, Hq, D] in the query's dtype.
    """
    batch, query_heads, _, dim = query.shape
    kv_heads, capacity = key_buffer.shape[1], key_buffer.shape[2]
    group = query_heads // kv_heads
    if num_splits is None:
        programs = _PROGRAMS_PER_SM * _multiprocessors(query.device)
        # Every split gets at least 4 blocks of keys, which leaves short buffers unsplit.
        num_splits = min(max(_MIN_SPLITS, -(-programs // (batch * kv_heads))), capacity // (4 * _KEY_BLOCK))
    num_splits = max(1, min(num_splits, _MAX_SPLITS, triton.cdiv(capacity, _KEY_BLOCK)))
    split = triton.cdiv(triton.cdiv(capacity, num_splits), _KEY_BLOCK) * _KEY_BLOCK
    parts = torch.empty(batch, query_heads, num_splits, dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(batch, query_heads, num_splits, dtype=torch.float32, device=query.device)
    query = query if query.stride(-1) == 1 else query.contiguous()
    # Without a start the kernel never reads its pointer: ``length`` stands in for it.
    _split_attention_kernel[(batch, kv_heads, num_splits)](
        query, key_buffer, value_buffer, length, length if start is None else start, parts, part_lse, scale,
        query.stride(0), query.stride(1), *key_buffer.stride()[:3], *value_buffer.stride()[:3],
        QUERY_HEADS=query_heads, GROUP=group, BLOCK_GROUP=max(16, triton.next_power_of_2(group)), DIM=dim,
        BLOCK_KEYS=_KEY_BLOCK, SPLIT=split, NUM_SPLITS=num_splits, HAS_START=start is not None,
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    out = torch.empty(batch, 1, query_heads, dim, dtype=query.dtype, device=query.device)
    _combine_splits_kernel[(batch * query_heads,)](
        parts, part_lse, out, QUERY_HEADS=query_heads, DIM=dim, NUM_SPLITS=num_splits,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
    )
    return out


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


if triton is not None:

    @triton.jit
    def _gla_step_kernel(q, k, v, g, state, o, scale, K: tl.constexpr, V: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
        # One (sequence, head) and BLOCK_V value channels: S[v, :] = exp(g) * S[v, :] + v[v] * k,
        # o[v] = scale * q . S[v, :]. q/k/g rows are K long, v/o rows V long, state rows [V, K].
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        keys = tl.arange(0, BLOCK_K)
        channels = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        key_ok, channel_ok = keys < K, channels < V
        b_q = tl.load(q + i_bh * K + keys, mask=key_ok, other=0).to(tl.float32) * scale
        b_k = tl.load(k + i_bh * K + keys, mask=key_ok, other=0).to(tl.float32)
        b_g = tl.load(g + i_bh * K + keys, mask=key_ok, other=0).to(tl.float32)
        b_v = tl.load(v + i_bh * V + channels, mask=channel_ok, other=0).to(tl.float32)
        p_state = state + i_bh * V * K + channels[:, None] * K + keys[None, :]
        tile_ok = channel_ok[:, None] & key_ok[None, :]
        b_s = tl.load(p_state, mask=tile_ok, other=0)
        b_s = b_s * tl.exp(b_g)[None, :] + b_v[:, None] * b_k[None, :]
        tl.store(p_state, b_s, mask=tile_ok)
        tl.store(o + i_bh * V + channels, tl.sum(b_s * b_q[None, :], axis=1).to(o.dtype.element_ty), mask=channel_ok)

    @triton.jit
    def _split_attention_kernel(query, keys, values, length, start, parts, part_lse, scale,
                                query_stride_b, query_stride_h, key_stride_b, key_stride_h, key_stride_n,
                                value_stride_b, value_stride_h, value_stride_n,
                                QUERY_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_GROUP: tl.constexpr,
                                DIM: tl.constexpr, BLOCK_KEYS: tl.constexpr, SPLIT: tl.constexpr,
                                NUM_SPLITS: tl.constexpr, HAS_START: tl.constexpr):
        # One sequence, one key/value head, one split of its keys: the GROUP query heads that share the head
        # attend to keys [first, end) with an online softmax; writes their normalised partial outputs and
        # log-sum-exps (-inf for a split without keys: past the length, or all before the sequence's start,
        # i.e. left padding) for _combine_splits_kernel.
        i_b, i_kv, i_split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        split_start = i_split * SPLIT
        end = tl.minimum(split_start + SPLIT, tl.load(length))
        if HAS_START:
            first = tl.load(start + i_b)
        else:
            first = 0
        rows, dims = tl.arange(0, BLOCK_GROUP), tl.arange(0, DIM)
        row_ok = rows < GROUP
        heads = i_kv * GROUP + rows
        b_q = tl.load(query + i_b * query_stride_b + heads[:, None] * query_stride_h + dims[None, :],
                      mask=row_ok[:, None], other=0)
        key_base = keys + i_b * key_stride_b + i_kv * key_stride_h
        value_base = values + i_b * value_stride_b + i_kv * value_stride_h
        running_max = tl.full([BLOCK_GROUP], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_GROUP], tl.float32)
        acc = tl.zeros([BLOCK_GROUP, DIM], tl.float32)
        # A fixed trip count (blocks past ``end`` are masked: no memory traffic) keeps the loop bounds
        # compile-time constants, which Triton's CPU interpreter needs too.
        for offset in range(0, SPLIT, BLOCK_KEYS):
            positions = split_start + offset + tl.arange(0, BLOCK_KEYS)
            key_ok = (positions < end) & (positions >= first)
            b_k = tl.load(key_base + positions[:, None] * key_stride_n + dims[None, :], mask=key_ok[:, None], other=0)
            scores = tl.dot(b_q, tl.trans(b_k)) * scale
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            # Until a key is seen the maximum is -inf; shifting by 0 then keeps exp() from making NaNs.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(running_max - shift)
            weights = tl.exp(scores - shift[:, None])
            b_v = tl.load(value_base + positions[:, None] * value_stride_n + dims[None, :], mask=key_ok[:, None],
                          other=0)
            acc = acc * rescale[:, None] + tl.dot(weights.to(b_v.dtype), b_v)
            total = total * rescale + tl.sum(weights, 1)
            running_max = new_max
        seen = total > 0
        slot = (i_b * QUERY_HEADS + heads) * NUM_SPLITS + i_split
        tl.store(parts + slot[:, None] * DIM + dims[None, :], acc / tl.where(seen, total, 1.0)[:, None],
                 mask=row_ok[:, None])
        tl.store(part_lse + slot, tl.where(seen, running_max + tl.log(total), float("-inf")), mask=row_ok)

    @triton.jit
    def _combine_splits_kernel(parts, part_lse, out, QUERY_HEADS: tl.constexpr, DIM: tl.constexpr,
                               NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
        # One (sequence, query head): the splits' partial outputs weighted by their share of the softmax.
        i_bh = tl.program_id(0).to(tl.int64)
        splits, dims = tl.arange(0, BLOCK_SPLITS), tl.arange(0, DIM)
        split_ok = splits < NUM_SPLITS
        lse = tl.load(part_lse + i_bh * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
        weights = tl.exp(lse - tl.max(lse, 0))
        b_parts = tl.load(parts + (i_bh * NUM_SPLITS + splits)[:, None] * DIM + dims[None, :],
                          mask=split_ok[:, None], other=0)
        result = tl.sum(b_parts * weights[:, None], 0) / tl.sum(weights, 0)
        # out is [B, 1, Hq, D] contiguous: (sequence, head) rows are consecutive
        tl.store(out + i_bh * DIM + dims, result.to(out.dtype.element_ty))
