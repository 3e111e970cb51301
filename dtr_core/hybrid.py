"""Hybrids: a base model with some attention modules swapped for students — and swapped back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from torch import nn

from .adapters import ModelAdapter

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def install_students(model: nn.Module, adapter: ModelAdapter,
                     students: Mapping[int, nn.Module]) -> dict[int, nn.Module]:
    """Swap layer ``i``'s attention for ``students[i]`` in place; returns the modules taken out."""
    originals = {}
    for layer_idx, student in students.items():
        path = adapter.attention_path(model, layer_idx)
        originals[layer_idx] = model.get_submodule(path)
        # Attention modules know their index (it names their slot in a generation cache).
        student.layer_idx = layer_idx
        _set_module(model, path, student)
    return originals


def restore_attention(model: nn.Module, adapter: ModelAdapter, originals: Mapping[int, nn.Module]) -> None:
    """Undo ``install_students`` with the modules it returned."""
    install_students(model, adapter, originals)


@contextmanager
def hybrid_view(model: nn.Module, adapter: ModelAdapter, students: Mapping[int, nn.Module],
                linear_layers: Iterable[int]) -> Iterator[nn.Module]:
    """Within the block, ``model`` runs with ``linear_layers`` replaced; afterwards it is the base again."""
    originals = install_students(model, adapter, {i: students[i] for i in linear_layers})
    try:
        yield model
    finally:
        restore_attention(model, adapter, originals)


def layer_types(num_layers: int, linear_layers: Iterable[int]) -> list[str]:
    """Per-layer "full_attention"/"linear_attention", as in the exported config."""
    linear = set(linear_layers)
    return [LINEAR_ATTENTION if i in linear else FULL_ATTENTION for i in range(num_layers)]
