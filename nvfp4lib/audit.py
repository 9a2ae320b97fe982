"""Input-scale audit: does a checkpoint's static ``input_scale`` fit the activations that really arrive?

A ModelOpt ``input_scale`` is a decode multiplier, ``amax_calibration / (6 * 448)``. When the real
activations are larger than the calibration saw (or an engine mixes the scale up with its reciprocal),
every block scale ``amax_block / 6 / input_scale`` overshoots E4M3's 448: with a *saturating* cast the
scale sticks at 448 and the values clip at +-6 (a large but finite error); with a *non-saturating* cast
(``cvt.rn`` without ``.satfinite``, older torch) the scale becomes NaN and so does every output that
touches it. The serving-engine report behind this module saw a 3977x amplification and NaN output.

- :func:`audit_input_scale`: the amplification factor, saturated-block and clipped-element fractions,
  NaN / Inf counts and the round-trip error, for a checkpoint scale and sample activations.
- :func:`e4m3_cast`, :func:`quantize_with_cast`: the saturating and non-saturating casts side by side.
- :func:`amplified_activations`: synthetic activations whose amax is ``factor`` times the calibration.
- :func:`padded_scale_buffer`, :func:`emulated_blockscaled_gemm`: zero-filled versus uninitialised scale
  padding, and what a block-scaled GEMM (emulated exactly in fp32) makes of each.

A zero, negative, NaN or Inf ``input_scale`` is a ``ValueError`` naming the tensor, never a silent NaN.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .formats import (
    BLOCK_SIZE,
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_NORMAL,
    GLOBAL_SCALE_DENOMINATOR,
    check_global_scale,
    e2m1_decode,
    e2m1_encode,
    pack_nibbles,
    unpack_nibbles,
)
from .layout import padded_rows, padded_scale_cols, swizzle_scales, unswizzle_scales

# E4M3FN has no Inf: 448 is the largest finite value, 480 would need the NaN encoding. Round to
# nearest even sends magnitudes up to 464 (the midpoint, a tie that goes to 448's even mantissa) to
# 448 and anything above to NaN when the cast does not saturate.
E4M3_NONSATURATING_LIMIT = 464.0


@dataclass
class InputScaleAudit:
    """What a static input_scale does to sample activations (all fractions in [0, 1])."""

    name: str
    input_scale: float  # the checkpoint's decode multiplier
    calibrated_scale: float  # amax(samples) / (6 * 448): what the samples would need
    amplification: float  # calibrated_scale / input_scale; > 1 means the blocks saturate
    saturated_block_fraction: float  # blocks whose scale amax_block / 6 / input_scale clamps at 448
    clipped_element_fraction: float  # elements beyond 6 * 448 * input_scale: no block scale reaches them
    nonfinite_inputs: int  # NaN or Inf among the samples
    relative_error: float  # ||dequant(quant(x)) - x|| / ||x|| with the checkpoint scale (saturating)
    relative_error_calibrated: float  # the same with the calibrated scale, for comparison

    def as_dict(self) -> dict:
        return asdict(self)


def e4m3_cast(values: torch.Tensor, saturating: bool = True) -> torch.Tensor:
    """fp32 values -> float8_e4m3fn, either saturating at +-448 (what our quantizers do, explicitly) or
    as a non-saturating cast: magnitudes above 464 become NaN (E4M3FN has no Inf). NaN stays NaN."""
    values = values.float()
    clamped = torch.clamp(values, -E4M3_MAX, E4M3_MAX)
    if saturating:
        return clamped.to(torch.float8_e4m3fn)
    overflow = values.abs() > E4M3_NONSATURATING_LIMIT
    return torch.where(overflow, torch.full_like(values, float("nan")), clamped).to(torch.float8_e4m3fn)


def block_scale_ratio(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [..., K/16]: amax_block / 6 / global_scale, the block scale before clamping and casting."""
    block_amax = x.float().reshape(*x.shape[:-1], -1, BLOCK_SIZE).abs().amax(dim=-1)
    return block_amax / E2M1_MAX / global_scale.float()


