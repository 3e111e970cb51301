"""``python -m dtr_core``: run every DtR stage in order on one machine and print a summary.

Stage results are cached (``--cache-dir``, default ``<output-dir>/cache``): the same command, run
again after a kill, redoes only what had not finished.

Under ``torchrun --nproc_per_node N -m dtr_core ...`` the distillation streams data-parallel over
the N processes (one GPU each with ``--device cuda``); rank 0 then runs the remaining stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
from pathlib import Path

from .specs import (
    DECODER_WINDOW,
    CardSpec,
    TARGET_KINDS,
    CaptureSpec,
    DistillSpec,
    ModelSpec,
    RunSpec,
    SearchSpec,
    SpecError,
    StudentSpec,
    TargetSpec,
    spec_from_dict,
)


class HelpWithDefaults(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help names every option's default (unless its text already does; flags default to off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            return text
        if action.default in (None, "", [], ()):
            return f"{text} (default: none)"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dtr_core", description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--model", default=ModelSpec.path,
                        help="HF folder, hub id, 'minilm' or 'smollm2-135m'")
    parser.add_argument("--dataset", default=TargetSpec.dataset, help="'bbc_news', 'python_docs' or a local path")
    parser.add_argument("--max-examples", type=int, default=TargetSpec.max_examples_per_split,
                        help="cap on examples per split (train/validation/test); default: all")
    parser.add_argument("--eval-examples", type=int, default=TargetSpec.max_eval_examples,
                        help="cap on validation and test examples only (the search's cost); default: all")
    parser.add_argument("--eval-batch-size", type=int, default=TargetSpec.batch_size,
                        help="rows per batch when scoring the target task (larger is faster on a GPU)")
    parser.add_argument("--target-kind", default=TargetSpec.kind, help=" | ".join(TARGET_KINDS))
    parser.add_argument("--target", default="", metavar="FIELD=VALUE,...",
                        help="more fields of the primary target (TargetSpec), e.g. "
                             "'name=topic,prompt_template=Q: {text}\\nA:,num_fewshot=0'")
    parser.add_argument("--guard", action="append", default=[], metavar="FIELD=VALUE,...",
                        help="a further target every kept hybrid must stay within tolerance on (repeatable), e.g. "
                             "'kind=passkey,context_tokens=256,tolerance=0.05,tolerance_mode=absolute'")
    parser.add_argument("--student", default=StudentSpec.kind,
                        help="gla | gated_deltanet | auto (every kind) | a comma-separated list: with several, "
                             "every layer gets one of each and every round of the search offers each layer with each kind")
    parser.add_argument("--window", type=_window, default=StudentSpec.window,
                        help="softmax attention over the last W tokens beside the scan (0: none; default auto: "
                             f"{DECODER_WINDOW} for decoders, 0 for encoders)")
    parser.add_argument("--short-conv", type=int, default=StudentSpec.short_conv,
                        help="kernel size of short causal convolutions on the scan's q/k/v (0: none)")
    parser.add_argument("--shared-kv", action=argparse.BooleanOptionalAction, default=StudentSpec.shared_kv,
                        help="on a grouped-query teacher, each group of query heads shares one K/V projection as in "
                             "the teacher (cheaper projections, fewer weights); --no-shared-kv: one per query head")
    parser.add_argument("--tolerance", type=float, default=SearchSpec.tolerance,
                        help="how far the primary target may fall from the full model's validation score")
    parser.add_argument("--tolerance-mode", default=SearchSpec.tolerance_mode, help="relative | absolute")
    parser.add_argument("--run-to-end", action="store_true", help="record the whole trajectory")
    parser.add_argument("--acceptance", default=SearchSpec.acceptance,
                        help="bootstrap | point: judge candidates by a pessimistic bound from paired "
                             "bootstrap resamples of the validation examples, or by their score (the paper's rule)")
    parser.add_argument("--confidence", type=float, default=SearchSpec.confidence,
                        help="the bootstrap bound's confidence")
    parser.add_argument("--candidate-layers", type=int, nargs="+", default=None,
                        help="only these layers may become linear (disk mode distils only them); default: all")
    parser.add_argument("--token-budget", type=int, default=None,
                        help=f"tokens every student trains on; the data are drawn up to it (default: "
                             f"{CUDA_TOKEN_BUDGET:,} with --device cuda, {CaptureSpec.token_budget:,} elsewhere)")
    parser.add_argument("--text-files", nargs="+", default=(),
                        help="distil from these .txt/.jsonl files of general text instead of the task's train split")
    parser.add_argument("--general-share", type=float, default=CaptureSpec.general_share,
                        help="share of the distillation tokens drawn from --general-text")
    parser.add_argument("--general-text", default=CaptureSpec.general_text,
                        help="general text to mix in: python_docs (built in) or a local file or folder")
    parser.add_argument("--max-length", type=int, default=CaptureSpec.max_length, help="tokens per distillation row")
    parser.add_argument("--batch-size", type=int, default=CaptureSpec.batch_size, help="rows per teacher batch")
    parser.add_argument("--mode", default=CaptureSpec.mode,
                        help="auto | disk | stream: capture activations to disk or stream them (auto: by disk budget)")
    parser.add_argument("--disk-budget-gb", type=float, default=CaptureSpec.disk_budget_gb,
                        help="mode auto streams when a capture would take more disk than this (10^9 bytes)")
    parser.add_argument("--epochs", type=int, default=DistillSpec.epochs,
                        help="fix the passes over the distillation data (default: train on --token-budget tokens, "
                             "cycling the data as often as that takes)")
    parser.add_argument("--checkpoint-every", type=int, default=DistillSpec.checkpoint_every,
                        help="stream mode: steps between checkpoints (a rerun resumes from the last)")
    parser.add_argument("--no-card", action="store_true",
                        help="skip the capability card (recall probes and general-text perplexity) of decoder runs")
    parser.add_argument("--card-lengths", type=int, nargs="+", default=CardSpec.lengths,
                        help="the card's probe lengths in tokens (capped at the teacher's context limit)")
    parser.add_argument("--model-dtype", default=ModelSpec.dtype, help="float32 | bfloat16 | float16")
    parser.add_argument("--output-dir", default=RunSpec.output_dir,
                        help="the run folder: search.json, hybrid/ (the exported model), report/")
    parser.add_argument("--cache-dir", default=None,
                        help="stage results, reused by later runs that share them (default: <output-dir>/cache)")
    parser.add_argument("--device", default=RunSpec.device, help="cpu | cuda | cuda:N")
    return parser


def parse_fields(cls: type, text: str, option: str) -> dict[str, object]:
    """``field=value,field=value`` → typed values for ``cls``'s fields (a comma starts a new field
    only before ``name=``, so values may contain commas; ``\\n`` in a value is a newline).
    ``none`` means None."""
    if not text.strip():
        return {}
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values: dict[str, object] = {}
    for item in re.split(r",(?=\s*\w+=)", text):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in types:
            raise SpecError(f"{option} {text!r}: {item!r} is not FIELD=VALUE with a {cls.__name__} field; "
                            f"fields are {sorted(types)}")
        values[name] = _typed(raw, types[name], f"{option} {name}")
    return values


def _typed(raw: str, annotation: str, where: str) -> object:
    if raw.strip().lower() in ("none", "null") and "None" in annotation:
        return None
    try:
        if annotation.startswith("int"):
            return int(raw)
        if annotation.startswith("float"):
            return float(raw)
        if annotation.startswith("bool"):
            return {"true": True, "false": False}[raw.strip().lower()]
    except (ValueError, KeyError):
        raise SpecError(f"{where}={raw!r}: expected {annotation.split(' ')[0]}") from None
    return raw.replace("\\n", "\n").replace("\\t", "\t")  # a shell passes newlines in templates as \n


def _window(raw: str) -> int | str:
    """--window: "auto" or a whole number."""
    if raw == "auto":
        return raw
    if raw.isdigit():
        return int(raw)
    raise argparse.ArgumentTypeError(f"{raw!r} is neither 'auto' nor a whole number of tokens >= 0")


# The default budget on a GPU. It distils SmolLM2-135M's 30 students in about a minute on an H200.
# The CPU default (CaptureSpec's) left a ~160K-token target one layer short of issue 14's 14/30, at
# 13/30; 640K tokens reached 27/30 (BENCHMARKS.md, "Issue 14").
CUDA_TOKEN_BUDGET = 1_000_000


def default_token_budget(device: str) -> int:
    return CUDA_TOKEN_BUDGET if device.startswith("cuda") else CaptureSpec.token_budget


def parse_args(argv: list[str] | None = None) -> tuple[RunSpec, str | None]:
    """The run's specs and the cache folder (None: the default inside the run folder)."""
    args = build_parser().parse_args(argv)
    return RunSpec(
        model=ModelSpec(path=args.model, dtype=args.model_dtype),
        student=StudentSpec(kind=args.student, window=args.window, short_conv=args.short_conv,
                            shared_kv=args.shared_kv),
        capture=CaptureSpec(token_budget=args.token_budget or default_token_budget(args.device), source="text_files" if args.text_files else "task_train",
                            text_files=tuple(args.text_files), max_length=args.max_length, batch_size=args.batch_size,
                            mode=args.mode, disk_budget_gb=args.disk_budget_gb, general_share=args.general_share,
                            general_text=args.general_text),
        distill=DistillSpec(epochs=args.epochs, checkpoint_every=args.checkpoint_every),
        card=CardSpec(enabled=not args.no_card, lengths=tuple(args.card_lengths)),
        search=SearchSpec(tolerance=args.tolerance, tolerance_mode=args.tolerance_mode, run_to_end=args.run_to_end,
                          candidate_layers=tuple(args.candidate_layers) if args.candidate_layers else None,
                          acceptance=args.acceptance, confidence=args.confidence),
        target=spec_from_dict(TargetSpec, {
            "dataset": args.dataset, "kind": args.target_kind, "max_examples_per_split": args.max_examples,
            "max_eval_examples": args.eval_examples, "batch_size": args.eval_batch_size,
            **parse_fields(TargetSpec, args.target, "--target")}),
        guards=tuple(spec_from_dict(TargetSpec, parse_fields(TargetSpec, text, "--guard")) for text in args.guard),
        output_dir=args.output_dir,
        device=args.device,
    ), args.cache_dir


