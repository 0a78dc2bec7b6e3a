"""Compression (TensorFlow side): distillation, pruning and quantization of a trained bundle."""

from ._pipeline import QUANTIZE_CHOICES, CompressConfig, CompressResult, compress

__all__ = ["QUANTIZE_CHOICES", "CompressConfig", "CompressResult", "compress"]
