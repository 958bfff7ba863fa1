"""Quantization-aware training (needs PyTorch: ``pip install 'qmace[qat]'``).

``prepare`` turns a converted float graph plus calibrated ranges into a ``torch.nn.Module`` that simulates
exactly the quantized model ``quantize_graph`` would produce (docs/qat.md). Importing this package does not
import torch; the functions below import it on first use.
"""

from __future__ import annotations

__all__ = ["QATModule", "export_qat", "prepare", "train"]


def __getattr__(name: str):
    if name in ("QATModule", "prepare", "export_qat"):
        from qmace.qat import module

        return getattr(module, name)
    if name == "train":
        from qmace.qat.train import train

        return train
    raise AttributeError(name)
