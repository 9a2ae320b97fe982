"""NVFP4 formats: the E2M1 and E4M3 codecs, nibble packing, quantize / dequantize.

NVFP4 stores a tensor ``x[..., K]`` as three pieces (ModelOpt checkpoint names in brackets):

- ``packed`` [``weight``]: ``uint8 [..., K/2]``, two E2M1 codes per byte, element ``2i`` in the low
  nibble and ``2i+1`` in the high nibble. E2M1 is sign | 2 exponent bits | 1 mantissa bit with the
  eight magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
- ``block_scale`` [``weight_scale``]: ``float8_e4m3fn [..., K/16]``, one per 16 consecutive elements,
  row-major (the Blackwell 128x4 swizzle lives in :mod:`nvfp4lib.layout`).
- ``global_scale`` [``weight_scale_2`` / ``input_scale``]: fp32 scalar, a *decode multiplier*:
  ``x ~= e2m1 * block_scale * global_scale``. ModelOpt sets it to ``amax / (6 * 448)``.

The quantization recipe is torchao's NVFP4 reference (``prototype/mx_formats``, 0.18), bit for bit.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# torchao clamps block scales from below at the smallest E4M3 normal (2**-6); so do we, to stay exact.
E4M3_MIN_NORMAL = torch.finfo(torch.float8_e4m3fn).tiny
GLOBAL_SCALE_DENOMINATOR = E2M1_MAX * E4M3_MAX  # 2688

# Magnitudes of the eight non-negative E2M1 codes; code | 0x8 is the negative twin.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes, with the rounding direction on an exact tie:
# round-to-nearest-even sends a tie to the code whose last bit is 0.
_E2M1_MIDPOINTS_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)  # upper neighbour has an odd code
_E2M1_MIDPOINTS_TIE_UP = (0.75, 1.75, 3.5)  # upper neighbour has an even code

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CHUNK_ELEMENTS = 1 << 18  # elements per chunk in quantize: 1 MB of fp32, cache-resident


class NVFP4Tensor(NamedTuple):
    """The three tensors of one NVFP4-quantized tensor (shapes for an input of shape [..., K])."""

    packed: torch.Tensor  # uint8 [..., K/2], element 2i in the low nibble
    block_scale: torch.Tensor  # float8_e4m3fn [..., K/16], row-major
    global_scale: torch.Tensor  # float32 [], decode multiplier


# ----------------------------------------------------------------------------------------------
# E2M1 codec
# ----------------------------------------------------------------------------------------------
def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to E2M1 codes (round to nearest, ties to even, saturating at +-6).

    x: float tensor of any shape, already divided by its scale. Returns uint8 codes (0..15) of the
    same shape, sign in bit 3; negative values that round to zero keep their sign (code 8), as
    torchao does.
    """
    magnitude = x.abs().float()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for midpoint in _E2M1_MIDPOINTS_TIE_DOWN:
        code += magnitude > midpoint
    for midpoint in _E2M1_MIDPOINTS_TIE_UP:
        code += magnitude >= midpoint
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) to fp32 values, same shape."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=code.device)
    return table[code.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (K even) -> bytes [..., K/2] with element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., K/2] -> uint8 codes [..., K], the inverse of :func:`pack_nibbles`."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def check_global_scale(global_scale, name: str = "global_scale") -> torch.Tensor:
    """Return ``global_scale`` as an fp32 0-dim tensor; ValueError unless it is one positive finite number.

    ``name`` is the tensor's name in messages (``input_scale``, ``layers.0.wq_a.weight_scale_2``, ...).
    """
    if not isinstance(global_scale, torch.Tensor):
        global_scale = torch.tensor(float(global_scale), dtype=torch.float32)
    if global_scale.numel() != 1:
        raise ValueError(f"{name} must hold one number, got shape {tuple(global_scale.shape)}")
    if not global_scale.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor, got {global_scale.dtype}")
    value = float(global_scale.float())  # one host read: the eager-mode check this function exists for
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} is not finite ({value}): it would turn every decoded value into NaN/Inf")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}: a zero or negative decode multiplier is never valid")
    return global_scale.reshape(()).float()


