"""Docs that are generated from code must be current."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_supported_ops_doc_is_current():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_supported_ops.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "supported-ops.md").read_text() == gen.render(), (
        "docs/supported-ops.md is stale: run python scripts/gen_supported_ops.py")


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.strip()]
    blocks = [ln for ln in lines[:12] if ln.startswith(("python", "pip", "bash", "./"))]
    assert len(blocks) >= 2, "README must open with the demo command and the test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1] in ci, ".ci/run must run exactly the README's test command"
