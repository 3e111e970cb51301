"""The Triton kernels of inference, with their launchers.

Decoding: GLA's and the gated delta rule's in-place state steps and the split-key attention of one new token over
preallocated key/value buffers. They read lengths and states on the device and never move memory, so a captured CUDA
graph replays them (see ``decoding.py``).

A student's prefill (issue 15): its feature map, its log-decays and its readout, each one kernel where
PyTorch ran 3-7 (a GLA student layer at 2K-8K tokens spent more GPU time in ~30 small PyTorch kernels
than in its scan; BENCHMARKS.md). ``base.LinearAttentionStudent`` calls them on inference calls. A sliding
window's own steps (rotary positions, lagged queries, the window's attention joined to the scan's readout,
over a static decoder's ring histories too) and GLA's whole scan, with its normaliser beside its values
(``gla_prefill_triton``), are kernels as well.

The PyTorch forms they must agree with live beside their callers (``gla.gla_step_``,
``gated_deltanet.gated_delta_step_``, ``decoding.decode_attention``, ``feature_maps.hedgehog``,
``base.LinearAttentionStudent``), which also choose between the two.

Copied next to exported hybrids: imports only torch and (inside try) Triton.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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
    return _state_step(_gla_step_kernel, q, k, v, (g,), scale, state)


def gated_delta_step_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            scale: float, state: torch.Tensor) -> torch.Tensor:
    """One gated-delta step on ``state`` in place, by ``_gated_delta_step_kernel``; checked by
    ``gated_deltanet.gated_delta_step_``.

    Args:
        q, k: [B, 1, H, K]. v: [B, 1, H, V]. g (log-decay), beta: [B, 1, H].
        state: fp32 [B, H, K, V] stored V-first (``state.transpose(-1, -2)`` contiguous).

    Returns:
        o [B, 1, H, V] in q's dtype.
    """
    return _state_step(_gated_delta_step_kernel, q, k, v, (g, beta), scale, state)


def _state_step(kernel, q, k, v, gates: tuple, scale: float, state: torch.Tensor) -> torch.Tensor:
    """Launch an in-place step kernel (arguments q, k, v, *gates, state, o, scale) over (value tiles, B*H)."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty(B, 1, H, V, dtype=q.dtype, device=q.device)
    block_k = triton.next_power_of_2(K)
    block_v = max(1, min(32, 8192 // block_k))  # a [block_v, block_k] fp32 tile per program
    kernel[(triton.cdiv(V, block_v), B * H)](
        q.contiguous(), k.contiguous(), v.contiguous(), *(gate.contiguous() for gate in gates), state, o, scale,
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


def _tile_fits(size: int) -> bool:
    """Triton present and ``size`` a power of two >= 16: a tile side the inference kernels (and tl.dot) take."""
    return triton is not None and size >= 16 and size & (size - 1) == 0


def prefill_kernels_fit(head_dim: int) -> bool:
    """Whether the prefill kernels serve heads this wide (their tiles are a head wide)."""
    return _tile_fits(head_dim)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] as rows of one token's H*D values [B*T, H*D] (a view when each row is contiguous)."""
    rows = x.reshape(x.shape[0] * x.shape[1], x.shape[2] * x.shape[3])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


_FEATURE_ROWS = 64  # tokens per program of the feature-map kernel
_READOUT_ROWS = 32  # (token, head) rows per program of the readout kernels
_ELEMENTS = 2048  # elements per program of the log-decay kernel


def hedgehog_triton(x: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None = None,
                    l2_normalise: bool = False) -> torch.Tensor:
    """``feature_maps.hedgehog(x, weight)`` in one kernel, then optionally L2-normalised per head (as
    ``F.normalize``) and zeroed where ``valid`` is False.

    Args:
        x: [B, T, H_x, D], each token's H_x*D values contiguous, H_x dividing H: head h's features are of x's head
            h // (H / H_x) (a GQA teacher's shared key heads, read where they lie instead of repeated).
        weight: [H, D, D]. valid: bool [B, T] or None.

    Returns:
        [B, T, H, 2D] in x's dtype (computed in fp32).
    """
    batch, length, input_heads, dim = x.shape
    heads = weight.shape[0]
    if heads % input_heads:
        raise ValueError(f"x has {input_heads} heads: they must divide the feature map's {heads}")
    rows = _token_rows(x)
    out = torch.empty(batch, length, heads, 2 * dim, dtype=x.dtype, device=x.device)
    keep = rows if valid is None else valid.reshape(-1).to(torch.uint8)  # without a mask the pointer is unread
    _hedgehog_kernel[(triton.cdiv(batch * length, _FEATURE_ROWS), heads)](
        rows, weight.to(x.dtype).contiguous(), keep, out, batch * length, rows.stride(0),
        H=heads, GROUP=heads // input_heads, D=dim, BLOCK_T=_FEATURE_ROWS, HAS_VALID=valid is not None,
        L2=l2_normalise, IEEE=x.dtype == torch.float32,
    )
    return out


def log_decay_triton(logits: torch.Tensor, floor: float) -> torch.Tensor:
    """``F.logsigmoid(logits.float()).clamp_min(floor)`` in one kernel, returned in the logits' dtype."""
    flat = logits.contiguous().view(-1)
    out = torch.empty_like(flat)
    _log_decay_kernel[(triton.cdiv(flat.numel(), _ELEMENTS),)](flat, out, flat.numel(), floor, BLOCK=_ELEMENTS)
    return out.view(logits.shape)


_SCAN_CHUNK = 64  # tokens per chunk of the prefill scan
_SCAN_BLOCK = 16  # rows per decay reference inside a chunk: exponents stay within 8 rows (64 nats at the floor)
_SCAN_CHUNK_KEYS = 32  # key channels per program of the chunk decays' kernel


class ScanTiles(NamedTuple):
    """The launch configuration of ``gla_prefill_triton``'s kernels: the chunk-decay kernel's warps, the state kernel's
    [keys, values] tile per program, its warps and pipeline depths, the output kernel's key channels per step, value
    channels per program and warps, and how far a prompt's chunks split into segments. From ``python -m bench.gla_scan --sweep``
    on an H200 (BENCHMARKS.md, issue 15, tenth to twelfth sessions): at 8K tokens and at batch 8 these are within
    0.3% of the fastest at Llama-3.2-1B's and Qwen2.5-1.5B's shapes. The state kernel's 64 x 128 tile with 4 warps
    took half the time of 64 x 64 with 8 at Qwen's batch 1 x 8K; two warps spill (5-9x slower)."""
    decay_warps: int = 2  # the whole scan 2-3% faster than with 4 at both shapes' 1 and 8 x 8K (twelfth session)
    state_keys: int = 64
    state_values: int = 128
    state_warps: int = 4
    # How deep the state kernel's loop over chunks is pipelined: with segments each program walks few chunks, and a
    # shallower pipeline fills sooner.
    state_stages: int = 3
    segmented_state_stages: int = 2
    output_keys: int = 32
    output_values: int = 128
    output_warps: int = 4
    # A long prompt with few (sequence, head, tile) programs splits its chunks into segments that run in parallel,
    # up to this many state programs per multiprocessor; a third kernel then carries each segment's start in.
    state_programs_per_sm: int = 4


def _tile(size: int, cap: int) -> int:
    """A tile side for ``size`` channels: their next power of two, at least 16 (tl.dot's least), at most ``cap``."""
    return min(cap, max(16, triton.next_power_of_2(size)))


def gla_prefill_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                       initial_state: torch.Tensor | None = None, initial_key_sum: torch.Tensor | None = None,
                       output_final_state: bool = False, key_sums: bool = False,
                       gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                       logits_floor: float | None = None, normalise: bool = False,
                       tiles: ScanTiles = ScanTiles()) -> tuple:
    """GLA's chunkwise scan for inference (``gla.gla``'s contract, no gradient), and with ``key_sums`` the normaliser
    a softmax-like readout needs: what an all-ones value column would accumulate, ``mass_t = q_t . z_t`` with
    ``z_t`` the decayed sum of keys, without widening the values.

    fla's ``chunk_gla`` takes six kernels; with hedgehog features (K = 2 x the head size) its intra-chunk scores,
    built in 16 x 16 tiles by three of them that read q, k and the decays again for every tile, were half its time on
    an H200 (BENCHMARKS.md, issue 15, ninth session). Here one kernel sums each chunk's log-decays, on a student's
    prompt from the gate's low-rank activations (``_chunk_decays_kernel``: summing across a tile's threads inside the
    other two cost more than reading these back), one walks the chunks of a (sequence, head) and stores the state
    (and z) entering each (``_gla_chunk_states_kernel``; a prompt with few such programs in parallel segments, joined
    by ``_gla_segment_starts_kernel``), and one program per (chunk, head) computes the chunk's scores, its output and
    its mass in registers (``_gla_chunk_output_kernel``).

    Args:
        q, k: [B, T, H, K]. v: [B, T, H_v, V], H_v dividing H: query head h reads value head h // (H / H_v) (a GQA
            teacher's shared heads, read where they lie instead of repeated). scale: multiplies q.
        g: [B, T, H, K], a log-decay in [-8, 0] (``base.LOG_DECAY_FLOOR``: the scores' exponents are bounded by 8
            rows of it), or with ``gate_up`` the gate's low-rank activations [B, T, R].
        initial_state: fp32 [B, H, K, V] or None (zeros); initial_key_sum: fp32 [B, H, K] or None (zeros).
        output_final_state: also return the state (and z) after the last token.
        key_sums: also compute the mass and z.
        gate_up, logits_floor: given together, g holds the gate's low-rank activations (a GLA student's
            ``gate_down`` output) and gate_up = (W [H*K, R], bias [H*K] or None) its up-projection: the log-decays
            are max(logsigmoid(g W^T + bias), logits_floor), computed in fp32 as the chunks' sums are (the logits are
            never stored: one GEMM and 50 MB fewer at Qwen2.5-1.5B's shape, 1 x 8K tokens).
        normalise: with ``key_sums``, return the softmax-like readout o / (mass + 1e-6) (``normalised_readout_triton``)
            as o, and no mass.
        tiles: the kernels' launch configuration.

    Returns (o [B, T, H, V] in q's dtype, mass fp32 [B, T, H] or None, final state fp32 [B, H, K, V] or None,
    final z fp32 [B, H, K] or None).
    """
    if normalise and not key_sums:
        raise ValueError("normalise=True reads out by the normaliser: it needs key_sums=True")
    if (gate_up is None) != (logits_floor is None):
        raise ValueError("gate_up and logits_floor come together: the log-decays of low-rank gates need both")
    batch, length, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[-2:]
    if heads % value_heads:
        raise ValueError(f"v has {value_heads} heads: they must divide q's {heads}")
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    chunks = triton.cdiv(length, _SCAN_CHUNK)
    device, ieee = q.device, q.dtype == torch.float32
    states = torch.empty(batch, chunks, heads, key_dim, value_dim, dtype=q.dtype, device=device)
    sums = torch.empty(batch, chunks, heads, key_dim, dtype=torch.float32, device=device) if key_sums else states
    final = torch.empty(batch, heads, key_dim, value_dim, dtype=torch.float32, device=device) \
        if output_final_state else states
    final_sum = torch.empty(batch, heads, key_dim, dtype=torch.float32, device=device) \
        if output_final_state and key_sums else sums
    start = final if initial_state is None else initial_state.float().contiguous()  # unread without one
    start_sum = final_sum if initial_key_sum is None else initial_key_sum.float().contiguous()
    key_block, value_block = _tile(key_dim, tiles.state_keys), _tile(value_dim, tiles.state_values)
    decays = torch.empty(batch, length, heads, key_dim, dtype=torch.float32, device=device)
    up_weight, up_bias = (None, None) if gate_up is None else gate_up
    rank = 1 if gate_up is None else up_weight.shape[1]
    if gate_up is not None and (g.shape != (batch, length, rank) or up_weight.shape != (heads * key_dim, rank)):
        raise ValueError(f"low-rank gates: g {tuple(g.shape)} and W {tuple(up_weight.shape)} must be "
                         f"[B, T, R] = [{batch}, {length}, R] and [H*K, R] = [{heads * key_dim}, R]")
    _chunk_decays_kernel[(chunks, triton.cdiv(key_dim, _SCAN_CHUNK_KEYS), batch * heads)](
        g, decays if gate_up is None else up_weight.to(g.dtype).contiguous(),
        decays if up_bias is None else up_bias.contiguous(), decays, length,
        0.0 if logits_floor is None else logits_floor, H=heads, K=key_dim, R=rank, BT=_SCAN_CHUNK,
        BK=_SCAN_CHUNK_KEYS, BR=max(16, triton.next_power_of_2(rank)), LOW_RANK=gate_up is not None,
        HAS_BIAS=up_bias is not None, IEEE=ieee, num_warps=tiles.decay_warps)
    tile_grid = (triton.cdiv(key_dim, key_block), triton.cdiv(value_dim, value_block))
    programs = tile_grid[0] * tile_grid[1] * batch * heads
    segments = max(1, min(chunks, tiles.state_programs_per_sm * _multiprocessors(device) // programs))
    segment_chunks = triton.cdiv(chunks, segments)
    segments = triton.cdiv(chunks, segment_chunks)  # none left empty
    # Each segment's state after its last chunk from a zero start (segment 0: from the initial state), its key sum,
    # and its chunks' total log-decay per key.
    carries = torch.empty(batch * heads * segments, key_dim, value_dim, dtype=torch.float32, device=device)
    carry_sums = torch.empty(batch * heads * segments, key_dim, dtype=torch.float32, device=device)
    totals = torch.empty_like(carry_sums)
    _gla_chunk_states_kernel[(*tile_grid, batch * heads * segments)](
        k, v, decays, start, start_sum, states, sums, carries, carry_sums, totals, length, segment_chunks, segments,
        H=heads, HV=value_heads, K=key_dim, V=value_dim, BT=_SCAN_CHUNK, BK=key_block, BV=value_block,
        HAS_INITIAL=initial_state is not None, KEY_SUMS=key_sums, IEEE=ieee, num_warps=tiles.state_warps,
        STAGES=tiles.state_stages if segments == 1 else tiles.segmented_state_stages,
    )
    if segments > 1:
        _gla_segment_starts_kernel[(*tile_grid, batch * heads * (segments - 1))](
            states, sums, decays, carries, carry_sums, totals, final, final_sum, length, segment_chunks, segments,
            H=heads, K=key_dim, V=value_dim, BT=_SCAN_CHUNK, BK=key_block, BV=value_block, KEY_SUMS=key_sums,
            STORE_FINAL=output_final_state, num_warps=tiles.state_warps,
        )
    elif output_final_state:  # one segment: its carry is the final state
        final, final_sum = carries.view(final.shape), carry_sums.view(batch, heads, key_dim)
    out = torch.empty(batch, length, heads, value_dim, dtype=q.dtype, device=device)
    mass = torch.empty(batch, length, heads, dtype=torch.float32, device=device) if key_sums and not normalise \
        else out  # unwritten without
    value_block = _tile(value_dim, tiles.output_values)
    _gla_chunk_output_kernel[(chunks, triton.cdiv(value_dim, value_block), batch * heads)](
        q, k, v, decays, states, sums, out, mass, scale, length, H=heads, HV=value_heads, K=key_dim, V=value_dim,
        BT=_SCAN_CHUNK, BC=_SCAN_BLOCK, BK=_tile(key_dim, tiles.output_keys), BV=value_block, KEY_SUMS=key_sums,
        NORMALISE=normalise, IEEE=ieee, num_warps=tiles.output_warps,
    )
    return (out, mass if key_sums and not normalise else None, final if output_final_state else None,
            final_sum if output_final_state and key_sums else None)


def _mass_and_stride(scan: torch.Tensor, mass: torch.Tensor | None, dim: int) -> tuple[torch.Tensor, int]:
    """The normaliser the readout kernels read, and its stride between (token, head) rows: a separate fp32
    [B, T, H] ``mass``, or the scan's last value column (``scan`` [B, T, H, D + 1], contiguous)."""
    return (scan[..., dim], dim + 1) if mass is None else (mass.contiguous(), 1)


def normalised_readout_triton(scan: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
    """A softmax-like readout: ``values / (normaliser + 1e-6)``, from a scan output [B, T, H, D + 1] whose last
    value column accumulated the normaliser, or from values [B, T, H, D] and the normaliser ``mass`` [B, T, H]
    (``gla_prefill_triton``'s); returns [B, T, H * D] in the scan's dtype."""
    batch, length, heads, width = scan.shape
    dim = width - (mass is None)
    scan = scan.contiguous()
    mass, mass_stride = _mass_and_stride(scan, mass, dim)
    out = torch.empty(batch, length, heads * dim, dtype=scan.dtype, device=scan.device)
    rows = batch * length * heads
    _normalised_readout_kernel[(triton.cdiv(rows, _READOUT_ROWS),)](scan, mass, out, rows, D=dim, WIDTH=width,
                                                                    MASS_STRIDE=mass_stride, BLOCK_R=_READOUT_ROWS)
    return out


def rms_readout_triton(scan: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An RMS-normalised readout ``scan * rsqrt(mean(scan^2) + 1e-6) * weight`` per head, for a scan output
    [B, T, H, D] and weight [H, D]; returns [B, T, H * D] in the scan's dtype."""
    batch, length, heads, dim = scan.shape
    scan = scan.contiguous()
    out = torch.empty(batch, length, heads * dim, dtype=scan.dtype, device=scan.device)
    rows = batch * length * heads
    _rms_readout_kernel[(triton.cdiv(rows, _READOUT_ROWS),)](scan, weight.contiguous(), out, rows, H=heads, D=dim,
                                                             BLOCK_R=_READOUT_ROWS)
    return out


def window_kernels_fit(window: int) -> bool:
    """Whether the sliding-window kernels serve this window (their tiles are W tokens)."""
    return _tile_fits(window)


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``window.rotate`` (rotary embedding, halves rotated as Llama does) in one kernel.

    Args:
        x: [B, T, H, D], each token's H*D values contiguous. cos, sin: [B or 1, T, D].

    Returns [B, T, H, D] in x's dtype (computed in fp32).
    """
    batch, length, heads, dim = x.shape
    rows = _token_rows(x)
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(batch, length, heads, dim, dtype=x.dtype, device=x.device)
    _rotary_kernel[(triton.cdiv(batch * length, _FEATURE_ROWS), heads)](
        rows, cos, sin, out, batch * length, rows.stride(0), length, H=heads, D=dim, BLOCK_T=_FEATURE_ROWS,
        PER_SEQUENCE=cos.shape[0] > 1,
    )
    return out


def lagged_queries_triton(q: torch.Tensor, log_decay: torch.Tensor, history_log_decay: torch.Tensor | None,
                          window: int, early: bool = False) -> torch.Tensor:
    """``window.lagged_queries`` in one kernel: new token i's query scaled by the decay of combined tokens
    i+1 .. i+W (the combined sequence is the W history tokens, then the new ones).

    Args:
        q: [B, T, H, K]. log_decay: the new tokens' [B, T, H, K] (GLA) or [B, T, H] (Gated DeltaNet).
        history_log_decay: the W history tokens' (same layout), or None (the start of a sequence: zeros).
        window: W, a power of two >= 16 (``window_kernels_fit``).
        early: write new token t's query at row t - W (rows T - W .. T - 1: zeros), for a scan over the new
            tokens themselves rather than the combined sequence: its output row s then serves token s + W.

    Returns [B, T, H, K] in q's dtype.

    Tokens are taken W at a time: the W gates before new token nW + a end a tokens into combined block
    n + 1, so their sum is (block n's total - its running sum at a) + block n+1's running sum at a, two
    sums of aligned rows of one program's tiles.
    """
    batch, length, heads, key_dim = q.shape
    q, log_decay = q.contiguous(), log_decay.contiguous()
    history = log_decay if history_log_decay is None else history_log_decay.contiguous()  # unread without one
    out = torch.empty_like(q)
    if early:
        out[:, max(length - window, 0):].zero_()  # no token's query lands there
    block_k = min(64, triton.next_power_of_2(key_dim))
    per_channel = log_decay.dim() == 4
    _lagged_queries_kernel[(triton.cdiv(length, window), batch * heads, triton.cdiv(key_dim, block_k))](
        q, log_decay, history, out, length, H=heads, K=key_dim, W=window, BLOCK_K=block_k, PER_CHANNEL=per_channel,
        DECAY_WIDTH=key_dim if per_channel else 1, HAS_HISTORY=history_log_decay is not None, EARLY=early,
    )
    return out


def window_readout_triton(q: torch.Tensor, keys, values, valid, linear: torch.Tensor, window: int, scale: float,
                          offset: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                          early_linear: bool = False, ring: bool = False,
                          mass: torch.Tensor | None = None) -> torch.Tensor:
    """A causal sliding-window student's output in one kernel: softmax attention of each new token over the
    last W combined keys (``window.window_softmax``), joined with the lagged scan's output ``linear`` by the
    softmax-like readout (``window.combine_normalised``, given ``offset``) or added to its RMS-normalised
    readout (given ``norm_weight``).

    Args:
        q: [B, T, H, D] the window's (rotated, unscaled) queries.
        keys, values: (history [B, W, H, D] or None, new [B, T, H, D]); valid: (history [B, W] or None, new
            [B, T]), nonzero for real tokens. A missing history is the start of a sequence: no keys there.
        linear: [B, T, H, D + 1] (normalised: the normaliser in the last column) or [B, T, H, D] (the RMS
            readout, or normalised by ``mass`` [B, T, H], ``gla_prefill_triton``'s).
        window: W (``window_kernels_fit``). scale: multiplies the scores. offset: [H]. norm_weight: [H, D].
        early_linear: new token t's scan output is ``linear``'s row t - W (none before token W: zero), as a
            scan of ``lagged_queries_triton(..., early=True)``'s queries gives it.
        ring: one new token (T = 1) whose window is the histories alone, given as (ring, None) pairs: a static
            decoder's rings, already holding the new token, in any order (``window.ring_softmax``).

    Returns [B, T, H, D] in linear's dtype.
    """
    batch, length, heads, dim = q.shape
    (history_keys, new_keys), (history_values, new_values), (history_valid, new_valid) = keys, values, valid
    if ring:  # no new keys to read: the rings hold them
        new_keys, new_values, new_valid = history_keys, history_values, history_valid
    has_history = history_keys is not None
    q, new_keys, new_values, linear = (x.contiguous() for x in (q, new_keys, new_values, linear))
    new_valid = new_valid.to(torch.float32).contiguous()
    if has_history:
        history_keys, history_values = history_keys.contiguous(), history_values.contiguous()
        history_valid = history_valid.to(torch.float32).contiguous()
    else:  # never read
        history_keys, history_values, history_valid = new_keys, new_values, new_valid
    normalised = offset is not None
    mass, mass_stride = _mass_and_stride(linear, mass, dim) if normalised else (linear, 0)  # unread: RMS readout
    weights = (offset if normalised else norm_weight).float().contiguous()
    out = torch.empty(batch, length, heads, dim, dtype=linear.dtype, device=q.device)
    block = min(window, 64)
    _window_readout_kernel[(triton.cdiv(length, block), batch * heads)](
        q, history_keys, new_keys, history_values, new_values, history_valid, new_valid, linear, mass, weights, out,
        length, scale, H=heads, D=dim, W=window, LINEAR_WIDTH=linear.shape[-1], MASS_STRIDE=mass_stride, BLOCK=block,
        HAS_HISTORY=has_history, NORMALISED=normalised, IEEE=q.dtype == torch.float32,
        LINEAR_LAG=window if early_linear else 0, RING=ring,
    )
    return out


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


if triton is not None:

    @triton.jit
    def _state_step_tile(q, k, v, state, scale, K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_V: tl.constexpr):
        # What an in-place step kernel's program works on: one (sequence, head) and BLOCK_V value channels. Its q
        # (scaled), k and v rows in fp32 (q/k rows K long, v rows V long), and its [BLOCK_V, BLOCK_K] tile of the
        # state, whose rows [V, K] are stored V-first, loaded with the tile's pointers and mask.
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        keys = tl.arange(0, BLOCK_K)
        channels = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        key_ok, channel_ok = keys < K, channels < V
        b_q = tl.load(q + i_bh * K + keys, mask=key_ok, other=0).to(tl.float32) * scale
        b_k = tl.load(k + i_bh * K + keys, mask=key_ok, other=0).to(tl.float32)
        b_v = tl.load(v + i_bh * V + channels, mask=channel_ok, other=0).to(tl.float32)
        p_state = state + i_bh * V * K + channels[:, None] * K + keys[None, :]
        tile_ok = channel_ok[:, None] & key_ok[None, :]
        b_s = tl.load(p_state, mask=tile_ok, other=0)
        return i_bh, keys, key_ok, channels, channel_ok, b_q, b_k, b_v, p_state, tile_ok, b_s

    @triton.jit
    def _gla_step_kernel(q, k, v, g, state, o, scale, K: tl.constexpr, V: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
        # S[v, :] = exp(g) * S[v, :] + v[v] * k, o[v] = scale * q . S[v, :]; g rows are K long.
        i_bh, keys, key_ok, channels, channel_ok, b_q, b_k, b_v, p_state, tile_ok, b_s = _state_step_tile(
            q, k, v, state, scale, K, V, BLOCK_K, BLOCK_V)
        b_g = tl.load(g + i_bh * K + keys, mask=key_ok, other=0).to(tl.float32)
        b_s = b_s * tl.exp(b_g)[None, :] + b_v[:, None] * b_k[None, :]
        tl.store(p_state, b_s, mask=tile_ok)
        tl.store(o + i_bh * V + channels, tl.sum(b_s * b_q[None, :], axis=1).to(o.dtype.element_ty), mask=channel_ok)

    @triton.jit
    def _gated_delta_step_kernel(q, k, v, g, beta, state, o, scale, K: tl.constexpr, V: tl.constexpr,
                                 BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
        # Each value channel's row of the state on its own: S[v, :] *= exp(g); u = beta * (v[v] - k . S[v, :]);
        # S[v, :] += u * k; o[v] = scale * q . S[v, :]. g and beta: one value per (sequence, head).
        i_bh, keys, key_ok, channels, channel_ok, b_q, b_k, b_v, p_state, tile_ok, b_s = _state_step_tile(
            q, k, v, state, scale, K, V, BLOCK_K, BLOCK_V)
        b_s = b_s * tl.exp(tl.load(g + i_bh).to(tl.float32))
        b_u = tl.load(beta + i_bh).to(tl.float32) * (b_v - tl.sum(b_s * b_k[None, :], axis=1))
        b_s = b_s + b_u[:, None] * b_k[None, :]
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

    @triton.jit
    def _hedgehog_kernel(x, w, valid, out, n_rows, x_row_stride, H: tl.constexpr, GROUP: tl.constexpr,
                         D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_VALID: tl.constexpr, L2: tl.constexpr,
                         IEEE: tl.constexpr):
        # BLOCK_T tokens of one head (of x's head i_h // GROUP): p = x W, features [softmax(p), softmax(-p)] (2D
        # wide), all in fp32.
        i_t, i_h = tl.program_id(0), tl.program_id(1)
        rows = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        dims = tl.arange(0, D)
        row_ok = rows < n_rows
        b_x = tl.load(x + rows[:, None].to(tl.int64) * x_row_stride + i_h // GROUP * D + dims[None, :],
                      mask=row_ok[:, None], other=0)
        b_w = tl.load(w + i_h * D * D + dims[:, None] * D + dims[None, :])
        if IEEE:  # fp32 inputs: no TF32 rounding, so the kernel agrees with PyTorch's fp32 einsum
            p = tl.dot(b_x, b_w, input_precision="ieee")
        else:
            p = tl.dot(b_x, b_w)
        positive = tl.exp(p - tl.max(p, axis=1)[:, None])
        positive = positive / tl.sum(positive, axis=1)[:, None]
        negative = tl.exp(tl.min(p, axis=1)[:, None] - p)
        negative = negative / tl.sum(negative, axis=1)[:, None]
        if L2:
            norm = tl.sqrt(tl.sum(positive * positive, axis=1) + tl.sum(negative * negative, axis=1))
            inverse = 1.0 / tl.maximum(norm, 1e-12)
            positive, negative = positive * inverse[:, None], negative * inverse[:, None]
        if HAS_VALID:
            keep = tl.load(valid + rows, mask=row_ok, other=0).to(tl.float32)
            positive, negative = positive * keep[:, None], negative * keep[:, None]
        p_out = out + rows[:, None].to(tl.int64) * (H * 2 * D) + i_h * 2 * D + dims[None, :]
        tl.store(p_out, positive.to(out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(p_out + D, negative.to(out.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _log_decay_kernel(logits, out, n, floor, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offsets < n
        x = tl.load(logits + offsets, mask=ok, other=0).to(tl.float32)
        tl.store(out + offsets, _floored_log_sigmoid(x, floor).to(out.dtype.element_ty), mask=ok)

    @triton.jit
    def _floored_log_sigmoid(x, floor):
        # log(sigmoid(x)) >= floor, in fp32 without overflow for either sign of x.
        return tl.maximum(tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x))), floor)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # IEEE: fp32 tiles multiplied exactly (the tests' fp32). Otherwise a takes b's dtype: bf16 products with
        # values and states, as fla's kernels take them; TF32 for the scores, whose operands are fp32.
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a.to(b.dtype), b)

    @triton.jit
    def _chunk_decays_kernel(g, up_weight, up_bias, decays, T, floor, H: tl.constexpr, K: tl.constexpr,
                             R: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                             LOW_RANK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
        # One chunk of one (sequence, head), BK key channels: the log-decays summed from the chunk's start, fp32
        # (LOW_RANK: g holds the gate's R activations per token; the logits g W^T + bias, from the [BK, R] rows of
        # W for these channels, give the log-decays max(logsigmoid(logits), floor)).
        i_t, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        i_b, i_h = i_bh // H, i_bh % H
        tokens, keys = i_t * BT + tl.arange(0, BT), i_k * BK + tl.arange(0, BK)
        token_ok, key_ok = tokens < T, keys < K
        p = ((i_b * T + tokens[:, None]) * H + i_h) * K + keys[None, :]
        if LOW_RANK:  # rows past T come after every real row: what they add is never stored
            ranks = tl.arange(0, BR)
            b_g = tl.load(g + (i_b * T + tokens[:, None]) * R + ranks[None, :],
                          mask=token_ok[:, None] & (ranks < R)[None, :], other=0)
            b_w = tl.load(up_weight + (i_h * K + keys[None, :]) * R + ranks[:, None],
                          mask=(ranks < R)[:, None] & key_ok[None, :], other=0)
            x = _dot(b_g, b_w, IEEE)
            if HAS_BIAS:
                x += tl.load(up_bias + i_h * K + keys, mask=key_ok, other=0).to(tl.float32)[None, :]
            x = _floored_log_sigmoid(x, floor)
        else:
            x = tl.load(g + p, mask=token_ok[:, None] & key_ok[None, :], other=0).to(tl.float32)
        tl.store(decays + p, tl.cumsum(x, axis=0), mask=token_ok[:, None] & key_ok[None, :])

    @triton.jit
    def _gla_chunk_states_kernel(k, v, decays, initial, initial_sum, states, sums, carries, carry_sums, totals, T,
                                 SEGMENT_CHUNKS, SEGMENTS, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                                 V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                 HAS_INITIAL: tl.constexpr, KEY_SUMS: tl.constexpr, IEEE: tl.constexpr,
                                 STAGES: tl.constexpr):
        # One (sequence, head), a [BK, BV] tile of the state, through one segment's chunks from a zero state
        # (segment 0: from the initial state): stores the state entering each chunk (and, in the first value
        # tile's programs, the key sum z entering it), then writes the chunk: S = exp(b_last) S +
        # (k exp(b_last - b))^T v, with b the chunk's decays (_chunk_decays_kernel), read as [BK, BT] tiles (keys
        # by rows, the product's natural operand). Rows past T write 0. At the segment's end: its state, z and
        # total log-decay (_gla_segment_starts_kernel carries them into the next segments). The loop over chunks is
        # software-pipelined STAGES deep: the next chunks' loads are in flight while this one is written.
        i_k, i_v, i_bhs = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        i_bh, i_s = i_bhs // SEGMENTS, i_bhs % SEGMENTS
        i_b, i_h = i_bh // H, i_bh % H
        keys, channels, rows = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
        key_ok, channel_ok = keys < K, channels < V
        tile, tile_ok = keys[:, None] * V + channels[None, :], key_ok[:, None] & channel_ok[None, :]
        z = tl.zeros([BK], tl.float32)
        total = tl.zeros([BK], tl.float32)
        state = tl.zeros([BK, BV], tl.float32)
        if HAS_INITIAL:
            first = (i_s == 0).to(tl.float32)  # only segment 0 starts from the initial state
            state = tl.load(initial + i_bh * K * V + tile, mask=tile_ok, other=0) * first
            if KEY_SUMS:
                z = tl.load(initial_sum + i_bh * K + keys, mask=key_ok, other=0) * first
        n_chunks = tl.cdiv(T, BT)
        start = i_s * SEGMENT_CHUNKS
        for chunk in tl.range(start, tl.minimum(start + SEGMENT_CHUNKS, n_chunks), num_stages=STAGES):
            token_ok = chunk * BT + rows < T
            p_k = ((i_b * T + chunk * BT + rows[None, :]) * H + i_h) * K + keys[:, None]
            p_v = ((i_b * T + chunk * BT + rows[:, None]) * HV + i_h // (H // HV)) * V + channels[None, :]
            p_last = ((i_b * T + tl.minimum((chunk + 1) * BT, T) - 1) * H + i_h) * K + keys
            b_k = tl.load(k + p_k, mask=key_ok[:, None] & token_ok[None, :], other=0)
            b_b = tl.load(decays + p_k, mask=key_ok[:, None] & token_ok[None, :], other=0)
            b_last = tl.load(decays + p_last, mask=key_ok, other=0)
            b_v = tl.load(v + p_v, mask=token_ok[:, None] & channel_ok[None, :], other=0)
            here = (i_b * n_chunks + chunk) * H + i_h
            tl.store(states + here * K * V + tile, state.to(states.dtype.element_ty), mask=tile_ok)
            if KEY_SUMS:
                tl.store(sums + here * K + keys, z, mask=key_ok & (i_v == 0))
            written = b_k.to(tl.float32) * tl.exp(b_last[:, None] - b_b)
            state = state * tl.exp(b_last)[:, None] + _dot(written, b_v, IEEE)
            if KEY_SUMS:
                z = z * tl.exp(b_last) + tl.sum(written, axis=1)
            total += b_last
        tl.store(carries + i_bhs * K * V + tile, state, mask=tile_ok)
        tl.store(totals + i_bhs * K + keys, total, mask=key_ok & (i_v == 0))
        if KEY_SUMS:
            tl.store(carry_sums + i_bhs * K + keys, z, mask=key_ok & (i_v == 0))

    @triton.jit
    def _gla_segment_starts_kernel(states, sums, decays, carries, carry_sums, totals, final, final_sum, T,
                                   SEGMENT_CHUNKS, SEGMENTS, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KEY_SUMS: tl.constexpr,
                                   STORE_FINAL: tl.constexpr):
        # One (sequence, head), a [BK, BV] tile, one segment after the first: the state C entering the segment,
        # folded from the earlier segments' carries (C = exp(total) C + carry), added to the state (and z) stored
        # for each of its chunks, decayed from the segment's start to the chunk's; the last segment also writes the
        # final state, its carry plus C decayed through it.
        i_k, i_v, i_bhs = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        i_bh, i_s = i_bhs // (SEGMENTS - 1), i_bhs % (SEGMENTS - 1) + 1
        i_b, i_h = i_bh // H, i_bh % H
        keys, channels = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
        key_ok, channel_ok = keys < K, channels < V
        tile, tile_ok = keys[:, None] * V + channels[None, :], key_ok[:, None] & channel_ok[None, :]
        sums_ok = key_ok & (i_v == 0)
        carry = tl.zeros([BK, BV], tl.float32)
        carry_z = tl.zeros([BK], tl.float32)
        earlier = 0
        while earlier < i_s:
            decay = tl.exp(tl.load(totals + (i_bh * SEGMENTS + earlier) * K + keys, mask=key_ok, other=0))
            carry = carry * decay[:, None] + tl.load(carries + (i_bh * SEGMENTS + earlier) * K * V + tile,
                                                     mask=tile_ok, other=0)
            if KEY_SUMS:
                carry_z = carry_z * decay + tl.load(carry_sums + (i_bh * SEGMENTS + earlier) * K + keys,
                                                    mask=key_ok, other=0)
            earlier += 1
        n_chunks = tl.cdiv(T, BT)
        chunk = i_s * SEGMENT_CHUNKS
        end = tl.minimum(chunk + SEGMENT_CHUNKS, n_chunks)
        decayed = tl.zeros([BK], tl.float32)  # log-decay from the segment's start to the chunk's
        while chunk < end:
            here = (i_b * n_chunks + chunk) * H + i_h
            scale = tl.exp(decayed)
            p_state = states + here * K * V + tile
            tl.store(p_state, (tl.load(p_state, mask=tile_ok, other=0).to(tl.float32) + scale[:, None] * carry)
                     .to(states.dtype.element_ty), mask=tile_ok)
            if KEY_SUMS:
                tl.store(sums + here * K + keys, tl.load(sums + here * K + keys, mask=sums_ok, other=0)
                         + scale * carry_z, mask=sums_ok)
            last = tl.minimum((chunk + 1) * BT, T) - 1
            decayed += tl.load(decays + ((i_b * T + last) * H + i_h) * K + keys, mask=key_ok, other=0)
            chunk += 1
        if STORE_FINAL:
            if i_s == SEGMENTS - 1:  # decayed: now the segment's total
                own = i_bh * SEGMENTS + i_s
                tl.store(final + i_bh * K * V + tile, tl.load(carries + own * K * V + tile, mask=tile_ok, other=0)
                         + tl.exp(decayed)[:, None] * carry, mask=tile_ok)
                if KEY_SUMS:
                    tl.store(final_sum + i_bh * K + keys, tl.load(carry_sums + own * K + keys, mask=sums_ok, other=0)
                             + tl.exp(decayed) * carry_z, mask=sums_ok)

    @triton.jit
    def _gla_chunk_output_kernel(q, k, v, decays, states, sums, out, mass, scale, T, H: tl.constexpr,
                                 HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                                 BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KEY_SUMS: tl.constexpr,
                                 NORMALISE: tl.constexpr, IEEE: tl.constexpr):
        # One chunk of one (sequence, head), BV value channels: o = (q exp(b)) S + A v and mass = (q exp(b)) . z +
        # rowsum(A) (NORMALISE: o / (mass + 1e-6) stored as o, every value tile computing the mass), with b the
        # chunk's decays (_chunk_decays_kernel), S and z entering it and the causal scores
        # A[i, j] = sum_c q[i,c] k[j,c] exp(b[i,c] - b[j,c]). A is built one block of BC keys at a time as one
        # [BT, BT] product masked to the block (scoring each block as a [BT, BC] product was no faster on an H200,
        # BENCHMARKS.md issue 15, twelfth session), its decays split at a reference row m in the middle of the
        # block: exp(b_i - m) exp(m - b_j).
        # For a key in the block each factor spans at most BC/2 rows (<= 64 nats at the -8 floor: no overflow);
        # a query after the block has b_i <= m (its factor <= 1, at worst underflowing where the true weight is
        # below e^-40 anyway). Queries before the block, and keys after the query inside it, are masked.
        i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        i_b, i_h = i_bh // H, i_bh % H
        n_chunks = tl.cdiv(T, BT)
        rows, channels = tl.arange(0, BT), i_v * BV + tl.arange(0, BV)
        tokens, channel_ok = i_t * BT + rows, channels < V
        token_ok = tokens < T
        block = rows // BC
        here = (i_b * n_chunks + i_t) * H + i_h
        inter = tl.zeros([BT, BV], tl.float32)
        scores = tl.zeros([BT, BT], tl.float32)
        inter_mass = tl.zeros([BT], tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            keys = i_k * BK + tl.arange(0, BK)
            key_ok = keys < K
            ok = token_ok[:, None] & key_ok[None, :]
            p = ((i_b * T + tokens[:, None]) * H + i_h) * K + keys[None, :]
            b_q = tl.load(q + p, mask=ok, other=0).to(tl.float32) * scale
            # Rows past T take the last token's decays (as if decayed by 1): the reference rows stay bounded.
            decay = tl.load(decays + p + (tl.minimum(tokens, T - 1) - tokens)[:, None] * H * K, mask=key_ok[None, :],
                            other=0)
            b_s = tl.load(states + here * K * V + keys[:, None] * V + channels[None, :],
                          mask=key_ok[:, None] & channel_ok[None, :], other=0)
            b_k = tl.load(k + p, mask=ok, other=0).to(tl.float32)
            # Each key decayed to its block's middle row (read back, as the rows past T are): one exponential per
            # key, where one per key and block computed the same values and masked three quarters of them.
            row_middles = tl.load(decays + p + (tl.minimum(i_t * BT + block * BC + BC // 2, T - 1) - tokens)[:, None]
                                  * H * K, mask=key_ok[None, :], other=0)
            k_middle = b_k * tl.exp(row_middles - decay)
            for c in tl.static_range(BT // BC):
                middle = tl.load(decays + ((i_b * T + tl.minimum(i_t * BT + c * BC + BC // 2, T - 1)) * H + i_h) * K
                                 + keys, mask=key_ok, other=0)
                # Queries from the block's first row on score its keys.
                q_c = b_q * tl.exp(tl.where(block[:, None] >= c, decay - middle[None, :], float("-inf")))
                scores += _dot(q_c, tl.trans(tl.where(block[:, None] == c, k_middle, 0.0)), IEEE)
                if c == 0:  # q exp(b) from block 0's queries: exp(b - m) <= e^64 (rows before m), exp(m) >= e^-72
                    reading = q_c * tl.exp(middle)[None, :]
                    inter += _dot(reading, b_s, IEEE)
                    if KEY_SUMS:
                        inter_mass += tl.sum(reading * tl.load(sums + here * K + keys, mask=key_ok, other=0)[None, :],
                                             axis=1)
        p_out = ((i_b * T + tokens[:, None]) * H + i_h) * V + channels[None, :]
        scores = tl.where(rows[:, None] >= rows[None, :], scores, 0.0)
        p_v = ((i_b * T + tokens[:, None]) * HV + i_h // (H // HV)) * V + channels[None, :]
        b_v = tl.load(v + p_v, mask=token_ok[:, None] & channel_ok[None, :], other=0)
        o = inter + _dot(scores, b_v, IEEE)
        score_mass = tl.sum(scores, axis=1)
        if KEY_SUMS:
            row_mass = inter_mass + score_mass
            if NORMALISE:
                o = o / (row_mass[:, None] + 1e-6)
            elif i_v == 0:
                tl.store(mass + (i_b * T + tokens) * H + i_h, row_mass, mask=token_ok)
        tl.store(out + p_out, o.to(out.dtype.element_ty), mask=token_ok[:, None] & channel_ok[None, :])

    @triton.jit
    def _normalised_readout_kernel(scan, mass, out, n_rows, D: tl.constexpr, WIDTH: tl.constexpr,
                                   MASS_STRIDE: tl.constexpr, BLOCK_R: tl.constexpr):
        # Rows are (token, head) pairs: D numerator columns (of WIDTH) and their normaliser.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        dims = tl.arange(0, D)
        ok = rows < n_rows
        numerator = tl.load(scan + rows[:, None] * WIDTH + dims[None, :], mask=ok[:, None], other=0).to(tl.float32)
        normaliser = tl.load(mass + rows * MASS_STRIDE, mask=ok, other=1).to(tl.float32)
        tl.store(out + rows[:, None] * D + dims[None, :],
                 (numerator / (normaliser[:, None] + 1e-6)).to(out.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _rms_readout_kernel(scan, weight, out, n_rows, H: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        dims = tl.arange(0, D)
        ok = rows < n_rows
        x = tl.load(scan + rows[:, None] * D + dims[None, :], mask=ok[:, None], other=0).to(tl.float32)
        scale = tl.rsqrt(tl.sum(x * x, axis=1) / D + 1e-6)
        w = tl.load(weight + (rows % H)[:, None] * D + dims[None, :], mask=ok[:, None], other=0).to(tl.float32)
        tl.store(out + rows[:, None] * D + dims[None, :], (x * scale[:, None] * w).to(out.dtype.element_ty),
                 mask=ok[:, None])

    @triton.jit
    def _rotary_kernel(x, cos, sin, out, n_rows, x_row_stride, T, H: tl.constexpr, D: tl.constexpr,
                       BLOCK_T: tl.constexpr, PER_SEQUENCE: tl.constexpr):
        # BLOCK_T tokens of one head: out = x * cos + [-x_hi, x_lo] * sin, the halves loaded apart.
        i_t, i_h = tl.program_id(0), tl.program_id(1)
        rows = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        half = tl.arange(0, D // 2)
        row_ok = (rows < n_rows)[:, None]
        table_rows = rows if PER_SEQUENCE else rows % T  # cos/sin of one sequence serve the whole batch
        p_x = x + rows[:, None] * x_row_stride + i_h * D + half[None, :]
        x_lo = tl.load(p_x, mask=row_ok, other=0).to(tl.float32)
        x_hi = tl.load(p_x + D // 2, mask=row_ok, other=0).to(tl.float32)
        p_table = table_rows[:, None] * D + half[None, :]
        cos_lo = tl.load(cos + p_table, mask=row_ok, other=0).to(tl.float32)
        cos_hi = tl.load(cos + p_table + D // 2, mask=row_ok, other=0).to(tl.float32)
        sin_lo = tl.load(sin + p_table, mask=row_ok, other=0).to(tl.float32)
        sin_hi = tl.load(sin + p_table + D // 2, mask=row_ok, other=0).to(tl.float32)
        p_out = out + rows[:, None] * (H * D) + i_h * D + half[None, :]
        tl.store(p_out, (x_lo * cos_lo - x_hi * sin_lo).to(out.dtype.element_ty), mask=row_ok)
        tl.store(p_out + D // 2, (x_hi * cos_hi + x_lo * sin_hi).to(out.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _lagged_queries_kernel(q, decay, history, out, T, H: tl.constexpr, K: tl.constexpr, W: tl.constexpr,
                               BLOCK_K: tl.constexpr, PER_CHANNEL: tl.constexpr, DECAY_WIDTH: tl.constexpr,
                               HAS_HISTORY: tl.constexpr, EARLY: tl.constexpr):
        # New tokens nW .. nW+W-1 of one (sequence, head), BLOCK_K key channels. Combined block 0 is the
        # history, block m >= 1 the new tokens (m-1)W .. mW-1. A decay row is DECAY_WIDTH wide: K (one per
        # channel, [W, BLOCK_K] tiles) or 1 (one per head, [W] tiles: a scan over a [W, 1] tile of aligned
        # pointers fails Triton 3.6's lowering to LLVM for the GPU).
        i_n, i_bh, i_k = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        i_b, i_h = i_bh // H, i_bh % H
        rows = tl.arange(0, W)
        channels = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
        channel_ok = channels < K
        previous = (i_n - 1) * W + rows  # block n as new tokens (when n >= 1)
        tokens = i_n * W + rows  # block n + 1: this program's own new tokens
        if PER_CHANNEL:
            previous_rows, token_rows, history_rows = previous[:, None], tokens[:, None], rows[:, None]
            columns, column_ok = channels[None, :], channel_ok[None, :]
        else:
            previous_rows, token_rows, history_rows = previous, tokens, rows
            columns, column_ok = 0, rows >= 0
        this_block = tl.load(decay + ((i_b * T + previous_rows) * H + i_h) * DECAY_WIDTH + columns,
                             mask=column_ok & (previous_rows >= 0) & (previous_rows < T), other=0)
        if HAS_HISTORY:
            from_history = tl.load(history + ((i_b * W + history_rows) * H + i_h) * DECAY_WIDTH + columns,
                                   mask=column_ok & (i_n == 0), other=0)
            this_block = tl.where(i_n == 0, from_history, this_block)
        this_block = this_block.to(tl.float32)
        next_block = tl.load(decay + ((i_b * T + token_rows) * H + i_h) * DECAY_WIDTH + columns,
                             mask=column_ok & (token_rows < T), other=0).to(tl.float32)
        lag = tl.sum(this_block, axis=0, keep_dims=True) - tl.cumsum(this_block, axis=0) + tl.cumsum(next_block, axis=0)
        if not PER_CHANNEL:
            lag = lag[:, None]
        token_ok = (tokens < T)[:, None] & channel_ok[None, :]
        p_q = ((i_b * T + tokens[:, None]) * H + i_h) * K + channels[None, :]
        b_q = tl.load(q + p_q, mask=token_ok, other=0).to(tl.float32)
        if EARLY:  # W rows up, the first W tokens' queries dropped
            p_q = p_q - W * H * K
            token_ok = token_ok & (tokens >= W)[:, None]
        tl.store(out + p_q, (b_q * tl.exp(lag)).to(out.dtype.element_ty), mask=token_ok)

    @triton.jit
    def _window_readout_kernel(q, history_keys, keys, history_values, values, history_valid, valid, linear, mass,
                               weights, out, T, scale, H: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                               LINEAR_WIDTH: tl.constexpr, MASS_STRIDE: tl.constexpr, BLOCK: tl.constexpr,
                               HAS_HISTORY: tl.constexpr,
                               NORMALISED: tl.constexpr, IEEE: tl.constexpr, LINEAR_LAG: tl.constexpr,
                               RING: tl.constexpr):
        # BLOCK new tokens of one (sequence, head). New token t sits at combined index t + W (the history's W
        # tokens come first) and sees combined keys t+1 .. t+W; an online softmax runs over the key blocks
        # the BLOCK queries reach. RING: one token, which sees the W history keys (a ring holding it) alone.
        i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        i_b, i_h = i_bh // H, i_bh % H
        tokens = i_t * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, D)
        token_ok = tokens < T
        b_q = tl.load(q + ((i_b * T + tokens[:, None]) * H + i_h) * D + dims[None, :], mask=token_ok[:, None], other=0)
        row_max = tl.full([BLOCK], float("-inf"), tl.float32)
        denominator = tl.zeros([BLOCK], tl.float32)
        numerator = tl.zeros([BLOCK, D], tl.float32)
        if RING:
            first, span = 0, W
        else:
            first, span = i_t * BLOCK + 1, BLOCK + W - 1
        for start in range(0, span, BLOCK):
            combined = first + start + tl.arange(0, BLOCK)
            new = combined - W
            is_new = (new >= 0) & (new < T)
            p_new = ((i_b * T + new[:, None]) * H + i_h) * D + dims[None, :]
            b_k = tl.load(keys + p_new, mask=is_new[:, None], other=0)
            b_v = tl.load(values + p_new, mask=is_new[:, None], other=0)
            real = tl.load(valid + i_b * T + new, mask=is_new, other=0) != 0
            if HAS_HISTORY:
                is_old = combined < W
                p_old = ((i_b * W + combined[:, None]) * H + i_h) * D + dims[None, :]
                # Selected, not added: a sum could come out in another dtype than the dot product takes.
                b_k = tl.where(is_old[:, None], tl.load(history_keys + p_old, mask=is_old[:, None], other=0), b_k)
                b_v = tl.where(is_old[:, None], tl.load(history_values + p_old, mask=is_old[:, None], other=0), b_v)
                real = real | (tl.load(history_valid + i_b * W + combined, mask=is_old, other=0) != 0)
            if IEEE:
                scores = tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * scale
            else:
                scores = tl.dot(b_q, tl.trans(b_k)) * scale
            if RING:
                allowed = token_ok[:, None] & real[None, :]
            else:
                reach = combined[None, :] - tokens[:, None]  # 1 .. W inside the window
                allowed = (reach >= 1) & (reach <= W) & real[None, :]
            scores = tl.where(allowed, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(tl.where(row_max == float("-inf"), float("-inf"), row_max - safe_max))
            probabilities = tl.exp(scores - safe_max[:, None])  # 0 where not allowed
            denominator = denominator * rescale + tl.sum(probabilities, axis=1)
            if IEEE:
                update = tl.dot(probabilities, b_v.to(tl.float32), input_precision="ieee")
            else:
                update = tl.dot(probabilities.to(b_v.dtype), b_v)
            numerator = numerator * rescale[:, None] + update
            row_max = new_max
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # a query without keys: as window_softmax
        linear_rows = tokens - LINEAR_LAG
        linear_ok = token_ok & (linear_rows >= 0)
        p_linear = linear + ((i_b * T + linear_rows[:, None]) * H + i_h) * LINEAR_WIDTH + dims[None, :]
        b_linear = tl.load(p_linear, mask=linear_ok[:, None], other=0).to(tl.float32)
        if NORMALISED:
            linear_mass = tl.load(mass + ((i_b * T + linear_rows) * H + i_h) * MASS_STRIDE, mask=linear_ok,
                                  other=0).to(tl.float32)
            log_ratio = row_max - tl.load(weights + i_h)
            window_scale = tl.exp(tl.minimum(log_ratio, 0.0))
            linear_scale = tl.exp(tl.minimum(-log_ratio, 0.0))
            result = (window_scale[:, None] * numerator + linear_scale[:, None] * b_linear) / (
                window_scale * denominator + linear_scale * linear_mass + 1e-6)[:, None]
        else:
            norm = tl.rsqrt(tl.sum(b_linear * b_linear, axis=1) / D + 1e-6)
            b_weight = tl.load(weights + i_h * D + dims).to(tl.float32)
            result = numerator / (denominator + 1e-6)[:, None] + b_linear * norm[:, None] * b_weight[None, :]
        tl.store(out + ((i_b * T + tokens[:, None]) * H + i_h) * D + dims[None, :], result.to(out.dtype.element_ty),
                 mask=token_ok[:, None])
