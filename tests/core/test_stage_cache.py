"""The flow's stage cache: a hit only for a finished stage whose files are intact."""

import json

import pytest

from dtr_core.io import save_tensors, sha256_file
from dtr_core.stage_cache import StageCache


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
    (cache.folder("distill", "k") / "student.safetensors").write_bytes(b"truncated")
    assert cache.lookup("distill", "k") is None


@pytest.mark.parametrize("content", [
    json.dumps({"layer_idx": 0, "weights_file": "student.safetensors"}),  # a stage's own record, no manifest
    "{\"value\": ",  # not JSON
    "[]",
])
def test_whatever_else_sits_at_the_manifests_path_is_a_miss(cache, content):
    path = cache.root / "distill" / "k.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert cache.lookup("distill", "k") is None
    stored_stage(cache)  # the stage runs again and its manifest replaces the file
    assert cache.lookup("distill", "k") == {"loss": 0.5}


def test_unknown_refresh_stage_is_named():
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['distil'\]"):
        StageCache("/tmp/unused", frozenset({"distil"}))


def test_the_manifest_names_its_files_and_their_digests(cache):
    stored_stage(cache)
    manifest = json.loads((cache.root / "distill" / "k.json").read_text())
    weights = cache.folder("distill", "k") / "student.safetensors"
    assert manifest == {"value": {"loss": 0.5}, "files": {str(weights): sha256_file(weights)}}


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
        "root = Path(sys.argv[1])\n"
        "write_json(root / 'a.json', {'x': 1}); save_tensors(root / 'w.safetensors', {'t': torch.zeros(2)})\n"
        "link_tree(root, root.parent / 'linked')\n"
    )
    root = tmp_path / "files"
    root.mkdir()
    # A fresh process: the module reads the umask once, at import.
    subprocess.run([sys.executable, "-c", script, str(root)], check=True)
    for path in (root / "a.json", root / "w.safetensors", tmp_path / "linked" / "a.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "linked").stat().st_mode) == 0o755
