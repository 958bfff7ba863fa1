"""The official ONNX backend node tests, run through the path a user takes, on both backends.

Which tests: tests/onnx_node_selection.json, written by ``python scripts/onnx_node_tests.py
--write-selection``: every node test of the ``onnx==1.20.1`` wheel whose ops qmace claims and that plain
ONNX Runtime passes on the same file (``test_selection_is_current`` keeps it honest: a new op, or an op
qmace stops claiming, changes it). How a test is run and compared: scripts/onnx_node_tests.py (frontend ->
bind_io -> passes -> model file -> Session; rtol 1e-3, atol 1e-7; the model as shipped).

The data is fetched once, outside the repo, by ``python scripts/fetch_assets.py onnx-node-tests`` (.ci/run
does it); without it every test here is skipped with that command as the reason.

``EXPECTED_FAILURES`` (in scripts/onnx_node_tests.py, commented there, each with its reason) is enforced both
ways: a listed test that passes fails too (remove it from the list).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("onnx_node_tests", ROOT / "scripts" / "onnx_node_tests.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("onnx_node_tests", harness)  # its dataclasses look their module up
_spec.loader.exec_module(harness)

NODE_DIR = harness.default_node_dir()
SELECTION: dict[str, list[str]] = json.loads(harness.SELECTION_FILE.read_text())

EXPECTED_FAILURES = harness.EXPECTED_FAILURES

# The issue-17 targets, as a floor: EXPECTED_FAILURES may not grow past them.
MIN_PASS_RATE = {"onnxruntime": 0.98, "reference": 0.95}

needs_data = pytest.mark.skipif(
    not NODE_DIR.is_dir(),
    reason=f"ONNX node tests not fetched ({NODE_DIR}): run python scripts/fetch_assets.py onnx-node-tests")


@needs_data
@pytest.mark.parametrize("backend", harness.BACKENDS)
@pytest.mark.parametrize("name", sorted(SELECTION))
def test_node(name: str, backend: str, tmp_path: Path) -> None:
    case = harness.load_case(NODE_DIR / name)
    why = harness.qmace_result(case, backend, tmp_path)
    expected = EXPECTED_FAILURES.get((name, backend))
    if expected is None:
        assert why is None, f"{name} on {backend}: {why}"
    else:
        assert why is not None, (f"{name} on {backend} now passes; remove it from EXPECTED_FAILURES "
                                 f"(listed as: {expected.reason})")
        assert re.search(expected.match, why), (f"{name} on {backend} fails differently from EXPECTED_FAILURES "
                                                f"({expected.match!r}): {why}")


@needs_data
def test_selection_is_current() -> None:
    import logging

    logging.disable(logging.WARNING)
    try:
        now = harness.select(NODE_DIR)
    finally:
        logging.disable(logging.NOTSET)
    added = sorted(set(now) - set(SELECTION))
    dropped = sorted(set(SELECTION) - set(now))
    assert not added and not dropped, (
        f"tests/onnx_node_selection.json is stale (new: {added[:8]}{'...' if len(added) > 8 else ''}; gone: "
        f"{dropped[:8]}); run python scripts/onnx_node_tests.py --write-selection")


def test_expected_failures_are_selected_and_within_the_targets() -> None:
    stale = [k for k in EXPECTED_FAILURES if k[0] not in SELECTION or k[1] not in harness.BACKENDS]
    assert not stale, f"EXPECTED_FAILURES entries for tests that are not selected: {stale}"
    for backend, floor in MIN_PASS_RATE.items():
        failing = sum(1 for _, b in EXPECTED_FAILURES if b == backend)
        rate = 1 - failing / len(SELECTION)
        assert rate >= floor, f"{backend}: {len(SELECTION) - failing}/{len(SELECTION)} = {rate:.3f} < {floor}"
