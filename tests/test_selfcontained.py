"""The repository is self-contained: nothing the product, its demo, its benchmarks or its tests run reads a
folder beside the repository (a user's clone has nothing beside it) — only the repository and the asset
cache of ``scripts/fetch_assets.py``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCANNED = ("qmace", "qmace_zoo", "scripts", "benchmarks", "tests", ".ci")
# Spelled in pieces so that this file does not match itself.
_SIBLING = "sh" + "ared"
FORBIDDEN = [
    re.compile(r"\.\./+" + _SIBLING),                      # ../<sibling>
    re.compile(_SIBLING + r"/+data"),                      # <sibling>/data
    re.compile(r"/wo" + r"rk/"),                           # this workplace's absolute paths
    re.compile(r"""parents?\b[^\n]*["']""" + _SIBLING + r"""["']"""),  # Path(...).parent / "<sibling>"
]


def _source_files() -> list[Path]:
    out = []
    for top in SCANNED:
        root = REPO / top
        if root.is_file():
            out.append(root)
            continue
        for p in root.rglob("*"):
            wanted = p.suffix in (".py", ".sh", ".md", ".yml", ".yaml", ".toml") or p.name == "run"
            if p.is_file() and wanted and "__pycache__" not in p.parts:
                out.append(p)
    return out


def test_no_path_outside_the_repository():
    files = _source_files()
    assert len(files) > 50  # the scan saw the tree
    hits = []
    for p in files:
        for lineno, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if any(rx.search(line) for rx in FORBIDDEN):
                hits.append(f"{p.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def test_scan_patterns_catch_the_old_spelling():
    bad = 'DATA = Path(__file__).resolve().parent.parent / "' + _SIBLING + '" / "data"'
    assert any(rx.search(bad) for rx in FORBIDDEN)
    assert any(rx.search("../" + _SIBLING + "/data/stamps-split.json") for rx in FORBIDDEN)


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_bare_clone_reads_only_itself(tmp_path):
    """A clone with nothing beside it loads the demo's split and labels from its own data/ and answers
    ``--help``/``--version`` (the demo's remaining steps need the fetched assets: README command 1)."""
    clone = tmp_path / "lonely" / "qmace"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(clone)], check=True,
                   capture_output=True, timeout=120)
    assert sorted(p.name for p in clone.parent.iterdir()) == ["qmace"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(clone)}
    code = (
        "import qmace, qmace_zoo.stamps as s, pathlib, sys; "
        f"root = pathlib.Path({str(clone)!r}); "
        "assert pathlib.Path(qmace.__file__).resolve().is_relative_to(root), qmace.__file__; "
        "split = s.load_split(); labels = s.imagenet_labels(); "
        "assert s.data_dir_of().resolve().is_relative_to(root); "
        "print(len(split['calib']), len(split['eval']), sum(p in labels for p in split['eval']))"
    )
    p = subprocess.run([sys.executable, "-c", code], check=False, cwd=clone, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["64", "233", "113"]
    for argv in (["scripts/demo_mobilenet.py", "--help"], ["-m", "qmace", "--version"]):
        p = subprocess.run([sys.executable, *argv], check=False, cwd=clone, env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, (argv, p.stderr)
