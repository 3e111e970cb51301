"""The tracking interface a run logs through (in torchtune's style): MLflow is one implementation
(``tasks/tracking.py``), ``NoTracking`` another. dtr_core decides what to log, never where."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    """Where a run's parameters, metrics and files go. Implementations handed to stages that run
    on other processes (Dask workers) must be picklable."""

    def log_params(self, params: Mapping[str, str]) -> None:
        """Flat string parameters (e.g. the resolved config)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Scalars at one step (None: a single value)."""

    def log_series(self, name: str, values: Sequence[float], first_step: int) -> None:
        """Consecutive points of one series (a loss curve), at steps ``first_step``, ``first_step + 1``, …"""

    def log_tags(self, tags: Mapping[str, str]) -> None:
        """Short searchable strings (layer sets, paths)."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text file among the run's artefacts."""

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        """Every file of ``folder`` among the run's artefacts, under ``artifact_path``."""


class NoTracking:
    """Logs nothing: the command line, and flows run with ``tracking=off``."""

    def log_params(self, params: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_series(self, name: str, values: Sequence[float], first_step: int) -> None:
        pass

    def log_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        pass
