"""Static decoding on CUDA: the Triton decode kernels agree with PyTorch in bf16 (relative error <= 1e-2),
with and without left padding, and a CUDA-graph-replayed hybrid decodes like eager cached decoding, equal
and left-padded prompts alike; an exported hybrid's generate() takes those steps by itself. Skipped
without CUDA and fla."""

import pytest
import torch
from conftest import rel_err
from test_gpu_hybrid import export_gpu_sized_hybrid, load
from test_static_decoding import greedy_steps, prefill
from test_static_generation import static_steps

from dtr_core.adapters import adapter_for
from dtr_core.hybrid import hybrid_view
from dtr_core.linear import backends
from dtr_core.linear.build import student_from_teacher
from dtr_core.linear.decoding import StaticDecoder, decode_attention, prompt_positions
from dtr_core.linear.gated_deltanet import gated_delta_step_
from dtr_core.linear.gla import gla_step_
from dtr_core.specs import StudentSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and backends.fla_available()), reason="needs CUDA and fla"),
]


@pytest.mark.parametrize("heads,kv_heads,dim", [(12, 2, 128), (32, 8, 64)])  # Qwen2.5-1.5B, Llama-3.2-1B
def test_triton_decode_attention_matches_torch_in_bf16(heads, kv_heads, dim):
    torch.manual_seed(0)
    query = torch.randn(3, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    keys, values = (torch.randn(3, kv_heads, 5000, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for length in (1, 777, 4999, 5000):
        n = torch.tensor([length], device="cuda")
        expected = decode_attention(query, keys, values, n, backend="torch")
        for splits in (None, 1, 7):
            got = decode_attention(query, keys, values, n, backend="triton", num_splits=splits)
            assert rel_err(got, expected) <= 1e-2, (length, splits)
    # Left padding: each sequence attends from its own start (one start past several splits' keys).
    n, start = torch.tensor([5000], device="cuda"), torch.tensor([0, 130, 4321], device="cuda")
    expected = decode_attention(query, keys, values, n, backend="torch", start=start)
    for splits in (None, 1, 7):
        got = decode_attention(query, keys, values, n, backend="triton", num_splits=splits, start=start)
        assert rel_err(got, expected) <= 1e-2, splits


def test_triton_gla_step_matches_torch():
    torch.manual_seed(0)
    # hedgehog GLA at Qwen2.5-1.5B shape: K = 2 x 128 features, V = 128 values + the normaliser column
    q, k = (torch.randn(5, 1, 12, 256, device="cuda").softmax(-1).bfloat16() for _ in range(2))
    v = torch.randn(5, 1, 12, 129, device="cuda", dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(5, 1, 12, 256, device="cuda")).bfloat16()
    initial = torch.randn(5, 12, 256, 129, device="cuda")
    expected_state = initial.clone()
    expected = gla_step_(q, k, v, g, 1.0, expected_state, backend="torch")
    state = initial.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert backends.resolve_step_backend("auto", q, state) == "triton"
    got = gla_step_(q, k, v, g, 1.0, state)
    assert rel_err(got, expected) <= 1e-2 and rel_err(state, expected_state) <= 1e-4


def test_triton_gated_delta_step_matches_torch():
    torch.manual_seed(0)
    # Gated DeltaNet at Qwen2.5-1.5B shape: unit keys of 128, values of 128
    q, k = (torch.nn.functional.normalize(torch.randn(5, 1, 12, 128, device="cuda"), dim=-1).bfloat16()
            for _ in range(2))
    v = torch.randn(5, 1, 12, 128, device="cuda", dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(5, 1, 12, device="cuda")).bfloat16()
    beta = torch.rand(5, 1, 12, device="cuda").bfloat16()
    initial = torch.randn(5, 12, 128, 128, device="cuda")
    expected_state = initial.clone()
    expected = gated_delta_step_(q, k, v, g, beta, 1.0, expected_state, backend="torch")
    state = initial.transpose(-1, -2).contiguous().transpose(-1, -2)
    got = gated_delta_step_(q, k, v, g, beta, 1.0, state)
    assert rel_err(got, expected) <= 1e-2 and rel_err(state, expected_state) <= 1e-4


@pytest.mark.parametrize("window", [0, 16], ids=["plain", "window"])  # window 16: the fused window kernels
@pytest.mark.parametrize("padded", [False, True], ids=["equal", "left-padded"])
@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_graph_replayed_hybrid_decodes_like_eager_decoding(kind, padded, window):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(42)
    config = LlamaConfig(vocab_size=100, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).cuda().bfloat16().eval()
    adapter = adapter_for(model)
    students = {i: student_from_teacher(StudentSpec(kind=kind, window=window), adapter.read_attention_weights(model, i),
                                        causal=True, seed=i).cuda().bfloat16().eval() for i in (0, 2)}
    prompt = torch.randint(3, 100, (4, 300), device="cuda")
    mask = None
    if padded:  # 300, 299, 170 and 1 tokens, left-padded
        mask = (torch.arange(300, device="cuda") >= torch.tensor([0, 1, 130, 299], device="cuda")[:, None]).long()
    steps = 8
    fed = torch.randint(3, 100, (4, steps), device="cuda")  # the same tokens for both: bf16 argmaxes may differ
    with hybrid_view(model, adapter, students, (0, 2)):
        cache, first = prefill(model, prompt, prompt.shape[1] + steps + 16, mask)
        expected = greedy_steps(model, cache, first, steps, fed=fed, attention_mask=mask)
        cache, first = prefill(model, prompt, prompt.shape[1] + steps + 16, mask)
        decoder = StaticDecoder(model, cache, max_steps=steps, attention_mask=mask)
        got = greedy_steps(model, cache, first, steps, decoder, fed=fed)
        assert decoder.graph and decoder._captured is not None  # steps 2.. were graph replays
        decoder.close()
    for step in range(steps):
        assert rel_err(got[:, step], expected[:, step]) <= 1e-2, step
    assert cache.get_seq_length() == prompt.shape[1] + steps


def test_exported_hybrid_generate_static_on_cuda(tmp_path):
    folder = export_gpu_sized_hybrid("gla", tmp_path / "hybrid")
    model = load(folder, torch.bfloat16)
    prompts = torch.randint(3, 100, (2, 200), device="cuda")
    out = model.generate_static(prompts, 12, eos_token_id=None)
    assert out.shape == (2, 212) and torch.equal(out[:, :200], prompts)
    # Each new token is the argmax of the logits a plain forward over the whole sequence gives, up to bf16
    # rounding (graph-replayed Triton kernels and the eager path round differently).
    with torch.no_grad():
        logits = model(out).logits[:, 199:-1].float()
    chosen = logits.gather(-1, out[:, 200:, None])[..., 0]
    assert (logits.max(-1).values - chosen <= 0.02 * logits.abs().max()).all()


def test_exported_hybrid_generate_replays_graphs_for_padded_batches(tmp_path, monkeypatch):
    model = load(export_gpu_sized_hybrid("gla", tmp_path / "hybrid"), torch.bfloat16)
    steps = static_steps(model, monkeypatch)
    prompts = torch.randint(3, 100, (3, 200), device="cuda")
    mask = (torch.arange(200, device="cuda") >= torch.tensor([0, 57, 190], device="cuda")[:, None]).long()
    out = model.generate(prompts, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert out.shape == (3, 212) and torch.equal(out[:, :200], prompts)
    # The first new token comes from the prompt's forward; the first step is captured, the others replay it.
    assert len(steps) == 11 and steps[0].graph
    # transformers' loop (eager steps through SDPA) picks the same first token: the prompt runs the same way.
    eager = model.generate(prompts, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0, static_decoding=False)
    assert torch.equal(eager[:, 200], out[:, 200])
    # Each new token is the argmax of the logits a plain forward over the whole padded sequence gives, up to
    # bf16 rounding.
    full_mask = torch.cat([mask, torch.ones_like(out[:, 200:])], dim=1)
    with torch.no_grad():
        logits = model(out, attention_mask=full_mask, position_ids=prompt_positions(full_mask)).logits
    logits = logits[:, 199:-1].float()
    chosen = logits.gather(-1, out[:, 200:, None])[..., 0]
    assert (logits.max(-1).values - chosen <= 0.02 * logits.abs().max()).all()
