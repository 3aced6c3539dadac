"""Triton kernels for the hot paths (fused encode, quantize step), with PyTorch references."""
