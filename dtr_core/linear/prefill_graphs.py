"""Short prompts' student calls replayed as CUDA graphs.

At batch 1 and a few thousand tokens a student's prefill is bound by the host: its 20-odd kernels take 1.0-1.5 ms
to issue from Python against 0.33-0.39 ms of GPU work replayed as a graph (H200, BENCHMARKS.md issue 15), where
the attention it replaces issues a handful. So on CUDA, without gradients, a student call of at most
``GRAPH_MAX_TOKENS`` tokens that starts a sequence (no cache, or an empty cache layer) is captured as a CUDA graph
the second time its shape comes (the first runs eagerly: kernels compile and autotune outside any capture) and
replayed from then on, for a few shapes per student. The replay runs the same kernels on the same inputs as the
eager call, so its output is the eager call's.

A captured call stores into ``FreshLayer`` what it would store into the cache; each replay hands copies to the real
layer. Graphs hold raw addresses of the student's weights, so their key includes those addresses: a student moved
to another device or dtype captures anew. All students' graphs of one shape share one memory pool: replays run one
after another on one stream, and what outlives a replay (its output, state and histories) is copied out first.

Copied next to exported hybrids: imports only torch and its siblings.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from .decoding import capture_graph

# Calls over more tokens than this are bound by the GPU's work, not by the host's: a graph saves nothing there
# (Llama-1B shape, batch 8 x 2K: 2.45 ms eager against 2.42 replayed).
GRAPH_MAX_TOKENS = 8192
# Shapes captured per student; calls of other shapes then run eagerly. Each graph holds its outputs' memory, and
# dropping graphs to make room would capture anew, at a synchronisation each, whenever more shapes take turns.
GRAPHS_PER_STUDENT = 4
# Shapes counted while waiting for their second call, before the count starts over (a server's prompt lengths).
SHAPES_COUNTED = 1024


class FreshLayer:
    """A cache layer at the start of a sequence, standing in for the real one while a call is captured: it holds
    what the call stores (``cache.RecurrentStateLayer``'s ``advance`` and ``keep``), graph memory that each replay
    rewrites."""

    in_place = False
    seen_tokens = 0

    def __init__(self) -> None:
        self.state: torch.Tensor | None = None
        self.histories: dict[str, torch.Tensor] = {}
        self.advanced = 0

    def advance(self, state: torch.Tensor, num_tokens: int) -> None:
        self.state, self.advanced = state, self.advanced + num_tokens

    def keep(self, name: str, history: torch.Tensor) -> None:
        self.histories[name] = history

    def hand_over(self, layer) -> None:
        """Store copies of what the call stored here into ``layer``, as the call would have."""
        for name, history in self.histories.items():
            layer.keep(name, history.clone())
        if self.state is not None:
            layer.advance(self.state.clone(), self.advanced)


def starts_sequence(layer) -> bool:
    """Whether a cache ``layer`` (or None) holds nothing yet: a call then reads no state."""
    return layer is None or (layer.state is None and not layer.histories and layer.seen_tokens == 0
                             and not layer.in_place)


class PrefillGraph:
    """One student call captured for one shape: static inputs, the graph, and the outputs it rewrites."""

    def __init__(self, attend, hidden_states, valid, position_embeddings, with_layer: bool, pool: "GraphPool") -> None:
        self.pool = pool  # held for as long as this graph lives (see GraphPool)
        self.hidden_states = hidden_states.clone()
        self.valid = None if valid is None else valid.clone()
        self.position_embeddings = None if position_embeddings is None else tuple(
            table.clone() for table in position_embeddings)
        self.layer: FreshLayer | None = None
        self.output: torch.Tensor | None = None

        def run():
            self.layer = FreshLayer() if with_layer else None
            self.output = attend(self.hidden_states, self.valid, self.layer, self.position_embeddings)

        with torch.cuda.device(hidden_states.device):  # a graph is captured on the current device's streams
            self.graph = capture_graph(run, hidden_states.device, pool.handle)

    def __call__(self, hidden_states, valid, position_embeddings, layer) -> torch.Tensor:
        self.hidden_states.copy_(hidden_states)
        if valid is not None:
            self.valid.copy_(valid)
        if position_embeddings is not None:
            for held, table in zip(self.position_embeddings, position_embeddings):
                held.copy_(table)
        with torch.cuda.device(hidden_states.device):
            self.graph.replay()
        if layer is not None:
            self.layer.hand_over(layer)
        return self.output.clone()


class PrefillGraphs:
    """A student's captured calls by shape, and which shapes have come once."""

    def __init__(self) -> None:
        self.graphs: dict[tuple, PrefillGraph] = {}
        self.seen: set[tuple] = set()

    def call(self, student, hidden_states, valid, position_embeddings, layer) -> torch.Tensor:
        """``student._attend(hidden_states, valid, layer, position_embeddings)``: eagerly the first time its shape
        comes, then as a captured graph's replay (eagerly still once ``GRAPHS_PER_STUDENT`` shapes are captured)."""
        key = shape_key(student, hidden_states, valid, position_embeddings, layer)
        graph = self.graphs.get(key)
        if graph is None:
            self.forget_moved_weights(key[-1])
            if key not in self.seen or len(self.graphs) >= GRAPHS_PER_STUDENT:
                if len(self.seen) >= SHAPES_COUNTED:
                    self.seen.clear()
                self.seen.add(key)
                return student._attend(hidden_states, valid, layer, position_embeddings)
            graph = self.graphs[key] = PrefillGraph(student._attend, hidden_states, valid, position_embeddings,
                                                    layer is not None, shared_pool(key[:-1]))
        return graph(hidden_states, valid, position_embeddings, layer)

    def forget_moved_weights(self, addresses: tuple) -> None:
        """Drop the graphs captured on weights that have moved since (the student went to another device or dtype
        and back, or was reloaded): they can never replay, yet they would hold their memory and their place among
        ``GRAPHS_PER_STUDENT``."""
        self.graphs = {key: graph for key, graph in self.graphs.items() if key[-1] == addresses}


def shape_key(student, hidden_states, valid, position_embeddings, layer) -> tuple:
    """What a captured call depends on beyond its inputs' values: their shapes, the modes and switches that pick its
    kernels, and (last) the addresses of the weights it reads."""
    tables = None if position_embeddings is None else tuple(
        (tuple(table.shape), table.dtype) for table in position_embeddings)
    device = hidden_states.device
    autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
    return (device, tuple(hidden_states.shape), hidden_states.dtype, valid is None, tables, layer is None,
            torch.is_inference_mode_enabled(), autocast, student.prefill_kernels, student.backend,
            tuple(tensor.data_ptr() for tensor in itertools.chain(student.parameters(), student.buffers())))


class GraphPool:
    """The memory pool a shape's graphs are captured in, held by each of them. PyTorch refuses a capture into a pool
    whose graphs are all gone while blocks allocated during those captures are still held (e.g. a workspace a
    kernel library keeps), so a pool is shared only while one of its graphs lives; after that the shape gets a new
    one."""

    def __init__(self) -> None:
        self.handle = torch.cuda.graph_pool_handle()


_POOLS: "weakref.WeakValueDictionary[tuple, GraphPool]" = weakref.WeakValueDictionary()
_STUDENT_GRAPHS: "weakref.WeakKeyDictionary[torch.nn.Module, PrefillGraphs]" = weakref.WeakKeyDictionary()


def shared_pool(key: tuple) -> GraphPool:
    """The memory pool every student's graph of this shape is captured in, while one of them lives."""
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = GraphPool()
    return pool


def replayed_attend(student, hidden_states, valid, position_embeddings, layer) -> torch.Tensor:
    """A student's call (``_attend``) through its graphs (see ``replays_as_graph``); ``valid`` [B, T] bool or None."""
    if student not in _STUDENT_GRAPHS:  # kept beside the student, not in it: copying a student copies no graph
        _STUDENT_GRAPHS[student] = PrefillGraphs()
    return _STUDENT_GRAPHS[student].call(student, hidden_states, valid, position_embeddings, layer)


def replays_as_graph(hidden_states: torch.Tensor, layer, enabled: bool) -> bool:
    """Whether a student call on these inputs goes through its graphs: ``enabled``, on CUDA without gradients,
    outside another capture, over 2 to ``GRAPH_MAX_TOKENS`` tokens, starting a sequence."""
    batch, length, _ = hidden_states.shape
    return (enabled and hidden_states.is_cuda and not torch.is_grad_enabled() and 1 < length
            and batch * length <= GRAPH_MAX_TOKENS and starts_sequence(layer)
            and not torch.cuda.is_current_stream_capturing())
