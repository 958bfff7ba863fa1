"""Quantization-aware training (needs PyTorch: ``pip install 'qmace[qat]'``).

``prepare`` turns a converted float graph plus calibrated ranges into a ``torch.nn.Module`` that simulates
exactly the quantized model ``quantize_graph`` would produce (docs/qat.md). Importing this package does not
import torch; the functions below import it on first use.
"""

from __future__ import annotations

__all__ = ["QATJob", "QATModule", "export_qat", "fit", "prepare", "run_qat", "train"]


def __getattr__(name: str):
    if name in ("QATModule", "prepare", "export_qat"):
        from qmace.qat import module

        return getattr(module, name)
    if name in ("train", "fit"):
        from qmace.qat.trainer import fit, train

        return fit if name == "fit" else train
    if name in ("QATJob", "run_qat"):
        from qmace.qat.job import QATJob, run_qat

        return QATJob if name == "QATJob" else run_qat
    raise AttributeError(name)
