"""nvfp4lib: NVFP4 formats, the Blackwell 128x4 scale layout, scale assembly and GEMM kernels for
DeepSeek-V4-class inference. The public API is re-exported here."""
from .formats import (
    BLOCK_SIZE,
    E2M1_MAX,
    E4M3_MAX,
    NVFP4Tensor,
    check_global_scale,
    dequantize,
    e2m1_decode,
    e2m1_encode,
    global_scale_from_amax,
    pack_nibbles,
    quantize,
    quantize_rows,
    unpack_nibbles,
)
from .layout import padded_rows, padded_scale_cols, scale_offset, swizzle_scales, swizzled_size, unswizzle_scales
from .scales import GroupedScaleAssembly, ScaleAssembly, assemble_scales, assemble_scales_grouped, grouped_scale_rows
from .audit import audit_input_scale
from .checkpoint import Checkpoint, CheckpointError, save_checkpoint

__version__ = "0.1.0"
