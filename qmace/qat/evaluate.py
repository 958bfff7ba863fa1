"""Validation metrics of QAT: the deployed (integer) model scored on held-out samples.

With labels: top-1 accuracy in % (``argmax`` of the first output over its non-batch elements), returned per
sample (100 where right, 0 where wrong: the mean is the accuracy), so that :func:`qmace.qat.trainer.fit` can
test a gain for significance (:mod:`qmace.qat.gate`). Without: SQNR in dB of the quantized model's first
output against the float model's, ``10 log10(sum(ref^2) / sum((ref - x)^2))`` over all samples, one float (a
ratio of sums is no mean of per-sample scores, so ``fit`` cannot gate it; higher is better for both). The quantized
model is ``module.quantized_graph()`` run by qmace's runtime (bit-exact with ``module(x, exact=True)``),
sample by sample, since converted graphs carry the YAML's (usually batch-1) shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from qmace.ir import Graph
from qmace.metrics import sqnr_db


def outputs(graph: Graph, samples: Sequence, threads: int | None = 1) -> np.ndarray:
    """The first output of ``graph`` on each sample, stacked as (samples, elements).

    Args:
        graph: the model (float or quantized).
        samples: samples with ``feeds`` (input name -> array).
        threads: runtime threads (None: the runtime's default).

    Returns:
        Array of shape (len(samples), output elements).
    """
    from qmace.runtime import Session

    session = Session(graph, num_threads=threads)
    out = graph.outputs[0]
    return np.stack([np.asarray(session.run(s.feeds)[out]).reshape(-1) for s in samples])


def accuracy(logits: np.ndarray, labels: Sequence[int]) -> float:
    """Top-1 accuracy in %: ``100 * mean(argmax(logits[i]) == labels[i])``.

    Args:
        logits: (samples, classes) scores.
        labels: the true class of each sample.

    Returns:
        The accuracy in percent.
    """
    return float(correct(logits, labels).mean())


def correct(logits: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Per-sample top-1 correctness in %: ``100 * (argmax(logits[i]) == labels[i])`` (its mean: :func:`accuracy`).

    Args:
        logits: (samples, classes) scores.
        labels: the true class of each sample.

    Returns:
        float64 array of 100 (right) / 0 (wrong), one per sample.
    """
    return (logits.argmax(1) == np.asarray(labels)).astype(np.float64) * 100


def validator(float_graph: Graph, samples: Sequence, labels: Sequence[int] | None,
              threads: int | None = 1) -> tuple[str, float | None, Callable]:
    """``(metric name, float model's metric or None, validate(module) -> its quantized model's scores)``:
    with labels per-sample correctness (:func:`correct`, mean = top-1 %), without the SQNR as one float.

    Args:
        float_graph: the float model (the SQNR reference without labels).
        samples: the validation samples.
        labels: their classes (accuracy), or None (SQNR against the float model).
        threads: runtime threads.

    Returns:
        The triple above; the float metric is None for SQNR (the float model is the reference).
    """
    if labels is not None:
        def validate(module) -> np.ndarray:
            return correct(outputs(module.quantized_graph(), samples, threads), labels)

        return "accuracy %", accuracy(outputs(float_graph, samples, threads), labels), validate
    ref = outputs(float_graph, samples, threads)

    def validate_sqnr(module) -> float:
        return sqnr_db(ref, outputs(module.quantized_graph(), samples, threads))

    return "SQNR dB vs float", None, validate_sqnr
