"""The GPU benchmarks of issue 5 (bench/attention.py, bench/hybrid_inference.py, bench/dtr_pass.py) run end to end in their
CPU smoke mode and write the tables BENCHMARKS.md takes; only the tables' shape is checked (CPU
timings of tiny models mean nothing)."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import run_in_triton_interpreter

from bench import attention, dtr_pass, hybrid_inference, hybrid_setup, hybrid_timing, student_cost, student_prefill


@pytest.fixture(autouse=True)
def keep_thread_count():
    """Smoke mode drops torch to one thread; give the rest of the session its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def table_lines(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def test_attention_smoke_has_a_row_per_length_and_pass(tmp_path):
    out = tmp_path / "attention.md"
    attention.main(["--smoke", "--lengths", "64", "128", "--out", str(out)])

    data = json.loads(out.with_suffix(".json").read_text())
    assert [(row["tokens"], row["pass"]) for row in data["rows"]] == [
        (64, "fwd"), (64, "fwd+bwd"), (128, "fwd"), (128, "fwd+bwd")]
    assert all(set(row["ms"]) == {"sdpa", "gla", "gated_deltanet"} for row in data["rows"])
    assert {(c["student"], c["pass"]) for c in data["crossovers"]} == {
        (kind, pass_name) for kind in ("gla", "gated_deltanet") for pass_name in ("fwd", "fwd+bwd")}
    table = table_lines(out.read_text())
    assert table[0] == ("| tokens | pass | sdpa ms | gla ms | gla speedup vs sdpa | gated_deltanet ms "
                        "| gated_deltanet speedup vs sdpa |")
    assert len(table) == 2 + 4


def test_crossover_is_where_the_student_stays_faster():
    # Student/teacher time ratio 4 at 1K and 1/4 at 4K: log-log midpoint 2K.
    found = attention.crossover([(1024, 1.0, 4.0), (4096, 4.0, 1.0), (8192, 8.0, 1.0)])
    assert (found["slower_at"], found["from"]) == (1024, 4096)
    assert found["estimate"] == pytest.approx(2048)
    assert attention.crossover([(1024, 2.0, 1.0), (2048, 1.0, 2.0), (4096, 4.0, 1.0)])["from"] == 4096
    assert attention.crossover([(1024, 1.0, 2.0)])["from"] is None


def test_hybrid_inference_smoke_has_a_row_per_model_phase_and_k(tmp_path):
    out = tmp_path / "hybrid.md"
    hybrid_inference.main(["--smoke", "--model", "both", "--lengths", "16", "--contexts", "16", "--out", str(out)])

    data = json.loads(out.with_suffix(".json").read_text())
    assert [model["meta"]["model"] for model in data["models"]] == ["llama-1b", "qwen-1.5b"]
    counts = [0, 1, 2, 3, 4]  # smoke models have 4 layers
    for model in data["models"]:
        rows = model["rows"]
        assert sorted((row["phase"], row["k"]) for row in rows) == sorted(
            (phase, k) for phase in ("prefill", "decode") for k in counts)
        assert all("ms" in row and "speedup" in row and "ceiling" in row for row in rows)
        decode = [row for row in rows if row["phase"] == "decode"]
        assert all(row["max_batch"] == 8 and row["max_batch_capped"] for row in decode)  # the CPU never runs out
        assert all(1 <= row["best_batch"] <= row["max_batch"] and row["tokens_per_s_best_batch"] > 0 for row in decode)
        assert all(row["speedup_largest_batch"] > 0 for row in decode)
        assert all("attention_ms_for_ceiling" in row for row in rows if 0 < row["k"] < 4)
    markdown = out.read_text()
    headers = [line for line in table_lines(markdown) if line.startswith("| tokens") or line.startswith("| context")]
    assert len(headers) == 4  # prefill and decode, per model
    assert "| largest batch | tokens/s at largest | speedup at largest | fastest batch (b) | tokens/s (b) | speedup (b) |" in headers[1]
    assert len([line for line in table_lines(markdown) if line.startswith("| 16 |")]) == 2 * 2 * len(counts)


def test_render_rebuilds_the_tables_from_saved_results(tmp_path):
    measured = tmp_path / "hybrid.md"
    hybrid_inference.main(["--smoke", "--model", "llama-1b", "--lengths", "16", "--contexts", "16",
                           "--out", str(measured)])
    saved = json.loads(measured.with_suffix(".json").read_text())
    for row in saved["models"][0]["rows"]:  # derived values are recomputed, not read back
        for key in hybrid_timing.DERIVED:
            row.pop(key, None)
    stripped = tmp_path / "saved.json"
    stripped.write_text(json.dumps(saved))
    rendered = tmp_path / "rendered.md"
    hybrid_inference.main(["--render", str(stripped), "--out", str(rendered)])
    assert rendered.read_text() == measured.read_text()


def test_linear_layers_are_spread_evenly_and_targets_run_first():
    assert hybrid_setup.linear_layer_counts(28) == [0, 7, 14, 21, 28]
    assert hybrid_setup.linear_layers(16, 8) == list(range(1, 16, 2))
    assert hybrid_setup.linear_layers(16, 4) == [3, 7, 11, 15]
    assert hybrid_setup.linear_layers(16, 0) == [] and hybrid_setup.linear_layers(16, 16) == list(range(16))
    plan = hybrid_timing.plan((2048, 32768), (8192, 65536), [0, 4, 8, 12, 16], first=8)
    assert plan[:4] == [("decode", 65536, 0), ("decode", 65536, 8), ("prefill", 32768, 0), ("prefill", 32768, 8)]
    assert len(plan) == 4 * 5


def test_dtr_pass_smoke_measures_and_projects(tmp_path):
    out = tmp_path / "dtr_pass.md"
    dtr_pass.main(["--smoke", "--out", str(out)])

    data = json.loads(out.with_suffix(".json").read_text())
    assert data["tokens_per_second"]["gla"] > 0 and data["eval_examples_per_second"] > 0
    with_reuse, without = data["trajectory_layer_forwards"]
    assert with_reuse < without  # the smoke model has 4 layers: 10 candidates + the full model
    hours = data["projected_hours"]
    assert hours["search_with_reuse"] == pytest.approx(hours["search"] * with_reuse / without)
    assert len(table_lines(out.read_text())) == 2 + 6


def test_dtr_pass_times_each_kind_of_student_on_its_own_pass(tmp_path):
    out = tmp_path / "kinds.md"
    dtr_pass.main(["--smoke", "--student", "gla,gated_deltanet", "--window", "8", "--distill-only", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["tokens_per_second"].keys() == {"gla", "gated_deltanet"} and min(data["tokens_per_second"].values()) > 0
    rows = table_lines(out.read_text())[2:]
    assert len(rows) == 2 and all("window 8, trained on chunked" in row for row in rows)  # CPU: the PyTorch form


def test_student_cost_times_every_kind_with_and_without_a_window(tmp_path):
    out = tmp_path / "student_cost.md"
    student_cost.main(["--smoke", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [row["row"] for row in rows] == ["teacher attention, forward only", "gla, chunked", "gla, window 8, chunked",
                                            "gated_deltanet, chunked", "gated_deltanet, window 8, chunked"]
    assert all(row["ms"] > 0 for row in rows)  # on the CPU every kind trains on the chunked form


def test_student_prefill_times_each_kind_fused_and_unfused(tmp_path):
    out = tmp_path / "student_prefill.md"
    student_prefill.main(["--smoke", "--kinds", "gla", "gated_deltanet", "--batches", "1", "2", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(row["batch"], row["tokens"]) for row in rows] == [(1, 64), (2, 64)]
    for row in rows:
        for kind in ("gla", "gated_deltanet"):
            assert all(row["ms"][name] > 0 for name in (kind, f"{kind} unfused", f"{kind} host", f"{kind} scan",
                                                        f"{kind} operator"))
            assert row["ms"][f"{kind} graph"] is None  # no CUDA graphs on the CPU
    assert "| 2 | 64 |" in out.read_text()


GLA_SCAN_SMOKE = """
import json, sys
from bench import gla_scan
gla_scan.main(["--smoke", "--shapes", "llama-1b", "--batches", "1", "2", "--profile", "3", "--out", sys.argv[1]])
rows = json.load(open(sys.argv[1][:-3] + ".json"))["rows"]
assert [(row["batch"], row["tokens"]) for row in rows] == [(1, 100), (2, 100)]
assert all(row["output difference"] < 1e-5 and row["normaliser difference"] < 1e-5 for row in rows)
assert all(row["gates output difference"] < 1e-5 for row in rows)  # the log-decays the scan takes from the gates
assert all(set(row["ms"]) == {"fla with column", "fla without column", "ours", "ours from gates"} for row in rows)
print("gla scan smoke ok")
"""


@pytest.mark.integration
def test_gla_scan_smoke_compares_the_scans_in_the_interpreter(tmp_path):
    # Off CUDA "fla" is the chunked PyTorch form, and our kernels run in Triton's interpreter.
    run_in_triton_interpreter(GLA_SCAN_SMOKE.replace("sys.argv[1]", repr(str(tmp_path / "gla_scan.md"))),
                              "gla scan smoke ok")


def test_hybrid_inference_prefills_a_batch(tmp_path):
    out = tmp_path / "hybrid.md"
    hybrid_inference.main(["--smoke", "--model", "llama-1b", "--lengths", "16", "--contexts", "--linear-counts", "0", "2",
                           "--prefill-batch", "3", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["models"][0]["rows"]
    assert [(row["k"], row["batch"]) for row in rows] == [(0, 3), (2, 3)]
    assert all(row["tokens_per_s"] == pytest.approx(3 * 16 / row["ms"] * 1e3) for row in rows)
    assert "Prefill, batch 3" in out.read_text()


@pytest.mark.parametrize("cache", hybrid_setup.CACHE_KINDS)
def test_hybrid_inference_runs_a_real_model_folder_with_chosen_linear_layers(cache, tmp_path):
    # Benchmark 4's form: a model dtr_core loads (here a tiny saved llama) and the layers a search found.
    from conftest import save_tiny_model

    save_tiny_model("llama", tmp_path / "model", num_layers=4)
    out = tmp_path / "hybrid.md"
    hybrid_inference.main(["--model", str(tmp_path / "model"), "--device", "cpu", "--lengths", "16",
                           "--contexts", "16", "--decode-steps", "1", "--max-batch", "2", "--linear-counts", "1",
                           "--linear-layers", "3", "0", "2", "--cache", cache, "--out", str(out)])

    (model,) = json.loads(out.with_suffix(".json").read_text())["models"]
    assert sorted({row["k"] for row in model["rows"]}) == [0, 1, 3]
    assert {row["phase"] for row in model["rows"]} == {"prefill", "decode"}
    assert all("ms" in row for row in model["rows"])
    assert model["meta"]["linear_layers"] == {"0": [], "1": [3], "3": [0, 2, 3]}
    assert model["meta"]["cache"].startswith(hybrid_setup.CACHE_DESCRIPTIONS[cache])
    assert "(real weights)" in out.read_text()


def test_hybrid_inference_refuses_layers_the_model_lacks(tmp_path):
    from conftest import save_tiny_model

    save_tiny_model("llama", tmp_path / "model", num_layers=4)
    with pytest.raises(SystemExit, match="has layers 0-3"):
        hybrid_inference.main(["--model", str(tmp_path / "model"), "--device", "cpu", "--lengths", "16",
                               "--contexts", "--linear-layers", "4"])


def test_decode_batches_smoke_has_a_row_per_batch(capsys):
    from bench import decode_batches

    decode_batches.main(["--smoke", "--linear", "2", "--student", "gated_deltanet", "--window", "4"])
    out = capsys.readouterr().out
    rows = [line for line in table_lines(out) if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and all("—" not in row.split("|")[2] for row in rows)  # each batch timed
    assert "2 linear layers (gated_deltanet, window 4, shared K/V heads)" in out


def test_decode_batches_profile_breaks_step_time_down_by_kernel(capsys):
    from bench import decode_batches

    decode_batches.main(["--smoke", "--linear", "2", "--profile", "2"])
    out = capsys.readouterr().out
    summaries = [line for line in out.splitlines() if line.startswith("batch ") and "device busy" in line]
    assert [line.split(":")[0] for line in summaries] == ["batch 1", "batch 2"]
    assert "aten::" in out  # on the CPU the profiled "kernels" are aten operators


def test_prefill_alternating_times_both_models_in_every_round(tmp_path):
    from bench import prefill_alternating

    out = tmp_path / "alternating.md"
    prefill_alternating.main(["--smoke", "--model", "llama-1b", "--student", "gla", "gated_deltanet", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [row["student"] for row in rows] == ["gla (shared K/V heads)", "gated_deltanet (shared K/V heads)"]
    for row in rows:
        assert len(row["full_ms_all"]) == len(row["hybrid_ms_all"]) == 2  # the smoke run's rounds
        assert (row["linear"], row["layers"]) == (2, 4)
        assert row["speedup_min"] <= row["speedup"] <= row["speedup_max"]
    assert len(table_lines(out.read_text())) == 2 + 2


def test_kernel_kinds_follow_the_kernel_names():
    from bench.decode_batches import kernel_kind

    assert kernel_kind("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert kernel_kind("fmha_cutlassF_bf16_aligned_64x128_rf_sm80") == "attention"
    assert kernel_kind("fused_recurrent_gla_fwd_kernel") == "linear attention"
    assert kernel_kind("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT") == "matmul"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<c10::BFloat16>>") == "other"


def test_warm_up_runs_until_step_time_is_steady(monkeypatch):
    from bench import common

    # A clock that each call advances by its duration: real sleeps overshoot on a busy machine.
    clock = [0.0]
    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def taking(durations):
        durations = iter(durations)
        return lambda: clock.__setitem__(0, clock[0] + next(durations))

    noisy_then_steady = [0.03, 0.01, 0.03, 0.01] + [0.005] * 100
    assert common.warm_until_steady(taking(noisy_then_steady), "cpu", window=1, tolerance=0.3) == 6
    always_changing = [0.001 * 2**i for i in range(40)]
    assert common.warm_until_steady(taking(always_changing), "cpu", window=1, max_windows=5) == 5


def test_exported_generate_smoke_times_generate_beside_generate_static(tmp_path):
    from bench import exported_generate

    out = tmp_path / "exported_generate.md"
    exported_generate.main(["--smoke", "--model", "qwen-1.5b", "--eager", "--out", str(out)])

    (model,) = json.loads(out.with_suffix(".json").read_text())["models"]
    rows = model["rows"]
    assert [row["k"] for row in rows] == [0, 1, 2, 3]  # the smoke model's 4 layers: 0, L/4, L/2, 3L/4 linear
    assert model["meta"]["linear_layers"] == {"0": [], "1": [3], "2": [1, 3], "3": [1, 2, 3]}
    # fp32 on the CPU: generate() took the static steps and chose what generate_static chose.
    assert all(row["fallbacks"] == [] and row["same_tokens"] == 1.0 for row in rows)
    assert all(row[f"{call}_tokens_per_s"] > 0 for row in rows for call in exported_generate.CALLS)
    table = table_lines(out.read_text())
    assert table[0].startswith("| linear | export + load s | prompt s | generate tokens/s | generate decode tokens/s |")
    assert len(table) == 2 + 4


def test_exported_generate_times_a_real_model_folder_with_the_found_layers(tmp_path):
    # Benchmark 5's "found hybrid": a model dtr_core loads with its weights (here a tiny saved llama) and the
    # layers a search chose, beside the full model.
    from conftest import save_tiny_model

    from bench import exported_generate

    save_tiny_model("llama", tmp_path / "model", num_layers=4)
    out = tmp_path / "exported_generate.md"
    exported_generate.main(["--model", str(tmp_path / "model"), "--device", "cpu", "--batch", "2", "--lengths", "6",
                            "12", "--new-tokens", "3", "--linear-counts", "0", "--linear-layers", "3", "1",
                            "--out", str(out)])

    (model,) = json.loads(out.with_suffix(".json").read_text())["models"]
    assert [row["k"] for row in model["rows"]] == [0, 2]
    assert model["meta"]["linear_layers"] == {"0": [], "2": [1, 3]}
    assert all(row["same_tokens"] == 1.0 and row["generate_tokens_per_s"] > 0 for row in model["rows"])
    assert "(real weights)" in out.read_text()
