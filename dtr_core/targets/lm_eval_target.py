"""lm-evaluation-harness tasks as search targets (``TargetSpec(kind="lm_eval")``).

``LmEvalTask`` loads one task, once, from the local task YAML under ``lm_eval_include_path`` (only
that folder is indexed, not lm-eval's built-in tasks; its data should be local files so nothing is
fetched). ``LmEvalEvaluator`` scores a candidate hybrid in process: the students are swapped into
the in-memory model (``hybrid_view``) and lm-eval's own ``evaluate`` runs the task's requests
(log-likelihood, multiple choice, rolling log-likelihood or ``generate_until``) through its
``HFLM`` wrapper around that very model, built once per evaluator. Nothing is exported or written
per candidate: no result files, no request cache (loading the task's dataset once
does use ``datasets``' usual cache, or the ``cache_dir`` the YAML's ``dataset_kwargs`` name).

Metric: the task's first metric (the first entry of its ``metric_list``; without one, the first of
lm-eval's defaults for its output type), aggregated as the task says, under the task's first
filter (``"none"`` for tasks without filters). Its direction is the task's ``higher_is_better``.
When the metric is aggregated as a mean (accuracy, exact match, ...), the evaluator also gives
each document's value, for the bootstrap acceptance rule (``dtr_core/acceptance.py``); a
corpus-level metric (perplexity, BLEU, F1 over the corpus) has none, and the search judges it by
its score.

Splits: the task's evaluation documents (its test split, else its validation split) are indexed
0..n-1 and shuffled with ``seed``; the first share, in the ratio
``validation_fraction : test_fraction``, is the validation split and the rest the test split (each
at least one document), each then capped at ``max_eval_examples`` and kept in document order. The
same seed gives the same splits on every machine; the two never overlap.

Few-shot examples are drawn with ``seed`` before every evaluation, and python's, numpy's and
torch's generators are seeded for it (and restored afterwards), so a candidate scores the same
every time it is evaluated.

lm-eval is an optional extra: ``pip install 'dtr[eval]'``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..acceptance import ExampleScores
from ..adapters import ModelAdapter
from ..direction import Direction
from ..hybrid import hybrid_view
from ..specs import TargetSpec

INSTALL_HINT = "kind=lm_eval needs lm-evaluation-harness: pip install 'dtr[eval]'"


class LmEvalError(ValueError):
    """An lm-eval target that cannot be used; the message says what is wrong and what to do."""


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.api.metrics  # noqa: F401  (the submodules used below)
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return lm_eval


@contextmanager
def _lm_eval_logging(level: int) -> Iterator[None]:
    """lm-eval's loggers say nothing below ``level`` inside the block (none lower than configured)."""
    logger = logging.getLogger("lm_eval")
    previous = logger.level
    if logger.getEffectiveLevel() < level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def _no_request_progress_bar() -> Iterator[None]:
    """Building a task's requests shows a progress bar that no argument turns off: off for the block."""
    import functools

    import lm_eval.api.task as task_module

    original = task_module.tqdm
    task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original


@contextmanager
def _no_datasets_progress_bar() -> Iterator[None]:
    try:
        from datasets.utils import logging as datasets_logging
    except ImportError:  # lm-eval depends on datasets; nothing to silence without it
        yield
        return
    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """python, numpy and torch generators seeded with ``seed`` inside the block, restored after it."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _stable(value: Any) -> Any:
    """JSON stand-in for what a task config or document may hold beyond JSON (functions, objects)."""
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


def split_indices(num_docs: int, validation_fraction: float, test_fraction: float, seed: int,
                  max_eval_examples: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Disjoint (validation, test) document indices, each sorted: see the module docstring."""
    if num_docs < 2:
        raise LmEvalError(f"{num_docs} evaluation document(s): a validation and a test split need at least 2")
    if validation_fraction <= 0 or test_fraction <= 0:
        raise LmEvalError(f"validation_fraction={validation_fraction}, test_fraction={test_fraction}: "
                          f"both must be > 0")
    order = list(range(num_docs))
    random.Random(seed).shuffle(order)
    share = validation_fraction / (validation_fraction + test_fraction)
    num_validation = min(max(round(num_docs * share), 1), num_docs - 1)
    validation, test = order[:num_validation], order[num_validation:]
    if max_eval_examples is not None:
        validation, test = validation[:max_eval_examples], test[:max_eval_examples]
    return tuple(sorted(validation)), tuple(sorted(test))


