"""torch.library custom ops (namespace ``nvfp4lib``) with fake implementations, and their dispatch:
an exact torch reference on CPU, CuTeDSL kernels on sm_90 (and sm_100 where compiled).

Importing a submodule registers its ops: ``torch.ops.nvfp4lib.<name>``.
"""
