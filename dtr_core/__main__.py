"""``python -m dtr_core``: run every DtR stage in order on one machine and print a summary."""

from __future__ import annotations

import argparse
import sys

from .specs import CaptureSpec, ModelSpec, RunSpec, SearchSpec, SpecError, StudentSpec, TargetSpec
from .report import format_summary


def parse_args(argv: list[str] | None = None) -> RunSpec:
    parser = argparse.ArgumentParser(prog="python -m dtr_core", description=__doc__)
    parser.add_argument("--model", default=ModelSpec.path, help="HF folder, hub id, or 'minilm' (default)")
    parser.add_argument("--dataset", default=TargetSpec.dataset, help="'bbc_news' (default) or a local path")
    parser.add_argument("--target-kind", default=TargetSpec.kind, help="classification | perplexity")
    parser.add_argument("--student", default=StudentSpec.kind, help="gla | gated_deltanet")
    parser.add_argument("--tolerance", type=float, default=SearchSpec.tolerance)
    parser.add_argument("--tolerance-mode", default=SearchSpec.tolerance_mode, help="relative | absolute")
    parser.add_argument("--run-to-end", action="store_true", help="record the whole trajectory")
    parser.add_argument("--token-budget", type=int, default=CaptureSpec.token_budget)
    parser.add_argument("--output-dir", default=RunSpec.output_dir)
    parser.add_argument("--device", default=RunSpec.device)
    args = parser.parse_args(argv)
    return RunSpec(
        model=ModelSpec(path=args.model),
        student=StudentSpec(kind=args.student),
        capture=CaptureSpec(token_budget=args.token_budget),
        search=SearchSpec(tolerance=args.tolerance, tolerance_mode=args.tolerance_mode, run_to_end=args.run_to_end),
        target=TargetSpec(dataset=args.dataset, kind=args.target_kind),
        output_dir=args.output_dir,
        device=args.device,
    )


def main(argv: list[str] | None = None) -> int:
    from .adapters import UnsupportedModelError
    from .pipeline import OutputDirError, run_dtr
    from .targets.data import DataError
    from .teacher import ModelLoadError

    try:
        summary = run_dtr(parse_args(argv))
    except (SpecError, DataError, ModelLoadError, UnsupportedModelError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
