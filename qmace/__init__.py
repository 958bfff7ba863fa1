"""qmace: MACE-compatible model converter, 8-bit quantization toolkit and CPU runtime."""

__version__ = "0.1.0"
