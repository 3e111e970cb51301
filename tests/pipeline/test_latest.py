"""<output_dir>/latest: what the README's usage snippet loads right after `make run`."""

import os
import re
from pathlib import Path

from flows.config import compose
from flows.dtr import LATEST, point_latest

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_snippet_loads_the_link_a_default_run_leaves():
    section = (REPO / "README.md").read_text().split("## Using the exported hybrid")[1].split("\n## ")[0]
    loaded = set(re.findall(r'from_pretrained\("([^"]+)"', section))
    # `make run` runs the flow from the repository's folder with the default output_dir.
    assert loaded == {str(Path(compose([])["output_dir"]) / LATEST)}


def test_latest_follows_each_export_and_moves_with_its_folder(tmp_path):
    out = tmp_path / "outputs"
    exports = [out / "runs" / name / "hybrid" for name in ("first", "second")]
    for export in exports:
        export.mkdir(parents=True)
        (export / "config.json").write_text(f'{{"run": "{export.parent.name}"}}')
    for export in exports:
        point_latest(out, export)
        assert (out / LATEST / "config.json").read_text() == (export / "config.json").read_text()
    assert os.readlink(out / LATEST) == "runs/second/hybrid"
    assert {p.name for p in out.iterdir()} == {"runs", LATEST}  # no staged link left beside it
    out.rename(tmp_path / "moved")
    assert (tmp_path / "moved" / LATEST / "config.json").read_text() == '{"run": "second"}'