class LmEvalTask:
    """One lm-eval task, loaded once from local YAML, with its metric and deterministic splits.

    ``task`` is lm-eval's Task object and ``task_dict`` what ``TaskManager.load`` returned (what
    ``lm_eval.evaluator.evaluate`` takes). ``metric_name`` / ``direction``: the task's first metric
    and which way it improves. ``validation_indices`` / ``test_indices``: indices into the task's
    evaluation documents (``num_docs`` of them), as lm-eval's ``samples`` argument takes them.
    """

    def __init__(self, name: str, include_path: str, *, validation_fraction: float = 0.2,
                 test_fraction: float = 0.2, max_eval_examples: int | None = None, seed: int = 42) -> None:
        if not name:
            raise LmEvalError("lm_eval_task is empty: give the name of a task defined under lm_eval_include_path")
        if not include_path:
            raise LmEvalError(f"lm_eval task {name!r}: lm_eval_include_path is empty; give the folder "
                              f"holding the task's YAML (tasks are loaded from local files only)")
        path = Path(include_path).expanduser()
        if not path.exists():
            raise LmEvalError(f"lm_eval task {name!r}: lm_eval_include_path={include_path!r} does not exist; "
                              f"give the folder holding the task's YAML")
        lm_eval = _import_lm_eval()
        self.name, self.include_path, self.seed = name, str(path), seed

        with _lm_eval_logging(logging.ERROR), _no_datasets_progress_bar():
            manager = lm_eval.tasks.TaskManager(include_path=str(path), include_defaults=False)
            if name not in manager.all_tasks:
                local = ", ".join(manager.all_tasks) or "none"
                raise LmEvalError(f"lm_eval task {name!r} is not defined under {path}; "
                                  f"local tasks/groups there: {local}")
            try:
                self.task_dict = manager.load([name])
            except Exception as error:  # the YAML or its data: lm-eval and datasets raise many kinds
                raise LmEvalError(f"lm_eval task {name!r} (under {path}) failed to load: "
                                  f"{type(error).__name__}: {error}") from error
        tasks = self.task_dict["tasks"]
        if len(tasks) != 1:
            raise LmEvalError(f"lm_eval task {name!r} is a group or tag of {len(tasks)} tasks "
                              f"({', '.join(tasks)}); name one task, whose metric the search can follow")
        (self.task_name, self.task), = tasks.items()

        aggregations = self.task.aggregation()
        if not aggregations:
            raise LmEvalError(f"lm_eval task {name!r} defines no metric; add a metric_list to its YAML")
        self.metric_name: str = next(iter(aggregations))
        higher_is_better = self.task.higher_is_better().get(self.metric_name)
        if higher_is_better is None:
            raise LmEvalError(f"lm_eval task {name!r}: metric {self.metric_name!r} does not say which way it "
                              f"improves; set higher_is_better in its metric_list entry")
        self.direction = Direction.HIGHER if higher_is_better else Direction.LOWER
        self.per_document = aggregations[self.metric_name] is lm_eval.api.metrics.mean

        self.num_docs = len(self.task.eval_docs)
        try:
            self.validation_indices, self.test_indices = split_indices(
                self.num_docs, validation_fraction, test_fraction, seed, max_eval_examples)
        except LmEvalError as error:
            raise LmEvalError(f"lm_eval task {name!r}: {error}") from None

    @classmethod
    def from_spec(cls, spec: TargetSpec) -> LmEvalTask:
        return cls(spec.lm_eval_task, spec.lm_eval_include_path, validation_fraction=spec.validation_fraction,
                   test_fraction=spec.test_fraction, max_eval_examples=spec.max_eval_examples, seed=spec.seed)

    @property
    def source(self) -> str:
        """Where the task came from, for logs."""
        return f"lm-eval task {self.name} from {self.include_path}"

    def fingerprint(self) -> str:
        """sha256 over lm-eval's version, the task's config, its evaluation documents and (when it
        uses few-shot examples) the documents those are drawn from."""
        import lm_eval

        payload: dict[str, Any] = {
            "lm_eval": lm_eval.__version__,
            "config": self.task.dump_config(),
            "docs": list(self.task.eval_docs),
        }
        if self.task.get_config("num_fewshot"):
            fewshot = self.task.fewshot_docs()
            payload["fewshot_docs"] = list(fewshot) if fewshot is not None else None
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=_stable)
        return hashlib.sha256(text.encode()).hexdigest()

    def _result_key(self, results: Mapping[str, Any]) -> str:
        """The "metric,filter" key the score is read under: the task's first filter."""
        values = results["results"][self.task_name]
        prefix = f"{self.metric_name},"
        # Keys are "metric,filter" in the task's filter order; stderr keys are "metric_stderr,filter".
        key = next((k for k in values if k.startswith(prefix)), None)
        if key is None:
            raise LmEvalError(f"lm_eval task {self.name!r}: no {self.metric_name!r} in lm-eval's results "
                              f"{sorted(values)}")
        return key

    def score(self, results: Mapping[str, Any]) -> float:
        """The metric's value in what ``lm_eval.evaluator.evaluate`` returned."""
        key = self._result_key(results)
        value = results["results"][self.task_name][key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LmEvalError(f"lm_eval task {self.name!r}: {key} = {value!r} is not a number")
        return float(value)

    def examples(self, results: Mapping[str, Any]) -> ExampleScores | None:
        """Each document's metric value (in document order) when the metric is a mean over
        documents, from ``evaluate(..., log_samples=True)``; None for a corpus-level metric."""
        if not self.per_document:
            return None
        import numpy as np

        filter_key = self._result_key(results).split(",", 1)[1]
        samples = sorted((s for s in results["samples"][self.task_name] if s["filter"] == filter_key),
                         key=lambda s: s["doc_id"])
        values = np.array([float(s[self.metric_name]) for s in samples])
        return ExampleScores(values, np.ones_like(values))


def _quiet_hflm_class():
    """lm-eval's HFLM with every progress bar off (``evaluate`` offers no switch for them)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    return QuietHFLM


class LmEvalEvaluator:
    """``search.Evaluator`` scoring a hybrid on documents ``indices`` of an lm-eval task.

    ``model`` (a Hugging Face causal LM, already on ``device``) is wrapped once in lm-eval's
    ``HFLM``; each call swaps ``linear_layers``' students in and runs ``lm_eval.evaluator.evaluate``
    on those documents, returning the task's metric. The tokenizer is copied, so lm-eval's
    pad-token set-up never touches the caller's. No prefix reuse (lm-eval runs whole sequences, and
    generation decodes through every layer), so ``rebase`` does nothing and ``layer_forwards``
    counts, like ``GenerationEvaluator``, one pass over the documents per layer per candidate.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, students: Mapping[int, nn.Module], tokenizer,
                 task: LmEvalTask, indices: Sequence[int], *, batch_size: int = 8,
                 device: torch.device | str = "cpu") -> None:
        import copy

        _import_lm_eval()
        if not adapter.causal:
            raise LmEvalError(f"lm_eval task {task.name!r}: lm-eval scores causal language models; "
                              f"this {adapter.family or type(adapter).__name__} model is an encoder")
        indices = sorted(set(int(i) for i in indices))
        if not indices:
            raise LmEvalError(f"lm_eval task {task.name!r}: no document indices to evaluate on")
        if indices[0] < 0 or indices[-1] >= task.num_docs:
            raise LmEvalError(f"lm_eval task {task.name!r}: document indices must be in 0..{task.num_docs - 1}, "
                              f"got {indices[0]}..{indices[-1]}")
        if batch_size < 1:
            raise LmEvalError(f"batch_size={batch_size}: must be >= 1")
        self.device = torch.device(device)
        model_device = getattr(model, "device", self.device)
        if model_device.type != self.device.type:
            raise LmEvalError(f"the model is on {model_device} but device={device!r}; lm-eval runs a "
                              f"ready model where it is: move it to {device!r} first")

        self.model, self.adapter, self.students = model, adapter, students
        self.task, self.indices = task, tuple(indices)
        self.num_layers = adapter.num_layers
        self.layer_forwards = 0
        self.layer_forwards_full = 0
        with _lm_eval_logging(logging.ERROR):
            # HFLM ignores ``device`` for a ready model and uses the model's own.
            self.lm = _quiet_hflm_class()(pretrained=model, tokenizer=copy.deepcopy(tokenizer),
                                          batch_size=batch_size, device=str(self.device))

    def __call__(self, linear_layers: Iterable[int]) -> float:
        return self.evaluate(linear_layers)[0]

    @torch.no_grad()
    def evaluate(self, linear_layers: Iterable[int]) -> tuple[float, ExampleScores | None]:
        """The score and, for a metric averaged over documents, each document's value."""
        from lm_eval.evaluator import evaluate

        layers = list(linear_layers)
        self.layer_forwards += self.num_layers
        self.layer_forwards_full += self.num_layers
        with ExitStack() as stack:
            stack.enter_context(_lm_eval_logging(logging.WARNING))
            stack.enter_context(_no_request_progress_bar())
            stack.enter_context(_seeded(self.task.seed, self.device))
            stack.enter_context(hybrid_view(self.model, self.adapter, self.students, layers))
            # The few-shot sampler's generator advances per document: reset it so that every
            # candidate sees the same few-shot examples.
            self.task.task.set_fewshot_seed(self.task.seed)
            results = evaluate(
                lm=self.lm, task_dict=self.task.task_dict, samples={self.task.task_name: list(self.indices)},
                bootstrap_iters=0, log_samples=self.task.per_document, cache_requests=False, write_out=False,
            )
        return self.task.score(results), self.task.examples(results)

    def rebase(self, linear_layers: Iterable[int]) -> None:
        """Nothing to move: every candidate is evaluated from scratch."""
