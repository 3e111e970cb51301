"""Decoding steps that depend on no host-side length, so that one CUDA graph replays every step.

Why: at long context a decode step of a 1-2B-parameter model is several hundred kernels issued one by
one from Python, and once half the layers are linear the GPU finishes a step before the host has issued
the next. Measured on an H200 (Qwen2.5-1.5B shape, random weights, 64K context, batch 76, eager): the
hybrid with 14 of 28 layers linear kept the GPU busy 22 ms of a 32 ms step, the full model 36 of 37 ms,
so half the layers linear bought 1.16x instead of the 1.6x the GPU work allows. A captured step costs the
host one launch.

What makes a step capturable (``StaticDecoder`` sets it up on a prefilled ``students.preallocated_cache``):

* full-attention layers (``students.PreallocatedLayer``) write the new key and value at a position held
  in a device tensor, and attention reads the first ``length`` positions of the buffers, ``length`` also
  a device tensor: ``decode_attention`` (Triton on CUDA: the keys split across programs, each key/value
  head read once for all the query heads that share it);
* students advance their recurrent states in place (``ops.gla_step_``; other kinds copy the new state in);
* positions come from a device tensor that the step itself increments.

This file is copied next to exported hybrids with ``students.py`` and ``ops.py``: it imports only torch,
transformers, its siblings and (optionally) Triton.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys

import torch
from transformers import AttentionInterface

from .ops import triton
from .students import PreallocatedLayer, RecurrentStateLayer, attends_globally, preallocated_cache

if triton is not None:
    import triton.language as tl

# The attention implementation a StaticDecoder switches the model to while it runs (or captures) a step.
# It is deliberately not registered as a mask function: transformers then builds no mask for it.
STATIC_DECODE_ATTENTION = "dtr_static_decode"
# The Triton kernel's launch configuration, from a sweep on an H200 at 64K context (Qwen2.5-1.5B shape at
# batch 76 and 147, Llama-3.2-1B shape at 64 and 128; BENCHMARKS.md): 128 keys per block, 8 warps
# and at least 4 splits per sequence read 4.4-4.6 TB/s at every shape, within 1-5% of the best
# configuration of each and at or above cuDNN's SDPA (3.9-4.6 TB/s).
_KEY_BLOCK = 128
_NUM_WARPS = 8
_NUM_STAGES = 3
_MIN_SPLITS = 4
_PROGRAMS_PER_SM = 8
_MAX_SPLITS = 64  # the combining kernel holds every split's partial output of a head at once


def decode_attention(query: torch.Tensor, key_buffer: torch.Tensor, value_buffer: torch.Tensor,
                     length: torch.Tensor, scale: float | None = None, backend: str = "auto",
                     num_splits: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over the first ``length`` positions of key/value buffers.

    Args:
        query: [B, Hq, 1, D]. key_buffer, value_buffer: [B, Hkv, capacity, D] with Hq a multiple of Hkv
            (grouped-query attention: query head h reads key/value head h // (Hq // Hkv)).
        length: int64 tensor [1] on the buffers' device: positions 0..length-1 are attended. It is read on
            the device, so a captured CUDA graph replays correctly as it grows.
        scale: score scale (default D ** -0.5).
        backend: "auto" (Triton on CUDA for power-of-two D, else "torch"), "triton" (also on CPU tensors
            under TRITON_INTERPRET=1) or "torch" (masked softmax over the whole buffer, in fp32).
        num_splits: how many programs share one sequence's keys (default: enough to fill the GPU).

    Returns:
        [B, 1, Hq, D] in the query's dtype (the layout transformers' attention functions return).
    """
    batch, query_heads, query_length, dim = query.shape
    kv_heads, capacity = key_buffer.shape[1], key_buffer.shape[2]
    if query_length != 1 or query_heads % kv_heads or value_buffer.shape != key_buffer.shape:
        raise ValueError(f"decode_attention takes one query token per sequence and Hq a multiple of Hkv; got "
                         f"query {tuple(query.shape)}, keys {tuple(key_buffer.shape)}, "
                         f"values {tuple(value_buffer.shape)}")
    scale = dim ** -0.5 if scale is None else scale
    if backend == "auto":
        backend = "triton" if triton is not None and query.is_cuda and dim == triton.next_power_of_2(dim) else "torch"
    if backend == "torch":
        return _decode_attention_torch(query, key_buffer, value_buffer, length, scale)
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; valid: 'auto', 'triton', 'torch'")
    if triton is None:
        raise RuntimeError("backend 'triton' needs Triton, which could not be imported")
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
    _split_attention_kernel[(batch, kv_heads, num_splits)](
        query, key_buffer, value_buffer, length, parts, part_lse, scale,
        query.stride(0), query.stride(1), *key_buffer.stride()[:3], *value_buffer.stride()[:3],
        QUERY_HEADS=query_heads, GROUP=group, BLOCK_GROUP=max(16, triton.next_power_of_2(group)), DIM=dim,
        BLOCK_KEYS=_KEY_BLOCK, SPLIT=split, NUM_SPLITS=num_splits, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    out = torch.empty(batch, 1, query_heads, dim, dtype=query.dtype, device=query.device)
    _combine_splits_kernel[(batch * query_heads,)](
        parts, part_lse, out, QUERY_HEADS=query_heads, DIM=dim, NUM_SPLITS=num_splits,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
    )
    return out


def _decode_attention_torch(query, key_buffer, value_buffer, length, scale) -> torch.Tensor:
    batch, query_heads, _, dim = query.shape
    kv_heads, capacity = key_buffer.shape[1], key_buffer.shape[2]
    grouped = query.float().view(batch, kv_heads, query_heads // kv_heads, dim)
    scores = torch.einsum("bhgd,bhnd->bhgn", grouped, key_buffer.float()) * scale
    attended = torch.arange(capacity, device=query.device) < length  # a device comparison: no host sync
    weights = scores.masked_fill(~attended, float("-inf")).softmax(-1)
    # Positions past the length are unwritten memory, possibly NaN, which a zero weight would not cancel.
    values = value_buffer.float().masked_fill(~attended[:, None], 0.0)
    out = torch.einsum("bhgn,bhnd->bhgd", weights, values)
    return out.reshape(batch, 1, query_heads, dim).to(query.dtype)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


if triton is not None:

    @triton.jit
    def _split_attention_kernel(query, keys, values, length, parts, part_lse, scale,
                                query_stride_b, query_stride_h, key_stride_b, key_stride_h, key_stride_n,
                                value_stride_b, value_stride_h, value_stride_n,
                                QUERY_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_GROUP: tl.constexpr,
                                DIM: tl.constexpr, BLOCK_KEYS: tl.constexpr, SPLIT: tl.constexpr,
                                NUM_SPLITS: tl.constexpr):
        # One sequence, one key/value head, one split of its keys: the GROUP query heads that share the head
        # attend to keys [start, end) with an online softmax; writes their normalised partial outputs and
        # log-sum-exps (-inf for a split past the length) for _combine_splits_kernel.
        i_b, i_kv, i_split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        start = i_split * SPLIT
        end = tl.minimum(start + SPLIT, tl.load(length))
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
            positions = start + offset + tl.arange(0, BLOCK_KEYS)
            key_ok = positions < end
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


def static_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            static_decode_length=None, **kwargs):
    """transformers attention function for StaticDecoder steps: ``key``/``value`` are a PreallocatedLayer's
    whole buffers, and ``static_decode_length`` (a model kwarg) says how many positions hold tokens."""
    if static_decode_length is None or query.shape[2] != 1:
        raise RuntimeError(f"attention {STATIC_DECODE_ATTENTION!r} runs only inside StaticDecoder steps")
    return decode_attention(query, key, value, static_decode_length, scaling), None


AttentionInterface.register(STATIC_DECODE_ATTENTION, static_decode_attention)


@contextlib.contextmanager
def static_attention(model: torch.nn.Module):
    """Within the block the model's attention modules call ``static_decode_attention``. Every config in
    the model is switched: an exported hybrid's layers hold the base architecture's copy of its config."""
    configs = list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values())
    saved = [config._attn_implementation for config in configs]
    for config in configs:
        config._attn_implementation = STATIC_DECODE_ATTENTION
    try:
        yield
    finally:
        for config, implementation in zip(configs, saved):
            config._attn_implementation = implementation


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which the model's forward takes (and its output returns) the cache: ``cache`` from
    transformers 5.2x on, ``past_key_values`` in earlier 5.x releases."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class StaticDecoder:
    """Decode one token per sequence per step from a prefilled cache, with every step the same sequence of
    kernels on the same buffers: on CUDA the first step is captured as a CUDA graph and later steps replay
    it, so the host's cost per step is one launch instead of several hundred.

    Args:
        model: a causal LM (optionally with students installed) whose forward takes ``position_ids``.
        cache: its cache after the prompt: ``students.preallocated_cache`` with room for ``max_steps``
            more tokens per full-attention layer (students hold their recurrent states).
        max_steps: how many steps this decoder may take (default: as many as the full-attention layers'
            buffers have room for; unlimited when every layer is linear).
        graph: capture and replay a CUDA graph (default: when the cache lives on CUDA).

    ``step(tokens)`` feeds one token per sequence and returns the logits ``[B, 1, vocab]`` (a buffer the
    next step overwrites: copy what you keep). While the decoder is open the cache's own lengths are not
    advanced; ``close()`` brings them up to date and hands the cache back for ordinary use.
    """

    def __init__(self, model: torch.nn.Module, cache, max_steps: int | None = None,
                 graph: bool | None = None) -> None:
        attention_layers = [layer for layer in cache.layers if isinstance(layer, PreallocatedLayer)]
        state_layers = [layer for layer in cache.layers if isinstance(layer, RecurrentStateLayer)]
        if not attends_globally(model.config):
            raise ValueError("static decoding attends to every cached position; this model has sliding-window "
                             "or chunked attention layers: decode it with generate()")
        others = [type(layer).__name__ for layer in cache.layers
                  if not isinstance(layer, (PreallocatedLayer, RecurrentStateLayer))]
        if others or not cache.layers:
            raise ValueError(f"StaticDecoder needs a students.preallocated_cache (got layers {others or 'none'})")
        if any(layer.key_buffer is None for layer in attention_layers) or any(
                layer.state is None for layer in state_layers):
            raise ValueError("StaticDecoder continues a prefilled cache: run the prompt through the model first")
        self.start = cache.get_seq_length()
        room = min((layer.key_buffer.shape[-2] for layer in attention_layers), default=None)
        if max_steps is None:
            max_steps = sys.maxsize if room is None else room - self.start
        elif room is not None and room < self.start + max_steps:
            raise ValueError(f"the cache holds {room} positions per layer, fewer than the prompt's {self.start} + "
                             f"max_steps {max_steps}: build it with preallocated_cache(num_layers, "
                             f"capacity={self.start + max_steps})")
        some_layer = (attention_layers or state_layers)[0]
        some_tensor = some_layer.key_buffer if attention_layers else some_layer.state
        self.batch, self.device = some_tensor.shape[0], some_tensor.device
        self.model, self.cache, self.max_steps = model, cache, max_steps
        self.graph = self.device.type == "cuda" if graph is None else graph
        self.steps = 0
        self._attention_layers, self._state_layers = attention_layers, state_layers
        self._cache_arg = cache_keyword(model)
        # Static inputs: the graph reads these buffers, and increments the position itself.
        self._tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self._position = torch.tensor([self.start], dtype=torch.long, device=self.device)
        self._logits: torch.Tensor | None = None
        self._captured: torch.cuda.CUDAGraph | None = None
        for layer in attention_layers:
            layer.write_position = self._position
        for layer in state_layers:
            # V-first storage: ops.gla_step_'s kernel reads each value channel's keys as one contiguous row.
            layer.state = layer.state.transpose(-1, -2).contiguous().transpose(-1, -2)
            layer.in_place = True

    def step(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tokens`` ([B, 1]; None repeats the previous ones) and return the next logits."""
        if self.steps >= self.max_steps:
            raise RuntimeError(f"this StaticDecoder was sized for {self.max_steps} steps; build one with more")
        if tokens is not None:
            self._tokens.copy_(tokens.view(self.batch, 1))
        if self._captured is not None:
            self._captured.replay()
        elif self.graph:
            self._warm_up_and_capture()
        else:
            self._forward()
        self.steps += 1
        return self._logits

    def close(self):
        """Stop static decoding: the cache's lengths take in the steps taken, and it works as usual again."""
        length = self.start + self.steps
        for layer in self._attention_layers:
            layer.write_position = None
            layer._expose(length)
        for layer in self._state_layers:
            layer.in_place, layer.seen_tokens = False, length
        self._captured = None
        return self.cache

    def _forward(self) -> None:
        """One step, in the order the graph records it: the model, then the position moves on."""
        with static_attention(self.model):
            output = self.model(input_ids=self._tokens, position_ids=self._position.view(1, 1), use_cache=True,
                                static_decode_length=self._position + 1, **{self._cache_arg: self.cache})
        self._logits = output.logits
        self._position.add_(1)

    def _warm_up_and_capture(self) -> None:
        # capture_graph's real run is this step; from here on self._logits is the graph's output buffer.
        ran = []

        def run():
            self._forward()
            ran.append(self._logits)

        self._captured = capture_graph(run, self.device)
        self._logits.copy_(ran[0])


def capture_graph(run, device) -> torch.cuda.CUDAGraph:
    """``run()`` once for real on a side stream (kernels compile, cuBLAS settles its workspaces), then
    recorded as a CUDA graph; recording runs nothing, so the graph's first replay is the second run."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


@torch.no_grad()
def static_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                    do_sample: bool = False, temperature: float = 1.0,
                    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                    graph: bool | None = None) -> torch.Tensor:
    """Generate with a StaticDecoder: the prompt in one forward, then one token per step, each step a
    replay of one CUDA graph on CUDA (eager elsewhere).

    Args:
        input_ids: [B, T] prompts of equal length, no padding (for padded batches use ``generate``).
        max_new_tokens: tokens to add to every sequence.
        do_sample: sample from softmax(logits / temperature) instead of taking the argmax.
        eos_token_id: one or several end-of-sequence tokens: a sequence that produced one gets
            ``pad_token_id`` (default: the first eos token) at every later step, and generation stops once
            every sequence has (checking costs one host sync per step).
        graph: see StaticDecoder.

    Returns:
        [B, T + n] prompts and new tokens, n <= max_new_tokens.
    """
    if input_ids.dim() != 2 or max_new_tokens < 1:
        raise ValueError(f"input_ids must be [batch, length] and max_new_tokens >= 1; got {tuple(input_ids.shape)} "
                         f"and {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling; got {temperature}")
    cache = preallocated_cache(model.config.num_hidden_layers, input_ids.shape[1] + max_new_tokens)
    logits = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache}).logits[:, -1]
    decoder = StaticDecoder(model, cache, graph=graph)
    eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=input_ids.device).view(-1)
    pad = int(eos[0]) if pad_token_id is None and eos is not None else pad_token_id
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    try:
        for step in range(max_new_tokens):
            if do_sample:
                tokens = torch.multinomial((logits.float() / temperature).softmax(-1), 1)[:, 0]
            else:
                tokens = logits.argmax(-1)
            if eos is not None:
                tokens = tokens.masked_fill(finished, pad)
                finished |= torch.isin(tokens, eos)
            new_tokens.append(tokens)
            if step + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            logits = decoder.step(tokens[:, None])[:, -1]
    finally:
        decoder.close()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
