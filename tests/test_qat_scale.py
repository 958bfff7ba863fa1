"""QAT at scale: data-parallel processes (torch.distributed, gloo), resumable checkpoints, validation with
early stopping, learning-rate schedule, device checks."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

from qmace.cli.main import main
from qmace.quantize.ranges import read_range_file
from tests.test_qat import _converted, _inputs, _model, _prepare, _qat_workspace


@pytest.fixture(scope="module")
def setup():
    return _converted(_model())


def _weights(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


def _labelled_workspace(tmp_path, n_val: int = 0):
    d = _qat_workspace(tmp_path)
    for i, x in enumerate(_inputs(2, 22)):  # 8 training samples: two global batches of 4
        np.save(d / f"x_{6 + i}.npy", x)
    (tmp_path / "labels.txt").write_text("".join(f"{i % 5}\n" for i in range(8)))
    if n_val:
        v = tmp_path / "val"
        v.mkdir()
        for i, x in enumerate(_inputs(n_val, 23)):
            np.save(v / f"x_{i}.npy", x)
        (tmp_path / "val_labels.txt").write_text("".join(f"{(3 * i) % 5}\n" for i in range(n_val)))
    return d


def _qat_args(tmp_path, d, out, *extra):
    return ["qat", "--config", str(tmp_path / "m.yml"), "--train_dir", str(d), "--labels",
            str(tmp_path / "labels.txt"), "--batch_size", "4", "--lr", "1e-3", "--range_lr", "1e-2",
            "--output_dir", str(out), "--threads", "1", *extra]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, capsys):
    """2 gloo processes x 2 samples per step == 1 process x 4 samples: the same learned ranges and weights.
    Tolerance: absolute 2e-5 for ranges and 1e-6 for weights, and at most 1% of how far training moved each
    value (measured here: <= 5e-6 / 0.2% for ranges, <= 1.5e-7 for weights). Not bit-exact: DDP averages the
    per-rank gradients, a different float summation order, which Adam's normalisation amplifies for small
    gradients. The ranks agree with each other bit for bit (rank 0's ranges are broadcast each step)."""
    d = _labelled_workspace(tmp_path)
    runs = {}
    for n, epochs in ((1, 2), (2, 2), (1, 0)):
        out = tmp_path / f"p{n}e{epochs}"
        workers = ["--workers", "1"] if n == 2 else []  # worker processes do not change the data order
        rc = main(_qat_args(tmp_path, d, out, "--epochs", str(epochs), "--nproc", str(n), *workers))
        text = capsys.readouterr().out
        assert rc == 0, text
        assert f"{n} process(es)" in text
        runs[n, epochs] = (read_range_file(out / "m_qat.ranges"), _weights(out / "m_qat.onnx"))
    (r1, w1), (r2, w2), (r0, w0) = runs[1, 2], runs[2, 2], runs[1, 0]
    assert sorted(r1) == sorted(r2) and sorted(w1) == sorted(w2)
    moved_r = moved_w = 0.0
    for k in r1:
        one, two, start = (np.array([r[k].min, r[k].max]) for r in (r1, r2, r0))
        np.testing.assert_allclose(two, one, rtol=0, atol=2e-5, err_msg=k)
        assert np.all(np.abs(two - one) <= 0.01 * np.abs(one - start) + 1e-12), k
        moved_r = max(moved_r, float(np.abs(one - start).max()))
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-6, err_msg=k)
        moved_w = max(moved_w, float(np.abs(w1[k] - w0[k]).max()))
    assert moved_r > 1e-3 and moved_w > 1e-3  # training did move both


