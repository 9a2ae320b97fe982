"""Activation scale assembly: bf16 activations -> NVFP4 codes + block scales in the 128x4 swizzled
layout that block-scaled GEMMs read, for one group of rows and for MoE expert groups.

One group (:func:`assemble_scales`)
    x ``[M, K]`` (bf16; fp16 / fp32 take the reference path) ->
    ``packed`` uint8 ``[M, K/2]`` (element 2i in the low nibble),
    ``swizzled_scale`` float8_e4m3fn ``[Mp * K16p]`` (flat, :func:`nvfp4lib.layout.swizzle_scales` of the
    row-major block scales, ``Mp = ceil(M/128)*128``, ``K16p = ceil(K/64)*4``, padding zero),
    ``global_scale`` fp32 ``[]`` (a decode multiplier).

Grouped (:func:`assemble_scales_grouped`)
    x ``[M, K]`` with rows already permuted by expert, ``offsets`` int ``[E+1]`` on x's device
    (group e owns rows ``offsets[e] <= r < offsets[e+1]``) ->
    ``packed`` uint8 ``[M, K/2]``,
    ``swizzled_scale`` e4m3 ``[R * K16p]``: the swizzled layout of an ``[R, K/16]`` scale matrix in which
    group e's scale rows start at row ``padded_offsets[e]`` (a multiple of 128); so group e's scales are the
    contiguous chunk ``[padded_offsets[e] * K16p, padded_offsets[e+1] * K16p)`` and equal
    ``swizzle_scales`` of that group's block scales. Padding rows and columns are zero.
    ``padded_offsets`` int32 ``[E+1]`` (computed on the device),
    ``global_scales`` fp32 ``[E]`` (one per group).
    ``R = grouped_scale_rows(M, E, capacity)`` depends only on sizes, never on the offsets' values, so
    the whole step can be captured in a CUDA graph.

Modes
    static: ``input_scale`` given (a checkpoint value, ModelOpt semantics: a decode multiplier; the
    quantizer divides by it). For the grouped op: one scalar shared by all groups or ``[E]``.
    dynamic: ``input_scale=None``; the per-tensor (per-group) amax is reduced on the device and the
    global scale is ``amax / (6 * 448)`` (1.0 for an all-zero group). No host synchronisation.

Numerics are exactly :func:`nvfp4lib.formats.quantize` (torchao 0.18's recipe) followed by
:func:`nvfp4lib.layout.swizzle_scales`, per group. The reference below divides by 0-dim *device*
tensors rather than Python numbers on purpose: on CUDA, torch computes ``t / python_float`` as
``t * (1 / python_float)``, which is not the same fp32 number, while ``t / tensor`` is a true
division on every device.

Bad input
    The public functions check in eager mode (host reads: K % 16, offsets non-decreasing, in range,
    starting at 0 and ending at M, every group within ``capacity``, input_scale positive and finite)
    and raise ``ValueError`` naming the problem. Under CUDA-graph capture or ``torch.compile`` those
    value checks are skipped (they would need a host sync); the ops then *sanitise* on the device and
    never write out of bounds: offsets are clamped to ``[0, M]``, the first is taken as 0, and they are made
    non-decreasing (running max); a group larger than ``capacity`` keeps its first ``capacity`` rows' scales and drops the
    rest; rows outside every group have their scales dropped. The reference zero-fills the packed rows
    of such dropped tokens; the kernel leaves them unwritten (their content is unspecified). Valid
    inputs never drop anything.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from .formats import BLOCK_SIZE, check_global_scale, global_scale_from_amax, quantize_rows
from .layout import ATOM_ROWS, padded_rows, padded_scale_cols, scale_offset, swizzle_scales

BACKEND_ENV = "NVFP4LIB_SCALES_BACKEND"  # "reference" forces the torch reference on every device


class ScaleAssembly(NamedTuple):
    """One group: packed uint8 [M, K/2], swizzled_scale e4m3 [Mp*K16p], global_scale fp32 []."""

    packed: torch.Tensor
    swizzled_scale: torch.Tensor
    global_scale: torch.Tensor


class GroupedScaleAssembly(NamedTuple):
    """MoE groups: packed uint8 [M, K/2], swizzled_scale e4m3 [R*K16p], padded_offsets int32 [E+1],
    global_scales fp32 [E]."""

    packed: torch.Tensor
    swizzled_scale: torch.Tensor
    padded_offsets: torch.Tensor
    global_scales: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Sizes (host arithmetic on shapes only)
# ----------------------------------------------------------------------------------------------
def grouped_scale_rows(m: int, num_groups: int, capacity: Optional[int] = None) -> int:
    """Rows R of the grouped swizzled buffer: an upper bound on sum_e ceil(rows_e / 128) * 128.

    With rows_e <= capacity and sum_e rows_e = m: sum_e ceil(rows_e/128) <= floor((m + 127 E) / 128)
    and <= E * ceil(capacity / 128); R is 128 times the smaller bound. Depends on sizes only.
    """
    if m < 0 or num_groups < 1:
        raise ValueError(f"need m >= 0 and at least one group, got m={m}, groups={num_groups}")
    capacity = m if capacity is None else capacity
    by_total = (m + (ATOM_ROWS - 1) * num_groups) // ATOM_ROWS
    by_capacity = num_groups * (padded_rows(capacity) // ATOM_ROWS)
    return ATOM_ROWS * min(by_total, by_capacity)


def kernel_backend_available(x: torch.Tensor) -> bool:
    """True when the CuTeDSL kernel serves x: bf16 on a Hopper or Blackwell GPU with CuTeDSL installed."""
    if os.environ.get(BACKEND_ENV, "") == "reference":
        return False
    if not (x.is_cuda and x.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
        return False
    from .kernels.cute_compile import cute_available

    return cute_available()


# ----------------------------------------------------------------------------------------------
# The exact reference (any device, no host synchronisation)
# ----------------------------------------------------------------------------------------------
def reference_assemble(x: torch.Tensor, input_scale: Optional[torch.Tensor]) -> ScaleAssembly:
    """The exact one-group reference (see the module docstring for shapes). No value checks."""
    _check_shapes(x)
    if input_scale is None:
        amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
        global_scale = global_scale_from_amax(amax)
    else:
        global_scale = input_scale.float().reshape(()).to(x.device)
    packed, block_scale = quantize_rows(x, global_scale)
    return ScaleAssembly(packed, swizzle_scales(block_scale), global_scale.clone())


def sanitized_offsets(offsets: torch.Tensor, m: int) -> torch.Tensor:
    """int64 [E+1]: offsets clamped to [0, m], the first taken as 0, made non-decreasing (running max).
    Valid offsets come back unchanged. On the device, no host read."""
    clamped = offsets.long().clamp(0, m)
    clamped = torch.cat((clamped.new_zeros(1), clamped[1:]))
    return torch.cummax(clamped, dim=0).values


def padded_group_offsets(offsets: torch.Tensor, m: int, capacity: int, sanitized: bool = False) -> torch.Tensor:
    """int32 [E+1]: 0, then the running sum of every group's kept rows (at most ``capacity``) rounded up
    to 128. Computed on the device from ``offsets`` [E+1] (sanitised first unless ``sanitized``)."""
    bounds = offsets if sanitized else sanitized_offsets(offsets, m)
    kept = (bounds[1:] - bounds[:-1]).clamp(max=capacity)
    padded = (kept + ATOM_ROWS - 1) // ATOM_ROWS * ATOM_ROWS
    return torch.cat((bounds.new_zeros(1), torch.cumsum(padded, 0))).to(torch.int32)


def reference_assemble_grouped(x: torch.Tensor, offsets: torch.Tensor, input_scale: Optional[torch.Tensor], capacity: int) -> GroupedScaleAssembly:
    """The exact grouped reference (see the module docstring). No host reads of tensor values."""
    _check_shapes(x)
    _check_offsets_shape(offsets, x)
    m, k = x.shape
    k16, k16p = k // BLOCK_SIZE, padded_scale_cols(k // BLOCK_SIZE)
    num_groups = offsets.numel() - 1
    total_rows = grouped_scale_rows(m, num_groups, capacity)
    bounds = sanitized_offsets(offsets, m)
    padded_offsets = padded_group_offsets(bounds, m, capacity, sanitized=True)

    rows = torch.arange(m, device=x.device)
    group = torch.searchsorted(bounds[1:], rows, right=True)  # E for rows outside every group
    local = rows - bounds[torch.clamp(group, max=num_groups - 1)]
    kept = (group < num_groups) & (local < capacity)

    if input_scale is None:
        row_amax = x.abs().amax(dim=-1).float() if k else torch.zeros(m, device=x.device)
        group_amax = torch.zeros(num_groups + 1, device=x.device).scatter_reduce(0, group, row_amax, "amax")
        global_scales = global_scale_from_amax(group_amax[:num_groups])
    else:
        global_scales = input_scale.float().to(x.device).reshape(-1).expand(num_groups).clone()
    row_global = torch.cat((global_scales, global_scales.new_ones(1)))[group]
    packed, block_scale = quantize_rows(x, row_global)
    packed = torch.where(kept[:, None], packed, torch.zeros_like(packed))

    # scatter the scale rows; dropped rows write into a trash row past the end (sliced off)
    scale_bytes = torch.zeros(total_rows * k16p + k16p, dtype=torch.uint8, device=x.device)
    dest_row = padded_offsets.long()[torch.clamp(group, max=num_groups - 1)] + local
    columns = torch.arange(k16, device=x.device)
    destination = scale_offset(dest_row[:, None], columns[None, :], k16)
    destination = torch.where(kept[:, None], destination, total_rows * k16p + columns[None, :])
    scale_bytes[destination.reshape(-1)] = block_scale.view(torch.uint8).reshape(-1)
    swizzled = scale_bytes[: total_rows * k16p].view(torch.float8_e4m3fn)
    return GroupedScaleAssembly(packed, swizzled, padded_offsets, global_scales)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _check_shapes(x: torch.Tensor) -> None:
    """Shape/dtype checks only (metadata, safe under capture and tracing)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K], got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if x.shape[1] % BLOCK_SIZE != 0 or x.shape[1] == 0:
        raise ValueError(f"x: K must be a positive multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}")


