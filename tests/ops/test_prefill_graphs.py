"""Short prompts' student calls replayed as CUDA graphs (``prefill_graphs.py``).

On the CPU: a call that stores into the stand-in ``FreshLayer`` and hands copies to a cache leaves that cache as
the call on the cache itself does (state, histories, token count), for every kind and option, so decoding continues
alike; and the rule that picks the graphs. The ``gpu`` tests replay real graphs in bf16 against eager calls.
"""

import gc

import pytest
import torch
from ops.test_prefill_kernels import STUDENT_OPTIONS, perturbed_student
from transformers import DynamicCache

from dtr_core.linear import backends, prefill_graphs
from dtr_core.linear.cache import state_layer
from dtr_core.linear.prefill_graphs import FreshLayer, starts_sequence

CAUSAL_OPTIONS = [options for options in STUDENT_OPTIONS if options.get("causal", True)]


def padded_inputs(batch=2, length=24, hidden=48, device="cpu", dtype=torch.float32):
    torch.manual_seed(1)
    x = torch.randn(batch, length, hidden, device=device, dtype=dtype)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    valid[1, :5] = False  # left padding
    return x, valid


@pytest.mark.parametrize("options", CAUSAL_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_a_call_stored_in_a_fresh_layer_hands_the_cache_what_the_cache_gets(options):
    student = perturbed_student(options)
    student.layer_idx = 0
    x, valid = padded_inputs()
    direct, handed = DynamicCache(), DynamicCache()
    with torch.no_grad():
        expected = student._attend(x, valid, state_layer(direct, 0), None)
        fresh = FreshLayer()
        out = student._attend(x, valid, fresh, None)
        assert starts_sequence(state_layer(handed, 0))
        fresh.hand_over(state_layer(handed, 0))
        assert not starts_sequence(state_layer(handed, 0))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        a, b = state_layer(direct, 0), state_layer(handed, 0)
        assert b.seen_tokens == a.seen_tokens == x.shape[1] and b.histories.keys() == a.histories.keys()
        torch.testing.assert_close(b.state, a.state, rtol=0, atol=0)
        for name in a.histories:
            torch.testing.assert_close(b.histories[name], a.histories[name], rtol=0, atol=0)
        # Copies, not the stand-in's own memory (a replay rewrites that): the next replay leaves the cache alone.
        assert b.state.data_ptr() != fresh.state.data_ptr()
        more = torch.randn(2, 3, 48)
        mask = torch.cat([valid, torch.ones(2, 3, dtype=torch.bool)], dim=1)
        torch.testing.assert_close(student(more, attention_mask=mask, cache=handed)[0],
                                   student(more, attention_mask=mask, cache=direct)[0], rtol=0, atol=0)


def test_a_graph_is_not_replayed_for_calls_that_would_run_other_kernels():
    student = perturbed_student(dict(kind="gla"))
    x, valid = padded_inputs()

    def key():
        return prefill_graphs.shape_key(student, x, valid, None, None)

    first = key()
    assert key() == first
    keys = set()
    student.prefill_kernels = "torch"
    keys.add(key())
    student.prefill_kernels, student.backend = "auto", "auto"
    keys.add(key())
    with torch.inference_mode():
        keys.add(key())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys.add(key())
    student.backend = "chunked"
    student.double()  # weights at new addresses: the old graph would read freed memory
    keys.add(key())
    assert first not in keys and len(keys) == 5
    assert prefill_graphs.shape_key(student, x[:, :-1], valid[:, :-1], None, None) != key()
    assert prefill_graphs.shape_key(student, x, None, None, None) != key()


def test_graphs_of_weights_that_moved_are_dropped():
    # A student moved away and back (bench.hybrid_setup.hybrid does it for every row; users offload) has its weights
    # at new addresses: its graphs can never replay, and must not keep their memory or their places.
    student = perturbed_student(dict(kind="gla"))
    x, valid = padded_inputs()
    graphs = prefill_graphs.PrefillGraphs()
    key = prefill_graphs.shape_key(student, x, valid, None, None)
    other_shape = prefill_graphs.shape_key(student, x[:, :-1], valid[:, :-1], None, None)
    moved = (*key[:-1], tuple(address + 1 for address in key[-1]))
    graphs.graphs = {other_shape: "kept: same weights", moved: "dropped: weights since moved"}
    with torch.no_grad():  # on the CPU the call runs eagerly: it only counts the shape
        expected = student._attend(x, valid, None, None)
        torch.testing.assert_close(graphs.call(student, x, valid, None, None), expected)
    assert graphs.graphs == {other_shape: "kept: same weights"} and key in graphs.seen


def test_graphs_serve_short_inference_calls_that_start_a_sequence_only():
    x = torch.zeros(1, 64, 8)
    assert not prefill_graphs.replays_as_graph(x, None, True)  # the CPU: never
    started = DynamicCache()
    layer = state_layer(started, 0)
    layer.advance(torch.zeros(1), 5)
    assert starts_sequence(None) and not starts_sequence(layer)


needs_cuda_and_fla = pytest.mark.skipif(not (torch.cuda.is_available() and backends.fla_available()),
                                        reason="needs CUDA and fla")


@pytest.mark.gpu
@needs_cuda_and_fla
@pytest.mark.parametrize("options", [dict(kind="gla"), dict(kind="gated_deltanet", window=16, short_conv=4),
                                     dict(kind="gla", window=64, rope=True, kv_heads=2)],
                         ids=["gla", "gated_deltanet-window-conv", "gla-window-rope-shared-kv"])
@pytest.mark.parametrize("with_cache", [False, True], ids=["no-cache", "cache"])
def test_replayed_calls_equal_eager_calls_in_bf16(options, with_cache):
    student = perturbed_student(options, hidden_size=256, num_heads=4, head_dim=64).cuda().to(torch.bfloat16)
    student.backend, student.layer_idx = "auto", 0  # fla's kernels, as in an exported hybrid
    graphs_before = len(prefill_graphs._STUDENT_GRAPHS)
    for call in range(4):  # eager, captured, replayed twice; new values every call
        x, valid = padded_inputs(batch=2, length=300, hidden=256, device="cuda", dtype=torch.bfloat16)
        x = x + call
        mask = valid.long()
        caches = (DynamicCache(), DynamicCache()) if with_cache else (None, None)
        with torch.no_grad():
            student.replay_prefill = False
            expected = student(x, attention_mask=mask, cache=caches[0])[0]
            student.replay_prefill = True
            out = student(x, attention_mask=mask, cache=caches[1])[0]
            torch.testing.assert_close(out, expected)
            if with_cache:  # decoding continues from what the replay handed over
                step = torch.randn(2, 1, 256, device="cuda", dtype=torch.bfloat16)
                step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                torch.testing.assert_close(student(step, attention_mask=step_mask, cache=caches[1])[0],
                                           student(step, attention_mask=step_mask, cache=caches[0])[0])
    assert len(prefill_graphs._STUDENT_GRAPHS) == graphs_before + 1
    assert len(prefill_graphs._STUDENT_GRAPHS[student].graphs) == 1


@pytest.mark.gpu
@needs_cuda_and_fla
def test_a_shape_is_captured_again_after_its_graphs_are_gone_or_its_weights_moved():
    # PyTorch refused (an internal assert, leaving the CUDA generator unusable) a capture into the memory pool of a
    # shape whose graphs had all been freed while a block from those captures was still held (H200, torch 2.11).
    x, valid = padded_inputs(batch=2, length=300, hidden=256, device="cuda", dtype=torch.bfloat16)
    for kind in ("gla", "gated_deltanet", "gla"):
        student = perturbed_student(dict(kind=kind), hidden_size=256, num_heads=4, head_dim=64).cuda().bfloat16()
        student.backend, student.layer_idx = "auto", 0
        with torch.no_grad():
            outputs = [student(x, attention_mask=valid.long())[0] for _ in range(3)]  # eager, captured, replayed
        torch.testing.assert_close(outputs[1], outputs[0])
        torch.testing.assert_close(outputs[2], outputs[0])
        assert len(prefill_graphs._STUDENT_GRAPHS[student].graphs) == 1
        student.cpu().cuda()  # weights at new addresses: the graph is dropped, and the shape captured anew
        with torch.no_grad():
            moved = [student(x, attention_mask=valid.long())[0] for _ in range(3)]
        torch.testing.assert_close(moved[2], outputs[0])
        assert len(prefill_graphs._STUDENT_GRAPHS[student].graphs) == 1
        del student
        gc.collect()
    torch.randint(3, 100, (2,), device="cuda")  # the generator still works