KILLER = """
import os, signal, sys
import qmace.cli.qat as q
shown = q.print_epoch
def print_and_die(rep):
    shown(rep)
    if rep.epoch == 1:  # the checkpoint of epoch 1 is on disk: die as a killed job would
        os.kill(os.getpid(), signal.SIGKILL)
q.print_epoch = print_and_die
from qmace.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_same_result(tmp_path, capsys):
    d = _labelled_workspace(tmp_path)
    rc = main(_qat_args(tmp_path, d, tmp_path / "straight", "--epochs", "3", "--warmup", "0.2"))
    assert rc == 0
    capsys.readouterr()
    out = tmp_path / "killed"
    args = _qat_args(tmp_path, d, out, "--epochs", "3", "--warmup", "0.2")
    p = subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == -9, p.stderr
    assert "qat epoch 1/3" in p.stdout and (out / "m_qat.ckpt").is_file() and not (out / "m_qat.ranges").exists()
    rc = main(args + ["--resume"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "qat epoch 2/3" in text and "qat epoch 1/3" not in text
    assert (out / "m_qat.ranges").read_text() == (tmp_path / "straight" / "m_qat.ranges").read_text()
    ws, wk = _weights(tmp_path / "straight" / "m_qat.onnx"), _weights(out / "m_qat.onnx")
    assert all(np.array_equal(ws[k], wk[k]) for k in ws)
    assert main(_qat_args(tmp_path, d, tmp_path / "none", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_early_stopping_keeps_the_best_state(setup):
    """validate() scores 0.5 (start), then 0.7, 0.6, 0.65: with patience 2 training stops after epoch 3 and
    the module holds epoch 1's state."""
    from qmace.qat.trainer import fit

    graph, ranges = setup
    xs = [torch.from_numpy(x) for x in _inputs(4, 3)]
    batches = [(torch.cat(xs[:2]), torch.tensor([0, 1])), (torch.cat(xs[2:]), torch.tensor([2, 3]))]
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.9])
    states = []

    def validate(module):
        states.append({k: v.clone() for k, v in module.state_dict().items()})
        return next(scores)

    m = _prepare(graph, ranges, "int8")
    res = fit(m, batches, epochs=6, lr=1e-3, range_lr=1e-2, validate=validate, patience=2)
    assert res.stopped_early and res.epochs_run == 3 and res.best_epoch == 1
    assert res.start_metric == 0.5 and res.best_metric == 0.7 and res.metrics == [0.7, 0.6, 0.65]
    final = m.state_dict()
    assert all(torch.equal(final[k], states[1][k]) for k in final)
    assert not all(torch.equal(final[k], states[3][k]) for k in final)


def test_cli_val_dir_reports_float_ptq_qat_and_exports_the_best(tmp_path, capsys):
    """--val_dir: per-epoch validation of the quantized model, a one-line summary; the exported model scores
    exactly the reported QAT accuracy, which is never below the PTQ start (the start is a candidate)."""
    from qmace.api import convert
    from qmace.runtime import Session

    d = _labelled_workspace(tmp_path, n_val=10)
    out = tmp_path / "out"
    rc = main(_qat_args(tmp_path, d, out, "--epochs", "4", "--val_dir", str(tmp_path / "val"), "--val_labels",
                        str(tmp_path / "val_labels.txt"), "--patience", "1", "--lr_schedule", "cosine"))
    text = capsys.readouterr().out
    assert rc == 0, text
    line = next(ln for ln in text.splitlines() if ln.startswith("qat summary"))
    assert "accuracy %" in line and "10 validation samples" in line
    vals = {k: float(line.split(f"{k} ")[1].split()[0]) for k in ("float", "PTQ", "QAT")}
    assert vals["QAT"] >= vals["PTQ"]
    lines = text.splitlines()
    gate = lines[lines.index(line) + 1]  # the significance gate's decision follows the summary
    assert "the start significantly on the validation set" in gate or gate.startswith("QAT: no trained state")
    summary = json.loads((out / "m_qat.json").read_text())
    assert summary["gate"]["samples"] == 10
    if summary["gate"]["kept_start"]:
        assert vals["QAT"] == vals["PTQ"] and summary["best_epoch"] == 0
    assert text.count("validation ") >= 1
    res = convert(out / "m_qat.yml", build_dir=tmp_path / "build")
    s = Session(res.graph)
    labels = [(3 * i) % 5 for i in range(10)]
    pred = [int(np.argmax(s.run({"x": x})["y"])) for x in _inputs(10, 23)]
    assert abs(100 * np.mean(np.array(pred) == labels) - vals["QAT"]) < 1e-9


