"""Decoding steps that depend on no host-side length, so that one CUDA graph replays every step.

Why: at long context a decode step of a 1-2B-parameter model is several hundred kernels issued one by
one from Python, and once half the layers are linear the GPU finishes a step before the host has issued
the next. Measured on an H200 (Qwen2.5-1.5B shape, random weights, 64K context, batch 76, eager): the
hybrid with 14 of 28 layers linear kept the GPU busy 22 ms of a 32 ms step, the full model 36 of 37 ms,
so half the layers linear bought 1.16x instead of the 1.6x the GPU work allows. A captured step costs the
host one launch.

What makes a step capturable (``StaticDecoder`` sets it up on a prefilled ``cache.preallocated_cache``,
switching the cache's layers to their static mode while it is open):

* full-attention layers (``cache.PreallocatedLayer``) write the new key and value at a position held
  in a device tensor, and attention reads the first ``length`` positions of the buffers, ``length`` also
  a device tensor: ``decode_attention`` (Triton on CUDA, ``kernels.decode_attention_triton``: the keys
  split across programs, each key/value head read once for all the query heads that share it), switched
  in by ``static_attention`` only while a step runs or is captured;
* students advance their recurrent states in place (``gla.gla_step_``, ``gated_deltanet.gated_delta_step_``);
* positions come from a device tensor that the step itself increments, one per sequence: in a left-padded
  batch each sequence counts from its first real token, and its full-attention layers skip the padding
  (a per-sequence ``start`` of the attended positions, also on the device).

Two loops run on it: ``static_generate`` (``generate_static``: greedy or plain sampling, the leanest loop),
and ``sample_static``, transformers' own greedy/sampling loop (its logits processors, stopping criteria and
random draws) that an exported hybrid's ``generate()`` takes by default (``static_sampling_refusal`` says
when it cannot). Both run the prompt through ``prefill``, which takes a large batch a group of similar-length
rows at a time.

Copied next to exported hybrids: imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch
from transformers import AttentionInterface
from transformers.generation import GenerateDecoderOnlyOutput

from .cache import PreallocatedLayer, RecurrentStateLayer, attends_globally, preallocated_cache
from .kernels import decode_attention_triton, triton

# The attention implementation a StaticDecoder switches the model to while it runs (or captures) a step.
# It is deliberately not registered as a mask function: transformers then builds no mask for it.
STATIC_DECODE_ATTENTION = "dtr_static_decode"


def decode_attention(query: torch.Tensor, key_buffer: torch.Tensor, value_buffer: torch.Tensor,
                     length: torch.Tensor, scale: float | None = None, backend: str = "auto",
                     num_splits: int | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
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
        start: int64 tensor [B] on the buffers' device, or None (0): sequence b attends positions
            start[b]..length-1 only; the positions before are its left padding.

    Returns:
        [B, 1, Hq, D] in the query's dtype (the layout transformers' attention functions return).
    """
    _, query_heads, query_length, dim = query.shape
    kv_heads = key_buffer.shape[1]
    if query_length != 1 or query_heads % kv_heads or value_buffer.shape != key_buffer.shape:
        raise ValueError(f"decode_attention takes one query token per sequence and Hq a multiple of Hkv; got "
                         f"query {tuple(query.shape)}, keys {tuple(key_buffer.shape)}, "
                         f"values {tuple(value_buffer.shape)}")
    if start is not None and start.shape != (query.shape[0],):
        raise ValueError(f"start must hold one position per sequence, [{query.shape[0]}]; got {tuple(start.shape)}")
    scale = dim ** -0.5 if scale is None else scale
    if backend == "auto":
        backend = "triton" if triton is not None and query.is_cuda and dim == triton.next_power_of_2(dim) else "torch"
    if backend == "torch":
        return _decode_attention_torch(query, key_buffer, value_buffer, length, scale, start)
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; valid: 'auto', 'triton', 'torch'")
    if triton is None:
        raise RuntimeError("backend 'triton' needs Triton, which could not be imported")
    return decode_attention_triton(query, key_buffer, value_buffer, length, scale, num_splits, start)


