"""tools/torture.py on a tiny model: SIGKILLs aimed at stages, concurrent runs on one cache, damaged
cache files. One run of the script (about a dozen command-line runs); each test reads its phase."""

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_model, synthetic_texts, write_jsonl

from dtr_core.io import sha256_file
from dtr_core.stage_cache import StageCache

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def torture(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("torture")
    model = save_tiny_model("llama", root / "model", num_layers=3)
    data = write_jsonl(root / "data.jsonl", synthetic_texts(300))
    tiny = ["--model", model, "--dataset", data, "--target-kind", "perplexity", "--token-budget", "3000",
            "--max-length", "32", "--batch-size", "16", "--run-to-end", "--tolerance", "0.5", "--no-card"]
    out = root / "out"
    script = subprocess.run([sys.executable, "tools/torture.py", "--out", str(out), "--kills", "3",
                             "--concurrent", "2,4", "--", *tiny], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert script.returncode in (0, 1), script.stderr[-3000:]  # 1: a check failed, which the tests name
    return json.loads((out / "results.json").read_text()), out


def exported(run_folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted((run_folder / "hybrid").iterdir())}


def test_runs_killed_inside_stages_resume_to_the_same_export(torture):
    results, out = torture
    kills = results["kills"]
    assert [k["aimed_at"] for k in kills["kills"]] == ["capture", "distill", "evaluate"]
    assert all(k["killed"] and k["returncode"] == -9 for k in kills["kills"]), kills["kills"]
    assert kills["final"] == {"returncode": 0, "same_export": True, "ok": True, "waits": 0}
    assert exported(out / "kills" / "final") == exported(out / "reference" / "run")


@pytest.mark.parametrize("count", [2, 4])
def test_concurrent_runs_compute_each_stage_once_and_export_the_same(torture, count):
    results, out = torture
    phase = results["concurrent"][str(count)]
    assert [r["returncode"] for r in phase["runs"]] == [0] * count, phase["runs"]
    reference = exported(out / "reference" / "run")
    assert all(exported(out / f"concurrent-{count}" / f"run-{i}") == reference for i in range(count))
    # The shared cache's journal: every result of the reference run, each stored once.
    journal = StageCache(out / f"concurrent-{count}" / "cache").journal()
    stored = collections.Counter((e["stage"], e["key"]) for e in journal)
    expected = {(e["stage"], e["key"]) for e in StageCache(out / "reference" / "cache").journal()}
    assert set(stored) == expected and set(stored.values()) == {1}


def test_damaged_cache_files_are_reported_and_computed_again(torture):
    results, out = torture
    rounds = {r["damage"]: r for r in results["damage"]["rounds"]}
    assert set(rounds) == {"truncate", "bit-flip", "edit"}
    for how, round_ in rounds.items():
        assert round_["run"]["returncode"] == 0 and round_["run"]["same_export"], (how, round_["run"])
        assert all(e["warned"] and e["recomputed"] for e in round_["damaged"]), (how, round_["damaged"])
    # Every kind of cache file met a damage: each stage's manifest, capture shards, student weights and
    # exported files (truncated and bit-flipped).
    damaged = {(r["damage"], Path(e["file"]).suffix if e["file"].endswith(".json") else e["stage"])
               for r in rounds.values() for e in r["damaged"]}
    assert {("truncate", "capture"), ("bit-flip", "distill"), ("truncate", "export"), ("edit", ".json")} <= damaged
    manifests = {e["stage"] for r in rounds.values() for e in r["damaged"] if e["file"].endswith(f"{e['key']}.json")}
    assert manifests == {"capture", "distill", "evaluate", "search", "test", "export"}
