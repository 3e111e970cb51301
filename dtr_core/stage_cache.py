"""A content-keyed stage cache on a (possibly shared) filesystem.

Both entry points (``python -m dtr_core`` and the Prefect flow) run their stages through it, so a
killed run started again redoes only what had not finished. Prefect's built-in policies hash task
source or pickled inputs, which cannot identify a model; so every stage computes an explicit key
(its spec, the teacher's fingerprint, upstream manifests' digests, the dtr_core code version) and
stores its small JSON manifest under
``<root>/<stage>/<key>.json``. The manifest is written last and atomically, so its presence means
the stage finished; the files it lists are checked against their sha256 before a hit is trusted.
A stage writes its files inside ``<root>/<stage>/<key>/`` only: a file of its own beside the
manifest could take the manifest's name (a run killed between the two writes left a student's
record where the manifest belongs, and the next run failed on it).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from .io import read_json, sha256_file, write_json

# The stages whose results are cached (``refresh`` names them).
STAGES = ("capture", "distill", "target", "evaluate", "search", "test", "card", "export")


def content_key(*parts: Any) -> str:
    """sha256 of JSON-serialisable parts (order matters)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Digest of every dtr_core source file: a change to the method invalidates cached stages.

    Computed once per process: every stage key includes it."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class StageCache:
    def __init__(self, root: str | Path, refresh: frozenset[str] = frozenset()) -> None:
        unknown = set(refresh) - set(STAGES)
        if unknown:
            raise ValueError(f"refresh names unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
        self.root = Path(root)
        self.refresh = refresh

    def folder(self, stage: str, key: str) -> Path:
        """The folder in which a stage keeps the files its manifest points at (and nothing else)."""
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> dict | None:
        """The stage's manifest if it finished and its files are intact; None otherwise (or on refresh).

        Whatever else sits at the manifest's path (an older layout's file, a hand edit) is not a
        finished stage either: the stage runs again and its manifest replaces it."""
        path = self.root / stage / f"{key}.json"
        if stage in self.refresh or not path.exists():
            return None
        try:
            manifest = read_json(path)
        except json.JSONDecodeError:
            return None
        if not isinstance(manifest, dict) or set(manifest) != {"value", "files"}:
            return None
        for file, digest in manifest["files"].items():
            if not Path(file).exists() or sha256_file(file) != digest:
                return None
        return manifest["value"]

    def store(self, stage: str, key: str, value: Any, files: dict[str, str] | None = None) -> Any:
        """Record a finished stage: ``value`` (JSON) and the files (path → sha256) it depends on."""
        write_json(self.root / stage / f"{key}.json", {"value": value, "files": files or {}})
        return value
