"""Fixed weight quantization parameters (``Graph.fixed_params``) through weight rescaling.

A fake-quantized weight ``w = scale[m] * (q - zp[m])`` multiplied per output channel by ``s[m]`` (BatchNorm
or a per-channel Mul folded into the Conv) is ``w' = (scale[m] * |s[m]|) * (sign(s[m]) * q)`` when
``zp == 0``: the same integer grid, negated where ``s[m] < 0`` (a symmetric code range is closed under
negation). So the parameters become per channel along axis 0 with scales ``scale * |s|`` and quantizing
``w'`` with them gives back ``±q``. Asymmetric parameters cannot follow a negative factor: they are dropped
and the quantizer derives new ones.
"""

from __future__ import annotations

import logging

import numpy as np

from qmace.ir import Graph
from qmace.qmath import QuantParams

log = logging.getLogger(__name__)


def rescale_weight_params(graph: Graph, old: str, new: str, s: np.ndarray) -> None:
    """Record parameters for ``new = old * s[m]`` (per output channel, axis 0) if ``old`` had any.

    Symmetric parameters become per channel along axis 0 with scales ``scale * |s|`` (module docstring);
    asymmetric ones, or a zero factor, are not carried over (logged).

    Args:
        graph: the graph whose ``fixed_params`` are updated.
        old: the weight before rescaling.
        new: the rescaled weight.
        s: the per-output-channel factors.
    """
    params = graph.fixed_params
    if old not in params:
        return
    qp = params[old]
    m = len(s)
    if np.any(qp.zero_point != 0) or (qp.axis not in (None, 0)) or np.any(s == 0):
        log.info("fixed parameters of weight %r do not survive its rescaling; the quantizer derives new ones", old)
        return
    scale = np.broadcast_to(qp.scale, (m,)).astype(np.float64) * np.abs(s)
    params[new] = QuantParams(scale.astype(np.float32), np.zeros(m, np.int32), qp.dtype, 0, qp.narrow_range)