def _check_offsets_shape(offsets: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError("offsets must be a 1-D integer tensor [E+1] with E >= 1 groups")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be int32 or int64, got {offsets.dtype}")
    if offsets.device != x.device:
        raise ValueError(f"offsets must live on x's device ({x.device}), got {offsets.device}")


def _value_checks_allowed() -> bool:
    """Host reads of tensor values are fine in eager mode, not under graph capture or torch.compile."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_input_scale(input_scale, num_groups: Optional[int] = None, name: str = "input_scale") -> torch.Tensor:
    """Eager check of a static input_scale: one number (or ``num_groups`` numbers), each positive and
    finite; ValueError naming the tensor otherwise. Returns an fp32 tensor ([] or [E])."""
    if isinstance(input_scale, torch.Tensor) and input_scale.numel() > 1:
        if num_groups is None or input_scale.numel() != num_groups:
            raise ValueError(f"{name} must hold 1 value or one per group ({num_groups}), got shape {tuple(input_scale.shape)}")
        for e, value in enumerate(input_scale.reshape(-1).detach().cpu()):
            check_global_scale(value, f"{name}[{e}]")
        return input_scale.float().reshape(-1)
    return check_global_scale(input_scale, name)


def check_group_offsets(offsets: torch.Tensor, m: int, capacity: Optional[int] = None) -> None:
    """Eager check (host read) of grouped offsets [E+1]: start at 0, non-decreasing, end at m, every
    group at most ``capacity`` rows. ValueError naming the first problem."""
    values = offsets.detach().cpu().long()
    if int(values[0]) != 0:
        raise ValueError(f"offsets must start at 0, got offsets[0]={int(values[0])}")
    if bool((values < 0).any()) or bool((values > m).any()):
        bad = int(torch.nonzero((values < 0) | (values > m))[0])
        raise ValueError(f"offsets out of range [0, M={m}]: offsets[{bad}]={int(values[bad])}")
    sizes = values[1:] - values[:-1]
    if bool((sizes < 0).any()):
        bad = int(torch.nonzero(sizes < 0)[0])
        raise ValueError(f"offsets must be non-decreasing: offsets[{bad}]={int(values[bad])} > offsets[{bad + 1}]={int(values[bad + 1])}")
    if int(values[-1]) != m:
        raise ValueError(f"offsets must end at M={m} (every row in a group), got offsets[-1]={int(values[-1])}")
    if capacity is not None and bool((sizes > capacity).any()):
        bad = int(torch.argmax(sizes))
        raise ValueError(f"group {bad} has {int(sizes[bad])} rows, more than the capacity {capacity}")


# ----------------------------------------------------------------------------------------------
# Dispatch (what the torch.library ops call) and the public API
# ----------------------------------------------------------------------------------------------
def assemble_impl(x: torch.Tensor, input_scale: Optional[torch.Tensor]) -> ScaleAssembly:
    """One group: the CuTeDSL kernel where it serves x, else the exact reference."""
    _check_shapes(x)
    if kernel_backend_available(x):
        from .kernels.sm90.quantize import run_single

        return ScaleAssembly(*run_single(x, input_scale))
    return reference_assemble(x, input_scale)


def assemble_grouped_impl(x: torch.Tensor, offsets: torch.Tensor, input_scale: Optional[torch.Tensor], capacity: int) -> GroupedScaleAssembly:
    """Grouped: the CuTeDSL kernel where it serves x, else the exact reference."""
    _check_shapes(x)
    _check_offsets_shape(offsets, x)
    if kernel_backend_available(x):
        from .kernels.sm90.quantize import run_grouped

        return GroupedScaleAssembly(*run_grouped(x, offsets, input_scale, capacity))
    return reference_assemble_grouped(x, offsets, input_scale, capacity)


def _scale_tensor(input_scale, x: torch.Tensor, num_groups: Optional[int], validate: bool) -> Optional[torch.Tensor]:
    if input_scale is None:
        return None
    if validate and _value_checks_allowed():
        input_scale = check_input_scale(input_scale, num_groups)
    elif not isinstance(input_scale, torch.Tensor):
        input_scale = torch.tensor(float(input_scale), dtype=torch.float32)
    return input_scale.to(device=x.device, dtype=torch.float32)


def assemble_scales(x: torch.Tensor, input_scale=None, *, validate: bool = True) -> ScaleAssembly:
    """Quantize one group of activations x [M, K] to NVFP4 with swizzled block scales.

    input_scale: None (dynamic: amax on the device) or the checkpoint's decode multiplier (a float, or a
    0-dim fp32 tensor on x's device; pass a device tensor under CUDA-graph capture). validate: check
    input_scale's value in eager mode (skipped automatically under capture / torch.compile).
    Returns :class:`ScaleAssembly` (shapes in the module docstring).
    """
    import nvfp4lib.ops.scales  # noqa: F401  registers torch.ops.nvfp4lib.assemble_scales

    _check_shapes(x)
    scale = _scale_tensor(input_scale, x, None, validate)
    return ScaleAssembly(*torch.ops.nvfp4lib.assemble_scales(x, scale))


def assemble_scales_grouped(x: torch.Tensor, offsets: torch.Tensor, input_scale=None, *, capacity: Optional[int] = None, validate: bool = True) -> GroupedScaleAssembly:
    """Quantize expert-permuted activations x [M, K] group by group (offsets int [E+1] on x's device).

    input_scale: None (dynamic, one amax per group on the device), one decode multiplier for all groups,
    or an fp32 [E] tensor. capacity: most rows one group may hold (default M); it bounds the scale
    buffer, see :func:`grouped_scale_rows`. validate: eager host checks of offsets, capacity and
    input_scale (skipped automatically under capture / torch.compile; the op then sanitises, see the
    module docstring). Returns :class:`GroupedScaleAssembly`.
    """
    import nvfp4lib.ops.scales  # noqa: F401  registers torch.ops.nvfp4lib.assemble_scales_grouped

    _check_shapes(x)
    _check_offsets_shape(offsets, x)
    capacity = x.shape[0] if capacity is None else int(capacity)
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    num_groups = offsets.numel() - 1
    if validate and _value_checks_allowed():
        check_group_offsets(offsets, x.shape[0], capacity)
    scale = _scale_tensor(input_scale, x, num_groups, validate)
    return GroupedScaleAssembly(*torch.ops.nvfp4lib.assemble_scales_grouped(x, offsets, scale, capacity))
