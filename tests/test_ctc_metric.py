"""Issue 16 item 4: greedy CTC decoding as a task metric for sequence outputs (``ctc_greedy``), from the YAML
(`validation_outputs_metric`) and in qmace.metrics; and the OCR benchmark data's calibration/evaluation split."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

from qmace.metrics import compare, ctc_agreement, ctc_greedy_decode, default_threshold


def one_hot(seq: list[int], classes: int = 5, low: float = 0.1) -> np.ndarray:
    """(T, C) scores whose argmax per timestep is ``seq``."""
    out = np.full((len(seq), classes), low, np.float32)
    out[np.arange(len(seq)), seq] = 1.0
    return out


def test_greedy_decode_collapses_repeats_and_drops_blank():
    # 1 1 | blank | 1 -> "1 1" (a blank separates a real repeat); 2 2 2 -> one 2; leading/trailing blanks go
    p = one_hot([0, 1, 1, 0, 1, 2, 2, 2, 0, 3])
    assert ctc_greedy_decode(p) == [(1, 1, 2, 3)]
    assert ctc_greedy_decode(p, blank=3) == [(0, 1, 0, 1, 2, 0)]
    assert ctc_greedy_decode(one_hot([0, 0, 0])) == [()]
    batch = np.stack([one_hot([1, 2]), one_hot([2, 2])])  # (N, T, C): one sequence per row
    assert ctc_greedy_decode(batch) == [(1, 2), (2,)]
    with pytest.raises(ValueError, match="rank|shape"):
        ctc_greedy_decode(np.zeros(5))


def test_agreement_counts_decoded_strings_not_timesteps():
    ref = np.stack([one_hot([1, 1, 0, 2]), one_hot([3, 0, 4, 4])])
    # row 0: one timestep changes (1 1 -> 1 0) but the decoding stays (1, 2); row 1: a character changes
    got = np.stack([one_hot([1, 0, 0, 2]), one_hot([3, 0, 2, 4])])
    assert ctc_agreement(ref, got) == 0.5
    c = compare(ref, got)
    assert c.ctc_agreement == 0.5 and c.cosine < 1.0
    assert c.judge("ctc_greedy", 0.5) and not c.judge("ctc_greedy", 1.0)
    same = compare(ref[:1], got[:1])
    assert same.ctc_agreement == 1.0 and same.judge("ctc_greedy", 1.0) and not same.passes(0.999)
    assert default_threshold("ctc_greedy", 0.98) == 1.0


def test_rank1_output_has_no_ctc_agreement_and_fails_the_metric():
    c = compare(np.arange(4, dtype=np.float32), np.arange(4, dtype=np.float32))
    assert math.isnan(c.ctc_agreement) and not c.judge("ctc_greedy", 0.0)


# ---- from the YAML ------------------------------------------------------------------------------------


def _sequence_model(path, flip: bool = False):
    """x (1, 6, 4) -> MatMul W (4, 5) -> Softmax(-1) -> probs (1, 6, 5): a 6-step, 5-class sequence."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 5)).astype(np.float32) * 3
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"])],
        "seq", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 6, 4])],
        [helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [1, 6, 5])],
        [onnx.numpy_helper.from_array(w, "w")]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def _yaml(tmp_path, *extra: str):
    import hashlib

    onnx_path = _sequence_model(tmp_path / "seq.onnx")
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    text = ("library_name: seq\ntarget_abis: [host]\nmodels:\n  seq:\n    platform: onnx\n"
            f"    model_file_path: {onnx_path}\n    model_sha256_checksum: {sha}\n    runtime: cpu\n"
            "    subgraphs:\n      - input_tensors: x\n        input_shapes: 1,6,4\n"
            "        input_data_formats: NONE\n        input_ranges: -1,1\n        output_tensors: probs\n"
            "        output_shapes: 1,6,5\n        output_data_formats: NONE\n"
            + "".join(f"        {line}\n" for line in extra))
    path = tmp_path / "seq.yml"
    path.write_text(text)
    return path


