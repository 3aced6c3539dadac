"""Hot paths as ops: a public dispatcher per op, a PyTorch reference, a Triton kernel
and a fast CPU path (layout of generative-recommenders' ``ops``)."""

from kernels.encode_tables import EncodeTables, build_encode_tables
from kernels.multiscale_encode import (EncodeKernel, multiscale_encode,
                                       validate_multiscale_encode_inputs)

__all__ = ["EncodeKernel", "EncodeTables", "build_encode_tables", "multiscale_encode",
           "validate_multiscale_encode_inputs"]
