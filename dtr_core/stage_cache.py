"""A content-keyed stage cache on a (possibly shared) filesystem.

Both entry points (``python -m dtr_core`` and the Prefect flow) run their stages through it, so a
killed run started again redoes only what had not finished. Prefect's built-in policies hash task
source or pickled inputs, which cannot identify a model; so every stage computes an explicit key
(its spec, the teacher's fingerprint, upstream manifests' digests, the dtr_core code version) and
stores its small JSON manifest under
``<root>/<stage>/<key>.json``. The manifest is written last and atomically, so its presence means
the stage finished. Before a hit is trusted, the manifest is checked against the digest of its own
content (a damaged or hand-edited manifest could otherwise name a wrong but plausible value) and
the files it lists against their sha256; any mismatch is a miss, reported, and the stage runs
again. A stage writes its files inside ``<root>/<stage>/<key>/`` only: a file of its own beside the
manifest could take the manifest's name (a run killed between the two writes left a student's
record where the manifest belongs, and the next run failed on it).

Runs sharing the cache take turns per stage and key (``lock``: ``<root>/locks/<stage>/<key>.lock``,
see ``locks.file_lock``), so a stage two runs need at once is computed by one and read by the other.
Every stored result adds a line to ``<root>/computed.log`` (``journal``): which process on which
host computed what, and when.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from .io import read_json, sha256_file, write_json
from .locks import file_lock

# The stages whose results are cached (``refresh`` names them).
STAGES = ("capture", "distill", "target", "evaluate", "search", "test", "card", "export")
MANIFEST_FIELDS = {"value", "files", "digest"}
JOURNAL = "computed.log"


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

    def manifest_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.json"

    def lock_path(self, stage: str, key: str) -> Path:
        return self.root / "locks" / stage / f"{key}.lock"

    def lookup(self, stage: str, key: str, warn: Callable[[str], None] | None = None) -> Any:
        """The stage's value if it finished and its manifest and files are intact; None otherwise (or on refresh).

        A manifest that is damaged, edited or of an older layout (or any other file at its path), or
        a listed file that is missing or changed, is not a finished stage: ``warn`` hears why, and
        the stage runs again (its new manifest replaces the old one)."""
        path = self.manifest_path(stage, key)
        if stage in self.refresh or not path.exists():
            return None
        manifest, problem = _read_manifest(path)
        if manifest is not None:
            problem = _changed_file(manifest["files"])
        if problem is not None:
            if warn is not None:
                warn(f"the cached result {path} is not usable: {problem}")
            return None
        return manifest["value"]

    def store(self, stage: str, key: str, value: Any, files: dict[str, str] | None = None) -> Any:
        """Record a finished stage: ``value`` (JSON) and the files (path → sha256) it depends on."""
        files = files or {}
        write_json(self.manifest_path(stage, key),
                   {"value": value, "files": files, "digest": manifest_digest(value, files)})
        line = json.dumps({"stage": stage, "key": key, "host": socket.gethostname(), "pid": os.getpid(),
                           "time": time.time()}) + "\n"
        # One write to a file opened for appending: lines of concurrent runs do not mix (local disks).
        fd = os.open(self.root / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return value

    def journal(self) -> list[dict]:
        """Every result stored in this cache, oldest first: {"stage", "key", "host", "pid", "time"}."""
        path = self.root / JOURNAL
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def lock(self, stage: str, key: str, on_wait: Callable[[], None] | None = None) -> AbstractContextManager[None]:
        """Held while a stage is looked up again and computed: another run (or thread) after the same
        stage and key waits for it (``on_wait`` hears when), then finds the result."""
        return file_lock(self.lock_path(stage, key), on_wait)


def manifest_digest(value: Any, files: dict[str, str]) -> str:
    """Digest of a manifest's content, as JSON reads it back (tuples become lists, keys strings)."""
    return content_key(json.loads(json.dumps({"value": value, "files": files})))


def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """The manifest at ``path`` if it is one and matches its digest, else (None, what is wrong)."""
    try:
        manifest = read_json(path)
    except ValueError:  # not JSON, or not even text
        return None, "it is not valid JSON (truncated or damaged)"
    if not isinstance(manifest, dict) or set(manifest) != MANIFEST_FIELDS:
        return None, "it is not a stage manifest (another file, or an older layout)"
    if manifest["digest"] != manifest_digest(manifest["value"], manifest["files"]):
        return None, "its content does not match its digest (edited or damaged)"
    return manifest, None


def _changed_file(files: dict[str, str]) -> str | None:
    """What is wrong with the first listed file that is missing or differs from its sha256, if any."""
    for file, digest in files.items():
        if not Path(file).is_file():
            return f"{file} is missing"
        if sha256_file(file) != digest:
            return f"{file} does not match its sha256 (changed or truncated)"
    return None
