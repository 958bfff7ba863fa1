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


def test_caffe_yaml_in_docs_is_a_valid_deployment_file(tmp_path):
    """The complete Caffe YAML of docs/mace-compatibility.md reads as a caffe model entry."""
    from qmace.config import load_config

    text = (ROOT / "docs" / "mace-compatibility.md").read_text().split("## Caffe models", 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "nsfw.yml").write_text(block)
    m = load_config(tmp_path / "nsfw.yml").model(None)
    assert m.platform == "caffe" and m.weight_file_path.name.endswith(".caffemodel")
    assert m.subgraph.input_tensors == ("data",) and m.subgraph.input_data_formats == ("NCHW",)
    assert m.subgraph.output_tensors == ("prob",)
