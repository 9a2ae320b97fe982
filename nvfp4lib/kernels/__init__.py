"""GPU kernels, one folder per architecture (sm90: Hopper, sm100: Blackwell), written in CuTeDSL.

Nothing here is imported by ``import nvfp4lib``: the op layer imports a kernel module only when it
dispatches to it, so the package works without nvidia-cutlass-dsl installed.
"""