def _decode_attention_torch(query, key_buffer, value_buffer, length, scale, start) -> torch.Tensor:
    batch, query_heads, _, dim = query.shape
    kv_heads, capacity = key_buffer.shape[1], key_buffer.shape[2]
    grouped = query.float().view(batch, kv_heads, query_heads // kv_heads, dim)
    scores = torch.einsum("bhgd,bhnd->bhgn", grouped, key_buffer.float()) * scale
    positions = torch.arange(capacity, device=query.device)
    attended = (positions < length)[None]  # [1 or B, capacity]; device comparisons: no host sync
    if start is not None:
        attended = attended & (positions >= start[:, None])
    weights = scores.masked_fill(~attended[:, None, None], float("-inf")).softmax(-1)
    # Positions past the length are unwritten memory, possibly NaN, which a zero weight would not cancel.
    values = value_buffer.float().masked_fill(~attended[:, None, :, None], 0.0)
    out = torch.einsum("bhgn,bhnd->bhgd", weights, values)
    return out.reshape(batch, 1, query_heads, dim).to(query.dtype)


def static_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            static_decode_length=None, static_decode_start=None, **kwargs):
    """transformers attention function for StaticDecoder steps: ``key``/``value`` are a PreallocatedLayer's
    whole buffers, and ``static_decode_length`` / ``static_decode_start`` (model kwargs) say which positions
    hold each sequence's tokens (see ``decode_attention``)."""
    if static_decode_length is None or query.shape[2] != 1:
        raise RuntimeError(f"attention {STATIC_DECODE_ATTENTION!r} runs only inside StaticDecoder steps")
    return decode_attention(query, key, value, static_decode_length, scaling, start=static_decode_start), None


@contextlib.contextmanager
def static_attention(model: torch.nn.Module):
    """Within the block the model's attention modules call ``static_decode_attention``. Every config in
    the model is switched: an exported hybrid's layers hold the base architecture's copy of its config."""
    # Registered on entry, not at import, so that importing this module changes nothing global; registering
    # the same function again is a no-op.
    AttentionInterface.register(STATIC_DECODE_ATTENTION, static_decode_attention)
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


