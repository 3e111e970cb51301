"""Shared by the lm-eval tests: a tiny hybrid, local task YAML over jsonl, and scores by hand.

The hand computations run the in-memory model on one unpadded document at a time, without a
generation cache: what lm-eval must reproduce through its own batching, padding and caching.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from conftest import tiny_model

from dtr_core.adapters import adapter_for
from dtr_core.linear.build import student_from_teacher
from dtr_core.specs import StudentSpec

# Layer 0 keeps softmax attention; layers 1 and 2 get one student of each kind.
STUDENT_KINDS = {1: "gla", 2: "gated_deltanet"}
MAX_GEN_TOKS = 4
# Far above float32 noise: lm-eval's padded, cached decode may differ from a plain rerun in the
# last bits, which must not flip an argmax.
MIN_LOGIT_GAP = 1e-3

CHOICE_TASK = """\
task: dtr_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GENERATE_TASK = """\
task: dtr_local_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def tiny_hybrid():
    """A 3-layer tiny Llama with its students: (model, adapter, students)."""
    model = tiny_model("llama", num_layers=3)
    adapter = adapter_for(model)
    students = {
        i: student_from_teacher(StudentSpec(kind=kind, window=0), adapter.read_attention_weights(model, i),
                                causal=adapter.causal).eval()
        for i, kind in STUDENT_KINDS.items()
    }
    return model, adapter, students


def random_words(generator, low: int, high: int) -> str:
    count = int(torch.randint(low, high + 1, (1,), generator=generator))
    return " ".join(f"w{int(i)}" for i in torch.randint(4, 100, (count,), generator=generator))


def choice_log_likelihood(model, context_ids: list[int], choice_ids: list[int]) -> float:
    """Sum of log p(choice token | everything before it), the quantity lm-eval ranks choices by."""
    ids = torch.tensor([context_ids + choice_ids])
    log_probs = F.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)[0, -len(choice_ids):]
    return log_probs.gather(-1, torch.tensor(choice_ids)[:, None]).sum().item()


def greedy_continuation(model, tokenizer, context_ids: list[int],
                        max_new_tokens: int = MAX_GEN_TOKS) -> tuple[str, float]:
    """Argmax decoding without any cache (every step reruns the whole sequence).

    Returns the decoded text and the smallest gap between the top two logits over the steps.
    """
    ids = list(context_ids)
    generated, smallest_gap = [], float("inf")
    for _ in range(max_new_tokens):
        top = model(torch.tensor([ids])).logits[0, -1].topk(2)
        smallest_gap = min(smallest_gap, float(top.values[0] - top.values[1]))
        next_id = int(top.indices[0])
        if next_id == tokenizer.eos_token_id:
            break
        ids.append(next_id)
        generated.append(next_id)
    return tokenizer.decode(generated, skip_special_tokens=True), smallest_gap


def write_jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def with_cache_dir(task_yaml: str, cache_dir) -> str:
    """``task_yaml`` loading its data with ``datasets``' cache in ``cache_dir`` (not the user's)."""
    return task_yaml.replace("dataset_kwargs:\n", f"dataset_kwargs:\n  cache_dir: {cache_dir}\n", 1)
