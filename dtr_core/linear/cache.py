"""transformers cache layers for hybrids: a recurrent state for each linear layer, and key/value buffers
written in place for the full-attention layers.

Both layers have a static mode for ``decoding.StaticDecoder`` (``begin_static`` ... ``end_static``):
in it every step works on the same memory at positions held in device tensors, so that a captured CUDA
graph can replay it; the decoder keeps the lengths meanwhile.

Copied next to exported hybrids: imports only torch and transformers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class RecurrentStateLayer(DynamicLayer):
    """A transformers cache layer for a linear-attention layer: one recurrent state, no keys.

    It still counts the tokens it has seen, because transformers reads the sequence length (for
    positions and masks) from layer 0, which may be a linear layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.state: torch.Tensor | None = None
        # The last few tokens' inputs a student keeps beside its state, by name: a short convolution's
        # inputs, a sliding window's keys and values (see ``keep``).
        self.histories: dict[str, torch.Tensor] = {}
        self.seen_tokens = 0
        # Static mode (begin_static): students then update ``state`` and the histories where they lie and
        # leave the count alone; a sliding window's histories are rings (``ring_slot``), named in ``_rings``.
        self.in_place = False
        self._write_position: torch.Tensor | None = None
        self._rings: set[str] = set()

    def advance(self, state: torch.Tensor, num_tokens: int) -> None:
        self.state, self.seen_tokens = state, self.seen_tokens + num_tokens

    def keep(self, name: str, history: torch.Tensor) -> None:
        """Store a history under ``name``: copied into the one already there in static mode (a captured
        graph replays on that memory), replaced otherwise."""
        if self.in_place:
            self.histories[name].copy_(history)
        else:
            self.histories[name] = history

    def rows(self, rows: slice | torch.Tensor) -> "RecurrentStateLayer":
        """A layer holding these batch rows of this one's state and histories, at the same token count: a call over
        part of a batch continues from it; ``write_rows`` puts the parts back."""
        part = RecurrentStateLayer()
        part.state = None if self.state is None else self.state[rows]
        part.histories = {name: history[rows] for name, history in self.histories.items()}
        part.seen_tokens = self.seen_tokens
        return part

    def write_rows(self, rows: slice | torch.Tensor, part: "RecurrentStateLayer", batch: int, seen_tokens: int) -> None:
        """Write ``part``'s state and histories (a layer of these ``rows`` of a ``batch``-row batch) into this one's
        rows, allocating each tensor on the first write (after ``reset``: new tensors, so a state that a captured
        graph replays on is left as it was); ``seen_tokens`` tokens seen."""
        def into(held: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor:
            held = tensor.new_empty((batch, *tensor.shape[1:])) if held is None else held
            held[rows] = tensor
            return held

        if part.state is not None:
            self.state = into(self.state, part.state)
        self.histories = {name: into(self.histories.get(name), history) for name, history in part.histories.items()}
        self.seen_tokens = seen_tokens

    def begin_static(self, write_position: torch.Tensor) -> None:
        """Static mode: students overwrite ``state`` in place (a captured CUDA graph replays on that memory),
        which is stored V-first from here on (``gla.gla_step_``'s kernel reads each value channel's keys as
        one contiguous row). ``write_position`` is an int64 device tensor [1], the position of the token being
        fed, which the caller advances after each step. The token count stays as it is until ``end_static``."""
        self.state = self.state.transpose(-1, -2).contiguous().transpose(-1, -2)
        self.in_place = True
        self._write_position = write_position

    def ring_slot(self, window: int) -> torch.Tensor:
        """Static mode: the slot (int64 device tensor [1]) where a W-token history, used as a ring, holds the
        token W positions before the one being fed, whose entry that token's replaces (``write_ring``).

        A history kept in order up to static mode, which began after ``seen_tokens`` tokens (a count static mode
        leaves alone), is such a ring: token ``seen_tokens - W + j`` sits in slot j, token p in slot
        ``(p - seen_tokens) mod W``."""
        return (self._write_position - self.seen_tokens).remainder(window)

    def write_ring(self, name: str, slot: torch.Tensor, tensor: torch.Tensor) -> None:
        """Static mode: write one token's ``tensor`` [B, 1, ...] into the ring history ``name`` at ``slot``."""
        self.histories[name].index_copy_(1, slot, tensor)
        self._rings.add(name)

    def end_static(self, seen_tokens: int) -> None:
        """Back to ordinary updates, ``seen_tokens`` tokens seen; ring histories back in order (oldest first)."""
        for name in self._rings:
            history = self.histories[name]
            oldest = (seen_tokens - self.seen_tokens) % history.shape[1]  # the count when static mode began
            self.histories[name] = history.roll(-oldest, dims=1)
        self._rings.clear()
        self.in_place, self.seen_tokens, self._write_position = False, seen_tokens, None

    def get_seq_length(self, *args) -> int:
        return self.seen_tokens

    def update(self, *args, **kwargs):
        raise RuntimeError("a linear-attention layer keeps a recurrent state, not keys and values")

    def reset(self) -> None:
        self.state, self.histories, self.seen_tokens = None, {}, 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back to an earlier length")

    def _rebuild(self, transform) -> None:
        """Apply a batch-dimension ``transform`` to the state and every history."""
        if self.state is not None:
            self.state = transform(self.state)
        self.histories = {name: transform(history) for name, history in self.histories.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebuild(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuild(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuild(lambda tensor: tensor[indices, ...])


class PreallocatedLayer(DynamicLayer):
    """A transformers cache layer for a full-attention layer that writes keys and values in place into
    buffers sized for the whole generation (``capacity`` tokens), instead of concatenating.

    DynamicLayer concatenates into new tensors at every step, so each step copies the layer's whole
    cache and briefly holds it twice; near full GPU memory that costs more than the attention itself.
    Here ``keys``/``values`` are views of the buffers' first ``length`` positions, so the DynamicLayer
    methods that read them (sequence length, mask sizes, crop) work unchanged. Going past the
    capacity doubles the buffers (one copy), so an underestimate costs memory, never correctness.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        # Static mode (begin_static): a device tensor [1] holding the position the next token is written to.
        self._write_position: torch.Tensor | None = None

    def begin_static(self, write_position: torch.Tensor) -> None:
        """Static mode: ``update`` writes its one token at ``write_position`` (an int64 device tensor [1]
        that the caller advances) and returns the whole buffers, which the attention reads up to a length
        it is given; ``keys``/``values`` and the length stay as they are until ``end_static``."""
        self._write_position = write_position

    def end_static(self, length: int) -> None:
        """Back to ordinary updates, the first ``length`` positions holding tokens."""
        self._write_position = None
        self._expose(length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._write_position is not None:
            self.key_buffer.index_copy_(2, self._write_position, key_states)
            self.value_buffer.index_copy_(2, self._write_position, value_states)
            return self.key_buffer, self.value_buffer
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            self._reserve(key_states, value_states, end)
        self.key_buffer[..., length:end, :].copy_(key_states)
        self.value_buffer[..., length:end, :].copy_(value_states)
        self._expose(end)
        return self.keys, self.values

    def write_rows(self, rows: torch.Tensor, part: "PreallocatedLayer", batch: int, length: int) -> None:
        """Hold ``length`` positions, these ``rows`` of a ``batch``-row batch taking ``part``'s keys and values (a
        layer of those rows, whose positions are the last ones: left padding), allocated on the first write with
        zeros before them (masked as padding)."""
        if self.key_buffer is None:
            shape = (batch, *part.keys.shape[1:-2], max(self.capacity, length), part.keys.shape[-1])
            self.key_buffer, self.value_buffer = part.keys.new_zeros(shape), part.keys.new_zeros(shape)
        start = length - part.keys.shape[-2]
        self.key_buffer[rows, ..., start:length, :] = part.keys
        self.value_buffer[rows, ..., start:length, :] = part.values
        self._expose(length)

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        length = self.get_seq_length()
        held = 0 if self.key_buffer is None else self.key_buffer.shape[-2]
        capacity = max(needed, self.capacity, 2 * held)
        buffers = []
        for old, new in ((self.key_buffer, key_states), (self.value_buffer, value_states)):
            buffer = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
            if length:
                buffer[..., :length, :].copy_(old[..., :length, :])
            buffers.append(buffer)
        self.key_buffer, self.value_buffer = buffers

    def _expose(self, length: int) -> None:
        self.keys = self.key_buffer[..., :length, :]
        self.values = self.value_buffer[..., :length, :]
        self.is_initialized = True

    def _rebuild(self, transform) -> None:
        """Apply a batch-dimension ``transform`` to the buffers (the exposed views follow)."""
        if self.key_buffer is not None:
            length = self.get_seq_length()
            self.key_buffer, self.value_buffer = transform(self.key_buffer), transform(self.value_buffer)
            self._expose(length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuild(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuild(lambda buffer: buffer[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebuild(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = self.keys = self.values = None
        self.is_initialized = False


def attends_globally(config) -> bool:
    """Whether every attention layer of ``config`` sees all earlier tokens (no sliding window, no chunks):
    only then does a preallocated cache, which keeps every position, decode the model correctly."""
    hybrid = getattr(config, "dtr_hybrid", None) or {}
    types = hybrid.get("base_layer_types") or getattr(config, "layer_types", None) or ()
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return not windowed and all(kind in ("full_attention", "linear_attention") for kind in types)


def preallocated_cache(num_layers: int, capacity: int) -> DynamicCache:
    """A cache for ``capacity`` tokens (prompt + new tokens) whose full-attention layers write in place
    (PreallocatedLayer, allocated on first use); a student replaces its slot with its recurrent state."""
    cache = DynamicCache()
    cache.layers[:] = [PreallocatedLayer(capacity) for _ in range(num_layers)]
    return cache


def state_layer(cache, layer_idx: int) -> RecurrentStateLayer:
    """Layer ``layer_idx``'s recurrent-state slot in ``cache``, put there on first use.

    The slot a cache made for this index (a key/value layer, or transformers' own linear layer
    when built from a hybrid config) has not been written yet, so it is simply replaced.
    """
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    if not isinstance(cache.layers[layer_idx], RecurrentStateLayer):
        cache.layers[layer_idx] = RecurrentStateLayer()
    return cache.layers[layer_idx]