def quantize_with_cast(x: torch.Tensor, global_scale, saturating: bool = True):
    """NVFP4 quantization of x [..., K] with the chosen E4M3 cast for the block scales (no checks on the
    result: this function exists to show what a non-saturating cast does).

    Returns (packed uint8 [..., K/2], block_scale e4m3 [..., K/16], dequantized fp32 [..., K]).
    With ``saturating=True`` the bytes equal :func:`nvfp4lib.formats.quantize`.
    """
    global_scale = check_global_scale(global_scale).to(x.device)
    ratio = block_scale_ratio(x, global_scale)
    block_scale = e4m3_cast(torch.clamp(ratio, min=E4M3_MIN_NORMAL), saturating)
    reciprocal = (1.0 / global_scale) / block_scale.float()
    blocks = x.float().reshape(*ratio.shape, BLOCK_SIZE)
    codes = e2m1_encode(torch.clamp(blocks * reciprocal.unsqueeze(-1), -E2M1_MAX, E2M1_MAX))
    packed = pack_nibbles(codes.reshape(*x.shape))
    decoded = e2m1_decode(codes) * block_scale.float().unsqueeze(-1) * global_scale
    return packed, block_scale, decoded.reshape(x.shape)


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-30))


def audit_input_scale(input_scale, activations: torch.Tensor, name: str = "input_scale") -> InputScaleAudit:
    """Audit a checkpoint ``input_scale`` (decode multiplier) against sample activations [..., K].

    Raises ValueError naming ``name`` for a zero, negative, NaN or Inf scale, or a K not a multiple of 16.
    NaN / Inf in the activations are counted (``nonfinite_inputs``), and the other numbers are computed
    over the finite part.
    """
    scale = check_global_scale(input_scale, name)
    if activations.dim() == 0 or activations.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"activations for {name}: K must be a multiple of {BLOCK_SIZE}, got shape {tuple(activations.shape)}")
    x = activations.float()
    finite = torch.isfinite(x)
    nonfinite = int((~finite).sum())
    x = torch.where(finite, x, torch.zeros_like(x))
    amax = x.abs().amax()
    calibrated = float(amax) / GLOBAL_SCALE_DENOMINATOR if float(amax) > 0 else 1.0
    ratio = block_scale_ratio(x, scale)
    saturated = ratio > E4M3_MAX
    # The recipe itself clips a little (a block scale rounded down to E4M3 pushes its largest element just
    # past 6); what the input scale clips is everything beyond the largest representable value.
    clipped = x.abs() > GLOBAL_SCALE_DENOMINATOR * scale
    _, _, decoded = quantize_with_cast(x, scale, saturating=True)
    _, _, decoded_calibrated = quantize_with_cast(x, calibrated, saturating=True)
    return InputScaleAudit(
        name=name,
        input_scale=float(scale),
        calibrated_scale=calibrated,
        amplification=calibrated / float(scale),
        saturated_block_fraction=float(saturated.float().mean()),
        clipped_element_fraction=float(clipped.float().mean()),
        nonfinite_inputs=nonfinite,
        relative_error=_relative_error(decoded, x),
        relative_error_calibrated=_relative_error(decoded_calibrated, x),
    )