def left_padding(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """How many padding positions precede each sequence's tokens: int64 [B] on the mask's device, from a
    [B, length] mask of 1 (token) and 0 (padding); None for no mask. Reads the mask on the host once.

    Raises ValueError unless the mask is left padding (each row: zeros, then ones), the only layout
    static decoding handles: its steps append every sequence's new token at the same buffer position.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] != length:
        raise ValueError(f"attention_mask must be [batch, {length}] (the tokens in the cache); "
                         f"got {tuple(attention_mask.shape)}")
    tokens = attention_mask.bool()
    padding = (~tokens).sum(-1)
    if not torch.equal(tokens, torch.arange(length, device=tokens.device) >= padding[:, None]):
        raise ValueError("attention_mask is not left padding (every row zeros, then ones): static decoding "
                         "cannot skip padding between or after tokens")
    return padding


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of left-padded prompts, as transformers' generate() computes them: each sequence
    counts from its first token, padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


# A left-padded prompt batch over this many tokens (rows x padded length) runs a group of rows at a time, rows of
# similar length together: padding is skipped (64 prompts of 1K-8K tokens padded to 8K are 45% padding, which every
# layer computes and masked attention attends over) and each forward's intermediates stay those of batch 8 x 8K.
PREFILL_GROUP_TOKENS = 65536


def prompt_groups(padding: torch.Tensor, length: int, budget: int) -> list[torch.Tensor]:
    """Row indices [g] of each group of a left-padded batch (``padding`` [B]: each row's padding positions before
    its tokens, of ``length``): longest rows first, as many to a group as fit ``budget`` tokens at the group's
    longest length, at least one."""
    device, padding = padding.device, padding.cpu()
    order = torch.argsort(padding, stable=True)
    lengths = length - padding[order]
    groups, first = [], 0
    while first < len(order):
        rows = max(1, budget // int(lengths[first]))
        groups.append(order[first:first + rows].to(device))
        first += rows
    return groups


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None, cache) -> torch.Tensor:
    """The prompt's forward into the empty preallocated ``cache``; returns the last position's logits [B, vocab].

    A batch over ``PREFILL_GROUP_TOKENS`` tokens runs a group of rows at a time (``prompt_groups``), each cut to its
    own longest prompt, into a cache of its own whose layers then write their rows into ``cache`` (keys at the
    positions the whole batch's forward would have written them, recurrent states and histories by row).
    """
    batch, length = input_ids.shape
    keyword = cache_keyword(model)
    padding = None
    if batch * length > PREFILL_GROUP_TOKENS:  # (the mask is read on the host only for batches that may group)
        padding = (torch.zeros(batch, dtype=torch.long, device=input_ids.device) if attention_mask is None
                   else left_padding(attention_mask, length))
    if padding is None or bool((padding == length).any()):  # small, or a row of padding alone: as it is
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                     logits_to_keep=1, **{keyword: cache}).logits[:, -1]
    if position_ids is None and attention_mask is not None:
        position_ids = prompt_positions(attention_mask)
    logits = None
    for rows in prompt_groups(padding, length, PREFILL_GROUP_TOKENS):
        start = int(padding[rows].min())
        group_cache = preallocated_cache(len(cache.layers), length - start)
        out = model(input_ids=input_ids[rows, start:], use_cache=True, logits_to_keep=1,
                    attention_mask=None if attention_mask is None else attention_mask[rows, start:],
                    position_ids=None if position_ids is None else position_ids[rows, start:],
                    **{keyword: group_cache}).logits[:, -1]
        logits = out.new_empty((batch, out.shape[-1])) if logits is None else logits
        logits[rows] = out
        for index, part in enumerate(group_cache.layers):  # into the batch's cache now: one group's copy at a time
            if isinstance(part, RecurrentStateLayer) and not isinstance(cache.layers[index], RecurrentStateLayer):
                cache.layers[index] = RecurrentStateLayer()
            cache.layers[index].write_rows(rows, part, batch, length)
    return logits


class StaticDecoder:
    """Decode one token per sequence per step from a prefilled cache, with every step the same sequence of
    kernels on the same buffers: on CUDA the first step is captured as a CUDA graph and later steps replay
    it, so the host's cost per step is one launch instead of several hundred.

    Args:
        model: a causal LM (optionally with students installed) whose forward takes ``position_ids``.
        cache: its cache after the prompt: ``cache.preallocated_cache`` with room for ``max_steps``
            more tokens per full-attention layer (students hold their recurrent states).
        max_steps: how many steps this decoder may take (default: as many as the full-attention layers'
            buffers have room for; unlimited when every layer is linear).
        graph: capture and replay a CUDA graph (default: when the cache lives on CUDA).
        attention_mask: [B, cached tokens], the prompt's mask when it was left-padded (see ``left_padding``);
            full-attention layers then skip each sequence's padding, and positions count from its first token.
        position_ids: [B] (or [1]) position of the first token fed (default: each sequence's number of
            cached tokens, padding excluded).

    ``step(tokens)`` feeds one token per sequence and returns the logits ``[B, 1, vocab]`` (a buffer the
    next step overwrites: copy what you keep). From construction to ``close()`` the decoder owns the cache:
    its layers are in their static mode (``begin_static``) and their own lengths are not advanced;
    ``close()`` brings them up to date and hands the cache back for ordinary use. Used as a context
    manager, the decoder closes on exit.
    """

    def __init__(self, model: torch.nn.Module, cache, max_steps: int | None = None,
                 graph: bool | None = None, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> None:
        attention_layers = [layer for layer in cache.layers if isinstance(layer, PreallocatedLayer)]
        state_layers = [layer for layer in cache.layers if isinstance(layer, RecurrentStateLayer)]
        if not attends_globally(model.config):
            raise ValueError("static decoding attends to every cached position; this model has sliding-window "
                             "or chunked attention layers: decode it with generate()")
        others = [type(layer).__name__ for layer in cache.layers
                  if not isinstance(layer, (PreallocatedLayer, RecurrentStateLayer))]
        if others or not cache.layers:
            raise ValueError(f"StaticDecoder needs a cache.preallocated_cache (got layers {others or 'none'})")
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
        padding = left_padding(attention_mask, self.start)
        padding = None if padding is None else padding.to(self.device)  # generate() takes prompts on the CPU too
        if position_ids is None:
            position_ids = torch.tensor([self.start], device=self.device) - (0 if padding is None else padding)
        # Static inputs: the graph reads these buffers, and moves the positions on itself. Every sequence's
        # token goes to the same buffer slot (``_slot``); its position and first attended slot (``_start``,
        # after its padding) are its own.
        self._tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self._slot = torch.tensor([self.start], dtype=torch.long, device=self.device)
        self._positions = position_ids.to(self.device, torch.long).view(-1, 1).expand(self.batch, 1).clone()
        self._start = padding
        self._logits: torch.Tensor | None = None
        self._captured: torch.cuda.CUDAGraph | None = None
        for layer in (*attention_layers, *state_layers):
            layer.begin_static(self._slot)

    def __enter__(self) -> "StaticDecoder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
        for layer in (*self._attention_layers, *self._state_layers):
            layer.end_static(length)
        self._captured = None
        return self.cache

    def _forward(self) -> None:
        """One step, in the order the graph records it: the model, then the positions move on."""
        with static_attention(self.model):
            output = self.model(input_ids=self._tokens, position_ids=self._positions, use_cache=True,
                                static_decode_length=self._slot + 1, static_decode_start=self._start,
                                **{self._cache_arg: self.cache})
        self._logits = output.logits
        self._slot.add_(1)
        self._positions.add_(1)

    def _warm_up_and_capture(self) -> None:
        # capture_graph's real run is this step; from here on self._logits is the graph's output buffer.
        ran = []

        def run():
            self._forward()
            ran.append(self._logits)

        self._captured = capture_graph(run, self.device)
        self._logits.copy_(ran[0])


def capture_graph(run, device, pool=None) -> torch.cuda.CUDAGraph:
    """``run()`` once for real on a side stream (kernels compile, cuBLAS settles its workspaces), then
    recorded as a CUDA graph (its memory from ``pool``, a ``torch.cuda.graph_pool_handle()``, when given);
    recording runs nothing, so the graph's first replay is the second run."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph


@torch.no_grad()
def static_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                    attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
                    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                    graph: bool | None = None) -> torch.Tensor:
    """Generate with a StaticDecoder: the prompt in one forward, then one token per step, each step a
    replay of one CUDA graph on CUDA (eager elsewhere).

    Args:
        input_ids: [B, T] prompts, left-padded to one length when they differ.
        max_new_tokens: tokens to add to every sequence.
        attention_mask: [B, T] 1 for tokens, 0 for the left padding (None: no padding).
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
    left_padding(attention_mask, input_ids.shape[1])  # refuses other layouts before the prompt runs
    positions = None if attention_mask is None else prompt_positions(attention_mask)
    cache = preallocated_cache(model.config.num_hidden_layers, input_ids.shape[1] + max_new_tokens)
    logits = prefill(model, input_ids, attention_mask, positions, cache)
    eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=input_ids.device).view(-1)
    pad = int(eos[0]) if pad_token_id is None and eos is not None else pad_token_id
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    with StaticDecoder(model, cache, graph=graph, attention_mask=attention_mask) as decoder:
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
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


# The model kwargs sample_static knows (its prompt's forward gets them all, as in transformers' loop; its steps
# take their own); any other takes transformers' loop. ``tokenizer`` is generate()'s own, for stop strings.
_STATIC_MODEL_INPUTS = ("attention_mask", "position_ids", "use_cache", "logits_to_keep", "tokenizer")


def static_sampling_refusal(model: torch.nn.Module, generation_config, model_kwargs: dict,
                            synced_gpus: bool = False) -> str | None:
    """Why ``sample_static`` cannot run this greedy or sampling generation (None: it can), from what
    transformers' generate() hands its ``_sample`` loop: the prepared generation config and model kwargs."""
    cache_arg = cache_keyword(model)
    if not attends_globally(model.config):
        return "the model's sliding-window or chunked attention layers"
    if synced_gpus:
        return "synced_gpus"
    if generation_config.output_attentions or generation_config.output_hidden_states:
        return "output_attentions / output_hidden_states (a replayed step keeps no per-layer outputs)"
    if not model_kwargs.get("use_cache", True):
        return "use_cache=False"
    others = sorted(key for key, value in model_kwargs.items()
                    if value is not None and key not in (*_STATIC_MODEL_INPUTS, cache_arg))
    if others:
        return f"model inputs {', '.join(others)}"
    layers = getattr(model_kwargs.get(cache_arg), "layers", None)
    if not layers or not all(isinstance(layer, PreallocatedLayer) and layer.key_buffer is None for layer in layers):
        return "a cache passed in that is not an empty cache.preallocated_cache"
    position_ids = model_kwargs.get("position_ids")
    if position_ids is None or position_ids.dim() != 2:
        return "position_ids that are not [batch, length]"
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is not None:
        try:
            left_padding(attention_mask, attention_mask.shape[-1])
        except ValueError:
            return "an attention_mask that is not left padding"
    return None


@torch.no_grad()
def sample_static(model: torch.nn.Module, input_ids: torch.Tensor, logits_processor, stopping_criteria,
                  generation_config, model_kwargs: dict, streamer=None):
    """transformers' greedy/sampling loop (``GenerationMixin._sample``) with every step after the prompt on a
    StaticDecoder: the same logits processors and stopping criteria on the same inputs, the same random
    draws (one ``torch.multinomial`` per step over the processed scores' softmax), padding after eos, the
    same return value (a ``GenerateDecoderOnlyOutput`` with scores/logits when asked). The prompt runs
    through ``model._prefill`` as there. Only for what ``static_sampling_refusal`` accepts.

    Args:
        input_ids: [B, T] prompts (left-padded). logits_processor, stopping_criteria, generation_config,
            model_kwargs: as generate() prepared them for ``_sample``. streamer: gets each step's tokens.
    """
    cache = model_kwargs[cache_keyword(model)]
    prompt_length, max_length = input_ids.shape[1], generation_config.max_length
    for layer in cache.layers:  # still empty (checked): buffers allocated at the prefill take the whole run
        layer.capacity = max(layer.capacity, max_length)
    if getattr(generation_config, "prefill_chunk_size", None) is None:
        logits = prefill(model, input_ids, model_kwargs.get("attention_mask"), model_kwargs["position_ids"], cache)
    else:  # transformers' prefill in chunks of tokens
        logits = model._prefill(input_ids, generation_config, model_kwargs).logits[:, -1]
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    unfinished_sequences = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    decoder = StaticDecoder(model, cache, max_steps=max_length - prompt_length,
                            attention_mask=model_kwargs.get("attention_mask"),
                            position_ids=model_kwargs["position_ids"][:, -1] + 1)
    with decoder:
        while True:
            next_token_logits = logits.to(copy=True, dtype=torch.float32, device=input_ids.device)
            next_token_scores = logits_processor(input_ids, next_token_logits)
            if scores is not None:
                scores += (next_token_scores,)
            if raw_logits is not None:
                raw_logits += (next_token_logits,)
            if generation_config.do_sample:
                next_tokens = torch.multinomial(next_token_scores.softmax(-1), num_samples=1).squeeze(1)
            else:
                next_tokens = next_token_scores.argmax(-1)
            if has_eos_stopping_criteria:
                next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, scores)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if unfinished_sequences.max() == 0:  # a host sync per step, as in transformers' loop
                break
            logits = decoder.step(next_tokens[:, None])[:, -1]
    if streamer is not None:
        streamer.end()
    if not return_dict:
        return input_ids
    return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits,
                                     **{cache_keyword(model): cache})