def test_yaml_ctc_greedy_validates_a_sequence_output(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    y = _yaml(tmp_path, "validation_outputs_metric: ctc_greedy")
    assert cli("convert", "--config", y).code == 0
    res = cli("run", "--config", y, "--validate", "--backend", "reference")
    assert res.code == 0, res.out + res.err
    row = next(ln for ln in res.out.splitlines() if "ctc_greedy>=1" in ln)
    assert row.split()[-1] == "100.0%", row  # the CTC column: every sequence decoded alike


@pytest.mark.parametrize("line, needle", [
    ("validation_outputs_metric: ctc", "validation_outputs_metric"),
    ("validation_outputs_metric: CTC_greedy_beam", "validation_outputs_metric"),
])
def test_unknown_metric_name_exits_2(tmp_path, monkeypatch, cli, line, needle):
    monkeypatch.chdir(tmp_path)
    res = cli("convert", "--config", _yaml(tmp_path, line))
    assert res.code == 2 and needle in res.err and "ctc_greedy" in res.err and "Traceback" not in res.err, res.err
    assert not (tmp_path / "build").exists()


# ---- the OCR benchmark data: calibration and evaluation disjoint ---------------------------------------


def test_ocr_split_is_disjoint_and_deterministic(tmp_path):
    from qmace_zoo.ocr import phrases_from, split_of, split_pools

    src = tmp_path / "copyright"
    words = [f"phrase number {i} of the test" for i in range(200)]
    src.write_text("\n".join(words + words[:50]))  # 50 phrases listed twice
    phrases = phrases_from([src])
    assert len(phrases) == 200  # deduplicated
    photos = [str(tmp_path / f"photo{i}.jpg") for i in range(40)]
    pools = split_pools(phrases, photos)
    (ct, cp), (et, ep) = pools["calib"], pools["eval"]
    assert not {t for t, _ in ct} & {t for t, _ in et}
    assert not set(cp) & set(ep)
    assert len(ct) + len(et) == 200 and len(cp) + len(ep) == 40
    assert 20 <= len(ct) <= 80  # about a quarter (first sha256 byte < 64)
    assert all(split_of(t) == "calib" for t, _ in ct) and split_pools(phrases, photos) == pools
    # the charset filter drops phrases with characters the recognizer cannot output
    assert phrases_from([src], set("prase numbr0123456789 oft")) == []  # no "h"
    assert len(phrases_from([src], set("phrase numbr0123456789 oft"))) == 200


def test_page_line_boxes_finds_lines_and_words():
    from qmace_zoo.ocr import MAX_ASPECT, page_line_boxes

    page = np.full((120, 400), 200, np.uint8)
    for top in (20, 70):  # two text lines of "words" 30 px wide, 10 px apart, 16 px high
        for x in range(10, 390, 40):
            page[top:top + 16, x:x + 30] = 30
    boxes = page_line_boxes(page)
    assert {b[1] for b in boxes} == {16, 66} and {b[3] for b in boxes} == {40, 90}
    assert all(b[2] - b[0] <= MAX_ASPECT * (b[3] - b[1]) for b in boxes)
    # every word is inside exactly one crop
    for top in (20, 70):
        for x in range(10, 390, 40):
            assert sum(b[0] <= x and x + 30 <= b[2] and b[1] <= top < b[3] for b in boxes) == 1


def test_vectorized_agreement_matches_decoding_each_sequence():
    rng = np.random.default_rng(0)
    ref = rng.random((2, 40, 12, 4))  # leading axes (2, 40): 80 sequences of 12 steps
    got = ref.copy()
    got[rng.random((2, 40, 12)) < 0.1] += 2 * rng.random(4)  # change some timesteps
    per_seq = [a == b for a, b in zip(ctc_greedy_decode(ref), ctc_greedy_decode(got))]
    assert 0 < sum(per_seq) < len(per_seq)  # both kinds present, so the comparison means something
    assert ctc_agreement(ref, got) == np.mean(per_seq)
    for blank in (1, 3):
        assert ctc_agreement(ref, got, blank) == np.mean(
            [a == b for a, b in zip(ctc_greedy_decode(ref, blank), ctc_greedy_decode(got, blank))])