def test_cli_distill_sigmoid_trains_the_logits_of_the_output_sigmoid(tmp_path, capsys):
    """--distill sigmoid (no labels): the per-element loss on the logits the output Sigmoid reads; the run
    exports a model and says which objective it used; with --labels it is a one-line error."""
    d = _labelled_workspace(tmp_path)
    out = tmp_path / "out"
    args = ["qat", "--config", str(tmp_path / "m.yml"), "--train_dir", str(d), "--batch_size", "4", "--lr", "1e-3",
            "--output_dir", str(out), "--threads", "1", "--epochs", "2", "--distill", "sigmoid"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "m_qat.json").read_text())
    assert summary["objective"] == "distillation from the float model (per-element sigmoid maps)"
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    capsys.readouterr()
    assert main([*args, "--labels", str(tmp_path / "labels.txt"), "--output_dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "--distill sigmoid is a distillation loss" in err and err.count("\n") == 1
    assert not (tmp_path / "o2").exists()
    assert main([*args[:-1], "mse", "--output_dir", str(tmp_path / "o3")]) == 2  # the names live in losses.py
    err = capsys.readouterr().err
    assert "--distill mse: choose from softmax, sigmoid" in err and err.count("\n") == 1
    assert not (tmp_path / "o3").exists()


def test_sigmoid_logits_names_the_output_that_is_no_sigmoid(setup):
    from qmace.errors import ModelError
    from qmace.qat.job import sigmoid_logits

    graph, _ = setup
    assert sigmoid_logits(graph) == [graph.producers()[graph.outputs[0]].inputs[0]]
    g = graph.copy()
    sig = g.producers()[g.outputs[0]]
    g.outputs = [sig.inputs[0]]  # the Gemm's logits as the output
    with pytest.raises(ModelError, match=r"output '.+' is made by node '.+' \(Gemm\), not by a Sigmoid"):
        sigmoid_logits(g)


def test_lr_schedule_warmup_then_cosine():
    from qmace.qat.trainer import lr_factor

    f = [lr_factor(k, 10, "cosine", 0.2) for k in range(10)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == 1.0 and all(a > b for a, b in itertools.pairwise(f[2:])) and 0 < f[-1] < 0.05
    assert [lr_factor(k, 4, "constant", 0.5) for k in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_bad_device_and_batch_are_one_line_errors(tmp_path, capsys):
    d = _labelled_workspace(tmp_path)
    if not torch.cuda.is_available():
        assert main(_qat_args(tmp_path, d, tmp_path / "o", "--device", "cuda")) == 2
        err = capsys.readouterr().err
        assert "CUDA is not available" in err and err.count("\n") == 1
    assert main(_qat_args(tmp_path, d, tmp_path / "o", "--nproc", "3")) == 2
    assert "multiple of the number of processes" in capsys.readouterr().err
    assert main(_qat_args(tmp_path, d, tmp_path / "o", "--device", "tpu")) == 2
    assert not (tmp_path / "o").exists()
    capsys.readouterr()
    for alpha, shown in (("0", "0.0"), ("1.5", "1.5"), ("none", "'none'")):
        assert main(_qat_args(tmp_path, d, tmp_path / "o", "--gate_alpha", alpha)) == 2
        err = capsys.readouterr().err
        assert f"--gate_alpha {shown}:" in err and err.count("\n") == 1
    for bad in ("-1", "nan"):
        assert main(_qat_args(tmp_path, d, tmp_path / "o", "--freeze_below", bad)) == 2
        err = capsys.readouterr().err
        assert "--freeze_below" in err and "a magnitude >= 0" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_two_processes_run_the_gate_on_rank_0_and_agree(tmp_path, capfd):
    """--nproc 2 with --val_dir: rank 0 validates and decides, every rank loads the decided state (a rank that
    skipped the decision's broadcast would hang); the exported model scores the reported QAT figure, which is
    the PTQ start's when the gate kept it.

    One known flake, retried once and only on its signature: in 1 of 7 full-suite runs (2026-12-02; 0 of 12
    isolated runs) a spawned rank died in C++ ("terminate called without an active exception", torch's process
    group threads) and the command exited 3. Any other failure, or the same one twice, fails the test."""
    d = _labelled_workspace(tmp_path, n_val=10)
    args = ["--epochs", "1", "--nproc", "2", "--val_dir", str(tmp_path / "val"), "--val_labels",
            str(tmp_path / "val_labels.txt")]
    out = tmp_path / "p2"
    rc = main(_qat_args(tmp_path, d, out, *args))
    captured = capfd.readouterr()
    if rc != 0 and "terminate called without an active exception" in captured.err:
        out = tmp_path / "p2_retry"
        rc = main(_qat_args(tmp_path, d, out, *args))
        captured = capfd.readouterr()
    text = captured.out
    assert rc == 0, text + captured.err  # the error line says which rank failed and how
    summary = json.loads((out / "m_qat.json").read_text())
    assert summary["world"] == 2 and summary["gate"]["samples"] == 10
    assert "the start significantly on the validation set" in text or "QAT: no trained state" in text
    assert (summary["qat_metric"] == summary["ptq_metric"]) == (summary["best_epoch"] == 0)
    assert summary["gate"]["kept_start"] or summary["best_epoch"] == summary["gate"]["candidate_epoch"]
