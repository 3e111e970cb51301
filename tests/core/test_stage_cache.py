"""The flow's stage cache: a hit only for a finished stage whose manifest and files are intact;
runs sharing it take turns per stage and key."""

import json

import pytest

from dtr_core.io import save_tensors, sha256_file
from dtr_core.stage_cache import StageCache, manifest_digest


@pytest.fixture
def cache(tmp_path) -> StageCache:
    return StageCache(tmp_path / "cache")


def stored_stage(cache: StageCache, key: str = "k") -> dict:
    import torch

    weights = cache.folder("distill", key) / "student.safetensors"
    digest = save_tensors(weights, {"w": torch.ones(2)})
    return cache.store("distill", key, {"loss": 0.5}, files={str(weights): digest})


def test_a_finished_stage_is_a_hit(cache):
    assert stored_stage(cache) == {"loss": 0.5}
    assert cache.lookup("distill", "k") == {"loss": 0.5}
    assert cache.lookup("distill", "other") is None


def test_a_changed_file_or_a_refresh_is_a_miss(cache, tmp_path):
    stored_stage(cache)
    assert StageCache(tmp_path / "cache", frozenset({"distill"})).lookup("distill", "k") is None
    weights = cache.folder("distill", "k") / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    problems = []
    assert cache.lookup("distill", "k", warn=problems.append) is None
    assert problems == [f"the cached result {cache.root / 'distill' / 'k.json'} is not usable: "
                        f"{weights} does not match its sha256 (changed or truncated)"]
    weights.unlink()
    assert cache.lookup("distill", "k", warn=problems.append) is None and problems[-1].endswith(f"{weights} is missing")


def test_an_edited_manifest_is_a_miss(cache):
    """A valid but different value (say, the full model's score where a candidate's was) does not
    match the digest the manifest holds of its own content."""
    stored_stage(cache)
    path = cache.root / "distill" / "k.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "value": {"loss": 0.25}}))
    problems = []
    assert cache.lookup("distill", "k", warn=problems.append) is None
    assert problems[0].endswith("its content does not match its digest (edited or damaged)")


@pytest.mark.parametrize("content", [
    json.dumps({"layer_idx": 0, "weights_file": "student.safetensors"}),  # a stage's own record, no manifest
    json.dumps({"value": {"loss": 0.5}, "files": {}}),  # the layout before manifests held their digest
    "{\"value\": ",  # not JSON
    "[]",
])
def test_whatever_else_sits_at_the_manifests_path_is_a_miss(cache, content):
    path = cache.root / "distill" / "k.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    problems = []
    assert cache.lookup("distill", "k", warn=problems.append) is None
    assert len(problems) == 1 and "is not usable: it is not" in problems[0]
    stored_stage(cache)  # the stage runs again and its manifest replaces the file
    assert cache.lookup("distill", "k") == {"loss": 0.5}


def test_unknown_refresh_stage_is_named():
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['distil'\]"):
        StageCache("/tmp/unused", frozenset({"distil"}))


def test_the_manifest_names_its_files_their_digests_and_its_own(cache):
    stored_stage(cache)
    manifest = json.loads((cache.root / "distill" / "k.json").read_text())
    weights = cache.folder("distill", "k") / "student.safetensors"
    files = {str(weights): sha256_file(weights)}
    assert manifest == {"value": {"loss": 0.5}, "files": files, "digest": manifest_digest({"loss": 0.5}, files)}
    # The digest is of the content as JSON reads it back: a value with tuples is a hit when read.
    cache.store("search", "t", {"layers": (1, 2), "by_layer": {3: 0.5}})
    assert cache.lookup("search", "t") == {"layers": [1, 2], "by_layer": {"3": 0.5}}


def test_the_journal_records_who_stored_what(cache):
    import os
    import socket

    stored_stage(cache, "a")
    stored_stage(cache, "b")
    journal = cache.journal()
    assert [(e["stage"], e["key"]) for e in journal] == [("distill", "a"), ("distill", "b")]
    assert {(e["host"], e["pid"]) for e in journal} == {(socket.gethostname(), os.getpid())}


def test_cache_files_and_folders_follow_the_umask(cache, tmp_path):
    """Written with the usual modes (0o644 / 0o755 under umask 022), not owner-only, so a cache
    shared by several users can be read by all of them."""
    import stat
    import subprocess
    import sys

    script = (
        "import os, sys, torch; os.umask(0o022)\n"
        "from pathlib import Path\n"
        "from dtr_core.io import link_tree, save_tensors, write_json\n"
        "from dtr_core.stage_cache import StageCache\n"
        "root = Path(sys.argv[1])\n"
        "write_json(root / 'a.json', {'x': 1}); save_tensors(root / 'w.safetensors', {'t': torch.zeros(2)})\n"
        "link_tree(root, root.parent / 'linked')\n"
        "cache = StageCache(root.parent / 'cache')\n"
        "with cache.lock('test', 'k'): cache.store('test', 'k', {'score': 1.0})\n"
    )
    root = tmp_path / "files"
    root.mkdir()
    # A fresh process: the module reads the umask once, at import.
    subprocess.run([sys.executable, "-c", script, str(root)], check=True)
    cache = tmp_path / "cache"
    for path in (root / "a.json", root / "w.safetensors", tmp_path / "linked" / "a.json",
                 cache / "test" / "k.json", cache / "computed.log", cache / "locks" / "test" / "k.lock"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for path in (tmp_path / "linked", cache / "locks", cache / "locks" / "test"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path


def test_staging_folders_of_killed_processes_are_removed_and_no_others(tmp_path):
    """A run killed while exporting leaves its staging folder; the next one staged beside it removes
    it, but never a live process's (another run staging at that moment) nor another host's."""
    import os
    import socket
    import subprocess

    from dtr_core.io import link_tree

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    names = {"dead": f".hybrid.tmp-{host}+{dead.pid}+abc", "live": f".hybrid.tmp-{host}+{os.getpid()}+abc",
             "other host": f".hybrid.tmp-elsewhere+{dead.pid}+abc", "not staging": ".hybrid.tmp-notes"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    source = tmp_path / "export"
    source.mkdir()
    (source / "config.json").write_text("{}")
    link_tree(source, tmp_path / "hybrid")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["export", "hybrid", names["live"], names["other host"], names["not staging"]])
