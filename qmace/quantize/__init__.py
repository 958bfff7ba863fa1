"""Quantization: parameters, integer arithmetic, calibration ranges and the quantization plan."""
