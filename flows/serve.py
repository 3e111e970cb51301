"""Serve the DtR flow as a Prefect deployment, so runs can be launched with
``prefect deployment run 'dtr/<name>' --param overrides='["student=gated_deltanet"]'``.

Needs a Prefect server (``prefect server start --host 127.0.0.1``) and PREFECT_API_URL pointing at it.
"""

from __future__ import annotations

import argparse

from flows.dtr import dtr_flow


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--name", default="local", help="deployment name (runs as 'dtr/<name>')")
    parser.add_argument("--override", action="append", default=[],
                        help="Hydra override applied to every run, before the run's own overrides")
    args = parser.parse_args(argv)
    dtr_flow.serve(name=args.name, parameters={"base_overrides": args.override})


if __name__ == "__main__":
    main()
