"""Hopper (sm_90a) CuTeDSL kernels: activation scale assembly, the W4A16 GEMM (decode and prefill)."""
