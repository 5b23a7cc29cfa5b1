"""Quantization Lab: the shared code behind the notebooks."""
__version__ = "0.1.0"