def amplified_activations(m: int, k: int, calibration_amax: float, factor: float, generator: Optional[torch.Generator] = None, dtype=torch.bfloat16) -> torch.Tensor:
    """Synthetic activations [m, k]: Gaussian body scaled so the calibration amax covers it, plus a few
    outlier channels (as LLM activations have) whose amax is ``factor * calibration_amax``.

    With ``input_scale = calibration_amax / 2688`` the audit's amplification is ``factor`` (to bf16
    rounding).
    """
    body = torch.randn(m, k, generator=generator) * (calibration_amax / 4.0)
    body = body.clamp(-calibration_amax, calibration_amax)
    channels = torch.randperm(k, generator=generator)[: max(1, k // 256)]
    outliers = torch.rand(m, channels.numel(), generator=generator) * factor * calibration_amax
    signs = torch.where(torch.rand(m, channels.numel(), generator=generator) < 0.5, -1.0, 1.0)
    body[:, channels] = outliers * signs
    body[0, channels[0]] = factor * calibration_amax  # pin the amax exactly
    return body.to(dtype)


def amplification_sweep(x: torch.Tensor, factors, saturating: bool = True) -> list:
    """For each mismatch factor f, quantize x with input_scale = amax(x) / 2688 / f (a checkpoint
    scale f times too small) and report the round-trip relative error and the NaN fraction.

    Returns a list of dicts {factor, relative_error, nan_fraction, saturated_block_fraction}.
    """
    amax = float(x.float().abs().amax())
    rows = []
    for factor in factors:
        scale = torch.tensor(amax / GLOBAL_SCALE_DENOMINATOR / float(factor))
        _, block_scale, decoded = quantize_with_cast(x, scale, saturating)
        nan = torch.isnan(decoded)
        finite_error = _relative_error(torch.where(nan, torch.zeros_like(decoded), decoded), x) if not bool(nan.all()) else float("nan")
        rows.append(
            dict(
                factor=float(factor),
                relative_error=float("nan") if bool(nan.any()) else finite_error,
                nan_fraction=float(nan.float().mean()),
                saturated_block_fraction=float((block_scale_ratio(x, scale) > E4M3_MAX).float().mean()),
            )
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Scale padding: zero-filled versus uninitialised
# ----------------------------------------------------------------------------------------------
def padded_scale_buffer(block_scale: torch.Tensor, fill: str = "zero", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Swizzle block scales e4m3 [M, K/16] into a 128x4 buffer whose padding is ``"zero"`` (correct) or
    ``"uninitialised"`` (emulated with random bytes, as ``torch.empty`` memory that held anything:
    about 1 in 128 of them is an E4M3 NaN, 0x7f / 0xff). Returns the flat e4m3 buffer [Mp*K16p]."""
    if fill not in ("zero", "uninitialised"):
        raise ValueError(f"fill must be 'zero' or 'uninitialised', got {fill!r}")
    swizzled = swizzle_scales(block_scale).view(torch.uint8).clone()
    if fill == "uninitialised":
        m, k16 = block_scale.shape
        is_padding = torch.ones(padded_rows(m), padded_scale_cols(k16), dtype=torch.bool)
        is_padding[:m, :k16] = False
        padding = swizzle_scales(is_padding.to(torch.uint8)).bool()
        garbage = torch.randint(0, 256, swizzled.shape, generator=generator, dtype=torch.int64).to(torch.uint8)
        swizzled = torch.where(padding, garbage, swizzled)
    return swizzled.view(torch.float8_e4m3fn)


def emulated_blockscaled_gemm(packed: torch.Tensor, swizzled_scale: torch.Tensor, global_scale, weight: torch.Tensor, packed_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What a block-scaled GEMM over the *padded* tile computes, exactly in fp32.

    packed: uint8 [M, K/2]; swizzled_scale: e4m3 [Mp*K16p]; weight: [N, K] (bf16/fp32).
    The GEMM runs over all Mp rows and K16p*16 columns: padded activation data is zero (or
    ``packed_padding``, uint8 [Mp, K16p*8], when given), multiplied by whatever the padded scales hold.
    Returns fp32 [Mp, N]: rows >= M are the padding rows a kernel computes and a caller may consume.
    """
    m, half_k = packed.shape
    k = half_k * 2
    mp, k16p = padded_rows(m), padded_scale_cols(k // BLOCK_SIZE)
    scales = unswizzle_scales(swizzled_scale, mp, k16p * BLOCK_SIZE).float()  # [Mp, K16p], padding included
    data = torch.zeros(mp, k16p * BLOCK_SIZE // 2, dtype=torch.uint8) if packed_padding is None else packed_padding.clone()
    data[:m, :half_k] = packed
    values = e2m1_decode(unpack_nibbles(data)).reshape(mp, k16p, BLOCK_SIZE) * scales.unsqueeze(-1)
    padded_weight = torch.zeros(weight.shape[0], k16p * BLOCK_SIZE)
    padded_weight[:, :k] = weight.float()
    return (values.reshape(mp, -1) @ padded_weight.t()) * float(check_global_scale(global_scale))
