"""Build a student for one teacher layer, starting from the teacher's projections."""

from __future__ import annotations

import torch

from ..adapters import AttentionWeights
from ..specs import StudentSpec
from .base import LinearAttentionStudent
from .students import build_student


def student_from_teacher(spec: StudentSpec, weights: AttentionWeights, causal: bool, seed: int = 42,
                         backend: str = "auto") -> LinearAttentionStudent:
    """A student whose q/k/v/o projections are copies of the teacher's: a GQA teacher's K/V heads shared by the same
    groups of query heads (``spec.shared_kv``), or repeated into one K/V projection per query head.

    A sliding-window student also takes the teacher's rotary frequencies. The student's own extra
    parameters (feature maps, gates, beta, output norm, convolutions) keep the
    initial values documented in ``base.py`` and the mechanism files; the one random one (GLA's gate
    down-projection) is drawn from ``seed``, so a layer's student is the same in every process.
    """
    if not spec.shared_kv:
        weights = weights.with_expanded_kv()
    window = spec.window_for(causal)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = build_student(
            dict(
                kind=spec.kind,
                hidden_size=weights.hidden_size,
                num_heads=weights.num_heads,
                head_dim=weights.head_dim,
                causal=causal,
                feature_map=spec.feature_map,
                gate_rank=spec.gate_rank,
                chunk_size=spec.chunk_size,
                qkv_bias=weights.q_bias is not None,
                output_proj=weights.o_weight is not None,
                o_bias=weights.o_bias is not None,
                window=window,
                rope=window > 0 and weights.rotary_inv_freq is not None,
                rope_scaling=weights.rotary_scaling,
                short_conv=spec.short_conv,
                kv_heads=weights.num_kv_heads,
            ),
            backend=backend,
        )
    copies = {
        student.q_proj: (weights.q_weight, weights.q_bias),
        student.k_proj: (weights.k_weight, weights.k_bias),
        student.v_proj: (weights.v_weight, weights.v_bias),
    }
    if student.o_proj is not None:
        copies[student.o_proj] = (weights.o_weight, weights.o_bias)
    with torch.no_grad():
        if student.rope:
            student.rotary_inv_freq.copy_(weights.rotary_inv_freq)
        for linear, (weight, bias) in copies.items():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
    return student