def main(argv: list[str] | None = None) -> int:
    try:  # before the imports below (torch, transformers: seconds): a bad flag is refused at once
        run, cache_dir = parse_args(argv)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .distributed import close_distributed, init_distributed, rank_and_world
    from .report import format_summary
    from .run import default_cache_dir, run_dtr
    from .runner import PlainRunner
    from .stage_cache import StageCache
    from .stages import INPUT_ERRORS, check_inputs, make_output_dir

    made: list[Path] = []  # folders this run created, deepest first
    try:
        run = dataclasses.replace(run, device=init_distributed(run.device))
        log = print if rank_and_world()[0] == 0 else lambda line: None  # one voice for N processes
        check_inputs(run)  # before the cache folder is made: bad input leaves nothing behind
        cache_path = Path(cache_dir or default_cache_dir(run)).absolute()
        made = [folder for folder in (cache_path, *cache_path.parents) if not folder.exists()]
        cache = StageCache(make_output_dir(cache_path, "--cache-dir"))
        summary = run_dtr(run, PlainRunner(cache, log), log=log)
    except INPUT_ERRORS as err:
        # Input found bad once the teacher is loaded (e.g. an encoder given a decoder's target): the
        # folders made for the run go again while they hold no file.
        for folder in made:
            if folder.exists() and not any(path.is_file() for path in folder.rglob("*")):
                shutil.rmtree(folder)
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        close_distributed()
    if summary is not None:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
