"""Hand-written kernel sources of adam-gpu (installed as ``adam_gpu.kernels``).

Kernels hold math and memory access only: argument checking and dispatch live in ``adam_gpu``.
Importing a kernel module applies ``@triton.jit``; only the backends import them, lazily.
"""