def _check_float_input(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be bf16, fp16 or fp32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(f"{name}: the last dimension K must be a multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}")


def _check_finite_blocks(block_amax: torch.Tensor, name: str) -> None:
    """NaN and Inf survive amax, so the block amax (16x smaller than x) tells whether x is finite."""
    if not bool(torch.isfinite(block_amax).all()):
        bad = "NaN" if bool(torch.isnan(block_amax).any()) else "Inf"
        raise ValueError(f"{name} contains {bad}: NVFP4 has no encoding for it")


def check_nvfp4_tensors(packed: torch.Tensor, block_scale: torch.Tensor, name: str = "weight") -> None:
    """ValueError unless ``packed`` uint8 [..., K/2] and ``block_scale`` e4m3 [..., K/16] belong together."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"{name}: packed E2M1 data must be uint8, got {packed.dtype}")
    if block_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name}_scale: block scales must be float8_e4m3fn, got {block_scale.dtype}")
    if packed.dim() == 0 or packed.shape[:-1] != block_scale.shape[:-1] or packed.shape[-1] != 8 * block_scale.shape[-1]:
        raise ValueError(
            f"{name}: shapes do not match: packed {tuple(packed.shape)} must be [..., K/2] and block scales "
            f"{tuple(block_scale.shape)} [..., K/16] with the same leading dimensions"
        )


# ----------------------------------------------------------------------------------------------
# Quantize / dequantize
# ----------------------------------------------------------------------------------------------
def _constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim fp32 constant on like's device, made by a fill (no host-to-device copy: capturable).

    Divisions use these instead of Python floats: on CUDA, torch turns ``t / 6.0`` into a multiply by
    the rounded reciprocal, which is not bit-exact with the CPU; ``t / tensor`` is a true division.
    """
    return torch.full((), value, dtype=torch.float32, device=like.device)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's global scale, a decode multiplier: amax / (6 * 448), fp32, same shape as amax.

    An all-zero tensor (amax 0) gets 1.0: any positive multiplier decodes its zeros exactly. Exact and
    free of host synchronisation on every device.
    """
    amax = amax.float()
    return torch.where(amax > 0, amax / _constant(GLOBAL_SCALE_DENOMINATOR, amax), torch.ones_like(amax))


def block_scales_for(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales from per-block amax (fp32 [..., K/16]) and the fp32 global scale (broadcastable).

    E4M3(clamp(amax_block / 6 / global, [2**-6, 448])); the explicit clamp matters: older torch
    casts turned values >= 480 into NaN instead of saturating.
    """
    scale = block_amax / _constant(E2M1_MAX, block_amax) / global_scale
    return torch.clamp(scale, min=E4M3_MIN_NORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_rows(x: torch.Tensor, row_global_scale: torch.Tensor):
    """The NVFP4 recipe on the rows of x [M, K], each row with its own global scale; no value checks.

    x: bf16/fp16/fp32 [M, K], K % 16 == 0; row_global_scale: fp32 [] (all rows) or [M], on x's device.
    Returns (packed uint8 [M, K/2], block_scale float8_e4m3fn [M, K/16]), row-major. Bit-exact on every
    device and free of host synchronisation (it can be captured in a CUDA graph). :func:`quantize` is
    this plus validation; the activation scale assembly uses it per MoE group.
    """
    m, k = x.shape
    k16 = k // BLOCK_SIZE
    row_global_scale = row_global_scale.float()
    per_row = row_global_scale.expand(m) if row_global_scale.dim() == 0 else row_global_scale
    inverse_global = torch.reciprocal(per_row)
    packed = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    block_scale = torch.empty(m, k16, dtype=torch.float8_e4m3fn, device=x.device)
    # Rows in cache-sized chunks: each elementwise pass then reads cache, not DRAM (3x faster on a CPU).
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, m, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        blocks = x[rows].reshape(-1, k16, BLOCK_SIZE)
        scale = block_scales_for(blocks.abs().amax(dim=-1).float(), per_row[rows, None])
        reciprocal = inverse_global[rows, None] / scale.float()
        codes = e2m1_encode(torch.clamp(blocks.float() * reciprocal.unsqueeze(-1), -E2M1_MAX, E2M1_MAX))
        packed[rows] = pack_nibbles(codes.reshape(codes.shape[0], k))
        block_scale[rows] = scale
    return packed, block_scale


def quantize(x: torch.Tensor, global_scale=None) -> NVFP4Tensor:
    """Quantize ``x`` [..., K] (bf16/fp16/fp32, K a multiple of 16) to NVFP4.

    global_scale: the fp32 decode multiplier (a float or 0-dim tensor, a checkpoint ``input_scale``
    for instance); computed as amax(|x|) / (6 * 448) when None.

    Returns ``NVFP4Tensor(packed uint8 [..., K/2], block_scale float8_e4m3fn [..., K/16],
    global_scale fp32 [])``.

    Numerics are torchao 0.18's ``nvfp4_quantize`` bit for bit: the scaled value is computed as
    ``x * ((1 / global) / block)`` (a reciprocal, then a multiply), not ModelOpt's ``x / (block *
    global)``. The two differ only when a value lands exactly on an E2M1 rounding tie (about 16 bytes in
    65,536 on random data), and there we match torchao. Block scales are clamped below at 2**-6, so an
    all-zero block gets scale 2**-6 (ModelOpt writes 1.0) and decodes to zero either way.
    """
    _check_float_input(x, "x")
    rows = x.reshape(-1, x.shape[-1])
    block_amax = rows.reshape(rows.shape[0], -1, BLOCK_SIZE).abs().amax(dim=-1)  # exact in x's dtype
    _check_finite_blocks(block_amax, "x")
    if global_scale is None:
        amax = block_amax.amax().float() if block_amax.numel() else torch.zeros((), device=x.device)
        global_scale = global_scale_from_amax(amax)
    else:
        global_scale = check_global_scale(global_scale).to(x.device)
    packed, block_scale = quantize_rows(rows, global_scale)
    lead = x.shape[:-1]
    return NVFP4Tensor(packed.reshape(*lead, -1), block_scale.reshape(*lead, -1), global_scale)


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode NVFP4 back to ``dtype`` [..., K].

    packed: uint8 [..., K/2] (a checkpoint ``weight``); block_scale: float8_e4m3fn [..., K/16]
    (``weight_scale``, row-major, not swizzled); global_scale: fp32 scalar (``weight_scale_2``).
    Computed in fp32 as ``(e2m1 * block) * global``: the first product is exact, so the result is
    rounded once to fp32 and once to ``dtype``.
    """
    check_nvfp4_tensors(packed, block_scale)
    global_scale = check_global_scale(global_scale).to(packed.device)
    block = block_scale.float()
    if not bool(torch.isfinite(block).all()):
        raise ValueError("weight_scale holds NaN bytes (0x7f/0xff): the checkpoint's block scales are corrupt")
    values = e2m1_decode(unpack_nibbles(packed))
    values = values.reshape(*block.shape, BLOCK_SIZE) * block.unsqueeze(-1)
    return (values * global_scale).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(dtype)
