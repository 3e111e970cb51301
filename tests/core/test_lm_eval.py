"""An exported hybrid runs in lm-evaluation-harness (``--model hf``, ``trust_remote_code=True``).

lm-eval runs in a subprocess through its command line, exactly as the README documents it, with
the hub switched off: two local tasks (task YAML over jsonl files), one scored by multiple-choice
log-likelihood and one by greedy generation, each in one padded batch. Its per-document answers and
its reported metrics must equal what the in-memory hybrid gives when scored by hand, one unpadded
document at a time. Generation goes through ``generate()`` with a cache, so it also checks the
students' recurrent-state caching against a cache-free decode.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_tokenizer
from lm_eval_helpers import (
    CHOICE_TASK,
    GENERATE_TASK,
    MAX_GEN_TOKS,
    MIN_LOGIT_GAP,
    STUDENT_KINDS,
    choice_log_likelihood,
    greedy_continuation,
    random_words,
    tiny_hybrid,
    write_jsonl,
)

from dtr_core.export import export_hybrid
from dtr_core.hybrid import hybrid_view
from dtr_core.specs import ExportSpec

NUM_DOCS = 8


def read_samples(out_dir, task: str) -> list[dict]:
    (path,) = out_dir.glob(f"samples_{task}_*.jsonl")
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(samples, key=lambda sample: sample["doc_id"])


@pytest.mark.integration
def test_lm_eval_runs_local_tasks_on_exported_hybrid(tmp_path):
    model, adapter, students = tiny_hybrid()
    tokenizer = tiny_tokenizer()
    folder = tmp_path / "hybrid"
    export_hybrid(model, adapter, tokenizer, students, folder, ExportSpec())

    generator = torch.Generator().manual_seed(42)
    choice_docs, generate_docs = [], []
    expected_log_likelihoods, expected_generations = [], []
    with torch.no_grad(), hybrid_view(model, adapter, students, STUDENT_KINDS):
        for i in range(NUM_DOCS):
            context = random_words(generator, 3, 8)
            choices = [random_words(generator, 1, 3) for _ in range(3)]
            context_ids = tokenizer.encode(context)
            scores = [choice_log_likelihood(model, context_ids, tokenizer.encode(c)) for c in choices]
            predicted = max(range(len(choices)), key=scores.__getitem__)
            # Half the answers are the hybrid's pick and half are not, so the expected accuracy is
            # exactly 0.5 and lm-eval reaches it only by ranking every document as the hybrid does.
            answer = predicted if i % 2 == 0 else (predicted + 1) % len(choices)
            choice_docs.append({"context": context, "choices": choices, "answer": answer})
            expected_log_likelihoods.append(scores)

            # lm-eval decodes with a cache, through other kernels than this full rerun: skip contexts
            # whose greedy path nearly ties, where float noise alone could pick another token.
            gap = 0.0
            while gap < MIN_LOGIT_GAP:
                context = random_words(generator, 3, 8)
                generation, gap = greedy_continuation(model, tokenizer, tokenizer.encode(context))
            target = generation if i % 2 == 0 else f"{generation} w4"
            generate_docs.append({"context": context, "target": target})
            expected_generations.append(generation)

    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    write_jsonl(task_dir / "choice.jsonl", choice_docs)
    write_jsonl(task_dir / "generate.jsonl", generate_docs)
    (task_dir / "choice.yaml").write_text(CHOICE_TASK.format(data=task_dir / "choice.jsonl"))
    (task_dir / "generate.yaml").write_text(
        GENERATE_TASK.format(data=task_dir / "generate.jsonl", max_gen_toks=MAX_GEN_TOKS))

    out_dir = tmp_path / "results"
    # Offline, with a fresh HF_HOME: nothing may come from (or be cached from) a hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
         "--tasks", "dtr_local_choice,dtr_local_generate", "--include_path", str(task_dir),
         "--device", "cpu", "--batch_size", str(NUM_DOCS), "--output_path", str(out_dir / "results.json"),
         "--log_samples"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    (results_file,) = out_dir.glob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    choice_samples = read_samples(out_dir, "dtr_local_choice")
    assert [sample["doc"] for sample in choice_samples] == choice_docs
    reported = [[float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]] for sample in choice_samples]
    assert torch.allclose(torch.tensor(reported), torch.tensor(expected_log_likelihoods), atol=1e-4)
    assert results["dtr_local_choice"]["acc,none"] == 0.5

    generate_samples = read_samples(out_dir, "dtr_local_generate")
    assert [sample["filtered_resps"][0] for sample in generate_samples] == expected_generations
    assert results["dtr_local_generate"]["exact_match,none"] == 0.5
