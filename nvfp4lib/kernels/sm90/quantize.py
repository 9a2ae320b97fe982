"""Activation scale assembly on the GPU: bf16 activations -> packed E2M1 + E4M3 block scales stored
straight into the 128x4 swizzled layout, for one group or for MoE groups. CuTeDSL, sm_90a (Hopper);
the same source compiles for sm_100a (Blackwell).

Equals :func:`nvfp4lib.scales.reference_assemble` / ``reference_assemble_grouped`` bit for bit: every
step is either exact or one IEEE-rounded fp32 operation done in the reference's order.

- Block amax, sign and magnitude come from the bf16 bit patterns (integer max of ``bits & 0x7fff``:
  exact, and a NaN wins as it does in torch's amax).
- Block scale ``(amax / 6) / g`` with two round-to-nearest divisions, clamped to [2**-6, 448], rounded
  to E4M3 (round to nearest even on the fp32 bits; every value in range is an E4M3 normal).
- ``reciprocal = (1 / g) / scale`` (two divisions), ``scaled = x * reciprocal`` (one multiply).
- E2M1 code of ``s = min(|scaled|, 6)`` with round to nearest even, without a compare chain:
  below 1 the code counts halves, ``bits(s + 2**22) - bits(2**22)`` (the fp32 add rounds to a multiple
  of 0.5, ties to even); from 1 up it is the fp32 value rounded to one mantissa bit,
  ``((bits + 0x1fffff + bit22) >> 22) - 252``. Equal to ``formats.e2m1_encode`` on every fp32 value
  (tests/test_scales_kernel.py checks the identity on the CPU).

Work split: one CTA per (``rows_per_cta`` consecutive scale rows of the output buffer, chunk of scale
columns), one thread per block of 16 elements and row: the thread first issues all its rows' loads
(two 16-byte loads per block), then computes and stores one 8-byte word pair of packed codes and one
scale byte per row. ``rows_per_cta`` divides 128, so a CTA's rows lie in one 128-row band and (grouped)
in one group: the group comes from one load of ``band_group[p // 128]``. Rows past a group's real rows
(and past the last group) store zero scales, so all padding is zero without a memset.

Dynamic mode first runs :meth:`amax_kernel`: one CTA per ``AMAX_ROWS_PER_CTA`` token rows and chunk;
each thread keeps a running max while its rows stay in one group (rows are sorted by group) and the
warp flushes it with one ``atom.max`` on the fp32 bits of the group's amax when the group changes and
at the end. The quantize kernel then derives ``g = amax / 2688`` (1.0 when amax is 0). No host sync.

Non-finite input: scale bytes and global scales equal the reference's. With a static scale an Inf
gives scale 448 and code +-6; a block whose scale ratio is NaN (a NaN in it, or an Inf divided by the
Inf global scale of dynamic mode) gets the E4M3 NaN byte 0x7f; a NaN amax gives global scale 1.0, as
``torch.where(amax > 0, ...)`` does. Codes of elements whose scaled value is NaN are unspecified.

Out-of-bounds safety: a CTA's scale rows are < R (the grid), its token rows are ``offsets[g] + local``
with ``local < min(offsets[g+1] - offsets[g], capacity)``, and the offsets, band and row tables the
host passes are computed on the device from sanitised offsets (:func:`nvfp4lib.scales.sanitized_offsets`),
so no write leaves its buffer whatever the offsets' values.
"""
from __future__ import annotations

import torch

from ...formats import BLOCK_SIZE
from ...layout import ATOM_ROWS, padded_rows, padded_scale_cols
from ..cute_compile import compile_kernel, import_cute
from ..launch import current_stream

cutlass, cute = import_cute()

from cutlass import Float32, Int32, Uint8  # noqa: E402

MAX_THREADS = 256
AMAX_ROWS_PER_CTA = 16
AMAX_LOAD_BATCH = 4  # rows whose loads a thread issues before reducing them
HALF_STEPS_MAGIC = 4194304.0  # 2**22: fp32 spacing 0.5 in [2**22, 2**23)
HALF_STEPS_MAGIC_BITS = 0x4A800000


def _threads_and_chunks(k16p: int):
    """Threads per CTA (a multiple of 32) and column chunks per row covering k16p scale columns."""
    chunks = -(-k16p // MAX_THREADS)
    per_chunk = -(-k16p // chunks)
    return 32 * (-(-per_chunk // 32)), chunks


class ScaleAssemblyKernel:
    """Fused amax + NVFP4 quantization + swizzled scale store (see the module docstring).

    Static configuration: k (elements per row, a multiple of 16), grouped (MoE buffer with padded
    offsets, else one group), dynamic (amax on the device, else given global scales), rows_per_cta
    (scale rows per CTA of the quantize kernel; divides 128). Sizes m, groups, scale rows, capacity are
    dynamic Int32.
    """

    def __init__(self, k: int, grouped: bool, dynamic: bool, rows_per_cta: int = 4):
        if k % BLOCK_SIZE or k <= 0:
            raise ValueError(f"k must be a positive multiple of {BLOCK_SIZE}, got {k}")
        if ATOM_ROWS % rows_per_cta:
            raise ValueError(f"rows_per_cta must divide {ATOM_ROWS}, got {rows_per_cta}")
        self.k = k
        self.k16 = k // BLOCK_SIZE
        self.k16p = padded_scale_cols(self.k16)
        self.atoms_per_band = self.k16p // 4
        self.grouped = grouped
        self.dynamic = dynamic
        self.rows_per_cta = rows_per_cta
        self.threads, self.chunks = _threads_and_chunks(self.k16p)

    # ------------------------------------------------------------------------------------------
    # host launch
    # ------------------------------------------------------------------------------------------
    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, offsets_ptr: cute.Pointer, padded_offsets_ptr: cute.Pointer,
                 band_group_ptr: cute.Pointer, row_group_ptr: cute.Pointer, global_scale_ptr: cute.Pointer,
                 amax_ptr: cute.Pointer, packed_ptr: cute.Pointer, scale_ptr: cute.Pointer,
                 global_out_ptr: cute.Pointer, m: Int32, num_groups: Int32, scale_rows: Int32, capacity: Int32,
                 stream):
        """x_ptr: bf16 [m, k]; offsets_ptr / padded_offsets_ptr: int32 [groups+1] (sanitised);
        band_group_ptr: int32 [scale_rows/128], the group of each 128-row band (groups past the last);
        row_group_ptr: int32 [m], the group of each token row (groups if none); global_scale_ptr: fp32
        [groups] (static mode); amax_ptr: int32 [groups], zeroed, receives the fp32 bits of each group's
        amax (dynamic mode); packed_ptr: int32 view of uint8 [m, k/2]; scale_ptr: uint8
        [scale_rows * k16p]; global_out_ptr: fp32 [groups], receives every group's global scale. The
        one-group configuration never reads the offsets and tables."""
        mX = cute.make_tensor(x_ptr, cute.make_layout((m, self.k16, BLOCK_SIZE), stride=(self.k, BLOCK_SIZE, 1)))
        mOffsets = cute.make_tensor(offsets_ptr, cute.make_layout((num_groups + 1,)))
        mPadded = cute.make_tensor(padded_offsets_ptr, cute.make_layout((num_groups + 1,)))
        mBandGroup = cute.make_tensor(band_group_ptr, cute.make_layout((scale_rows // ATOM_ROWS,)))
        mRowGroup = cute.make_tensor(row_group_ptr, cute.make_layout((m,)))
        mGlobal = cute.make_tensor(global_scale_ptr, cute.make_layout((num_groups,)))
        mAmax = cute.make_tensor(amax_ptr, cute.make_layout((num_groups,)))
        mPacked = cute.make_tensor(packed_ptr, cute.make_layout((m, self.k16, 2), stride=(self.k // 8, 2, 1)))
        mScale = cute.make_tensor(scale_ptr, cute.make_layout((scale_rows * self.k16p,)))
        mGlobalOut = cute.make_tensor(global_out_ptr, cute.make_layout((num_groups,)))
        if cutlass.const_expr(self.dynamic):
            self.amax_kernel(mX, mRowGroup, mAmax, m, num_groups).launch(
                grid=[cute.ceil_div(m, AMAX_ROWS_PER_CTA), self.chunks, 1], block=[self.threads, 1, 1], stream=stream)
        self.quantize_kernel(mX, mOffsets, mPadded, mBandGroup, mGlobal, mAmax, mPacked, mScale, mGlobalOut, m,
                             num_groups, capacity).launch(
            grid=[scale_rows // self.rows_per_cta, self.chunks, 1], block=[self.threads, 1, 1], stream=stream)

    # ------------------------------------------------------------------------------------------
    # device helpers
    # ------------------------------------------------------------------------------------------
    @cute.jit
    def _block_amax_bits(self, words) -> Int32:
        """Integer max of the 16 magnitudes' fp32 bit patterns (exact; NaN bits win)."""
        best = Int32(0)
        for i in cutlass.range_constexpr(BLOCK_SIZE // 2):
            word = words[i]
            best = cutlass.max(best, (word & 0x7FFF) << 16)
            best = cutlass.max(best, word & 0x7FFF0000)
        return best

    @cute.jit
    def _e2m1_magnitude_code(self, magnitude_bits: Int32, reciprocal: Float32) -> Int32:
        """E2M1 magnitude code (0..7) of |x| * reciprocal, round to nearest even, saturating at 6."""
        scaled = cute.arch.fmin(magnitude_bits.bitcast(Float32) * reciprocal, Float32(6.0))
        halves = (scaled + Float32(HALF_STEPS_MAGIC)).bitcast(Int32) - HALF_STEPS_MAGIC_BITS
        bits = scaled.bitcast(Int32)
        normal = ((bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22) - 252
        return Int32(cutlass.select_(scaled < Float32(1.0), halves, normal))

    @cute.jit
    def _global_scale(self, mGlobal: cute.Tensor, mAmax: cute.Tensor, group: Int32) -> Float32:
        """Static: the given scale. Dynamic: amax / 2688, or 1.0 for an all-zero group."""
        result = Float32(1.0)
        if cutlass.const_expr(self.dynamic):
            amax = Float32(mAmax[group].bitcast(Float32))
            result = Float32(cutlass.select_(amax > Float32(0.0), amax / Float32(2688.0), Float32(1.0)))
        else:
            result = Float32(mGlobal[group])
        return result

    @cute.jit
    def _flush_amax(self, mAmax: cute.Tensor, group: Int32, best: Int32, num_groups: Int32):
        """Warp max of ``best`` and one atom.max into the group's amax (skipped past the last group)."""
        best = cute.arch.warp_reduction(best, lambda a, b: cutlass.max(a, b))
        if (cute.arch.lane_idx() == 0) & (group < num_groups):
            cute.arch.atomic_max((mAmax.iterator + group).llvm_ptr, best)

    # ------------------------------------------------------------------------------------------
    # kernels
    # ------------------------------------------------------------------------------------------
    @cute.kernel
    def amax_kernel(self, mX: cute.Tensor, mRowGroup: cute.Tensor, mAmax: cute.Tensor, m: Int32, num_groups: Int32):
        """Dynamic mode, pass 1: each group's amax (fp32 bits) over its token rows."""
        tidx, _, _ = cute.arch.thread_idx()
        row_block, chunk, _ = cute.arch.block_idx()
        kb = chunk * self.threads + tidx
        first_row = row_block * AMAX_ROWS_PER_CTA
        current = Int32(0)
        if cutlass.const_expr(self.grouped):
            current = mRowGroup[first_row]
        best = Int32(0)
        batch = AMAX_LOAD_BATCH
        words = cute.make_rmem_tensor(cute.make_ordered_layout((batch, BLOCK_SIZE), order=(1, 0)), cutlass.BFloat16)
        for start in cutlass.range_constexpr(0, AMAX_ROWS_PER_CTA, batch):
            for r in cutlass.range_constexpr(batch):  # loads of `batch` rows in flight
                if (first_row + start + r < m) & (kb < self.k16):
                    cute.autovec_copy(mX[first_row + start + r, kb, None], words[r, None])
            for r in cutlass.range_constexpr(batch):
                row = first_row + start + r
                if row < m:
                    if cutlass.const_expr(self.grouped):
                        group = mRowGroup[row]
                        if group != current:  # uniform across the CTA: every thread walks the same rows
                            self._flush_amax(mAmax, current, best, num_groups)
                            best = Int32(0)
                            current = group
                    if kb < self.k16:
                        best = cutlass.max(best, self._block_amax_bits(words[r, None].load().bitcast(Int32)))
        self._flush_amax(mAmax, current, best, num_groups)

    @cute.kernel
    def quantize_kernel(self, mX: cute.Tensor, mOffsets: cute.Tensor, mPadded: cute.Tensor, mBandGroup: cute.Tensor,
                        mGlobal: cute.Tensor, mAmax: cute.Tensor, mPacked: cute.Tensor, mScale: cute.Tensor,
                        mGlobalOut: cute.Tensor, m: Int32, num_groups: Int32, capacity: Int32):
        """Pass 2: quantize the token rows behind scale rows p0 .. p0 + rows_per_cta - 1 and store their
        codes and swizzled scales; padding rows and columns get zero scales. CTA (0, 0) also writes every
        group's global scale."""
        tidx, _, _ = cute.arch.thread_idx()
        row_block, chunk, _ = cute.arch.block_idx()
        kb = chunk * self.threads + tidx
        first_p = row_block * self.rows_per_cta
        if (row_block == 0) & (chunk == 0):
            for g in range(tidx, num_groups, self.threads):
                mGlobalOut[g] = self._global_scale(mGlobal, mAmax, g)

        group = Int32(0)
        group_start = Int32(0)  # first scale row of the group
        first_token = Int32(0)  # first token row of the group
        rows_kept = m
        if cutlass.const_expr(self.grouped):
            group = mBandGroup[first_p // ATOM_ROWS]
            safe_group = cutlass.min(group, num_groups - 1)
            group_start = mPadded[safe_group]
            first_token = mOffsets[safe_group]
            rows_kept = cutlass.select_(group < num_groups,
                                        cutlass.min(mOffsets[safe_group + 1] - first_token, capacity), Int32(0))
            rows_kept = Int32(rows_kept)
            group = safe_group
        in_columns = kb < self.k16
        # 1) all loads first: rows_per_cta blocks in flight per thread
        words = cute.make_rmem_tensor(cute.make_ordered_layout((self.rows_per_cta, BLOCK_SIZE), order=(1, 0)), cutlass.BFloat16)
        for r in cutlass.range_constexpr(self.rows_per_cta):
            local = first_p + r - group_start
            if (local < rows_kept) & in_columns:
                cute.autovec_copy(mX[first_token + local, kb, None], words[r, None])
        # 2) quantize and store
        if kb < self.k16p:
            global_scale = Float32(1.0)
            inverse_global = Float32(1.0)
            if (rows_kept > first_p - group_start) & in_columns:
                global_scale = self._global_scale(mGlobal, mAmax, group)
                inverse_global = Float32(1.0) / global_scale
            for r in cutlass.range_constexpr(self.rows_per_cta):
                p = first_p + r
                local = p - group_start
                # 128x4 swizzle of (p, kb)
                offset = ((p // ATOM_ROWS) * self.atoms_per_band + kb // 4) * 512 + (p % 32) * 16 + ((p % ATOM_ROWS) // 32) * 4 + kb % 4
                scale_byte = Int32(0)
                if (local < rows_kept) & in_columns:
                    block = words[r, None].load().bitcast(Int32)
                    amax = Float32(self._block_amax_bits(block).bitcast(Float32))
                    unclamped = (amax / Float32(6.0)) / global_scale
                    ratio = cute.arch.fmin(cute.arch.fmax(unclamped, Float32(2.0 ** -6)), Float32(448.0))
                    bits = ratio.bitcast(Int32)
                    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & Int32(-(1 << 20))
                    scale_byte = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
                    # a NaN ratio (NaN in the block, or Inf / Inf) gets the E4M3 NaN scale 0x7f, as the
                    # reference's clamp and cast do (fmax/fmin would drop the NaN)
                    is_nan = (unclamped.bitcast(Int32) & 0x7FFFFFFF) > 0x7F800000
                    scale_byte = Int32(cutlass.select_(is_nan, Int32(0x7F), scale_byte))
                    reciprocal = inverse_global / Float32(rounded.bitcast(Float32))
                    out = cute.make_rmem_tensor((2,), Int32)
                    for half in cutlass.range_constexpr(2):
                        packed_word = Int32(0)
                        for j in cutlass.range_constexpr(4):
                            word = block[half * 4 + j]
                            low = self._e2m1_magnitude_code((word & 0x7FFF) << 16, reciprocal) | ((word >> 12) & 8)
                            high = self._e2m1_magnitude_code(word & 0x7FFF0000, reciprocal) | ((word >> 28) & 8)
                            packed_word = packed_word | ((low | (high << 4)) << (8 * j))
                        out[half] = packed_word
                    cute.autovec_copy(out, mPacked[first_token + local, kb, None])
                mScale[offset] = Uint8(scale_byte)


# ----------------------------------------------------------------------------------------------
# compile (fake pointers: works without a GPU) and launch
# ----------------------------------------------------------------------------------------------
def _pointers(x=None, offsets=None, padded=None, band_group=None, row_group=None, global_scales=None, amax=None,
              packed=None, scales=None, global_out=None):
    """cute pointers in the order of ScaleAssemblyKernel.__call__ (address 0 for None: compile only)."""
    from cutlass.cute.runtime import make_ptr

    gmem = cute.AddressSpace.gmem

    def pointer(dtype, t, align):
        return make_ptr(dtype, 0 if t is None else t.data_ptr(), gmem, assumed_align=align)

    return (
        pointer(cutlass.BFloat16, x, 16),
        pointer(Int32, offsets, 4),
        pointer(Int32, padded, 4),
        pointer(Int32, band_group, 4),
        pointer(Int32, row_group, 4),
        pointer(Float32, global_scales, 4),
        pointer(Int32, amax, 4),
        pointer(Int32, packed, 16),
        pointer(Uint8, scales, 16),
        pointer(Float32, global_out, 4),
    )


def rows_per_cta_for(m: int) -> int:
    """Scale rows per CTA: 1 for small M (latency: more CTAs), 4 for large M (fewer, fuller CTAs)."""
    return 1 if m <= 512 else 4


def compile_scale_assembly(k: int, grouped: bool, dynamic: bool, rows_per_cta: int = 4, arch: str | None = None,
                           keep_ptx: bool = False):
    """Compile (cached) the kernel for rows of k elements. Works without a GPU (fake pointers)."""
    from cutlass.cute.runtime import make_fake_stream

    kernel = ScaleAssemblyKernel(k, grouped, dynamic, rows_per_cta)
    sizes = (Int32(1), Int32(1), Int32(128), Int32(1))
    key = ("ScaleAssemblyKernel", k, grouped, dynamic, rows_per_cta)
    return compile_kernel(key, kernel, *_pointers(), *sizes, make_fake_stream(), arch=arch, keep_ptx=keep_ptx)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned start (the kernel's vector loads assume it)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _launch(x, packed, scales, global_out, num_groups, scale_rows, capacity, grouped, offsets=None, padded=None,
            band_group=None, row_group=None, global_scales=None, amax=None):
    """Launch on the current stream (CUDA-graph capturable: no host sync, no allocation)."""
    compiled = compile_scale_assembly(x.shape[1], grouped, amax is not None, rows_per_cta_for(x.shape[0]))
    unused = global_out  # a valid address for pointers this configuration never dereferences

    def given(t):
        return unused if t is None else t

    pointers = _pointers(x, given(offsets), given(padded), given(band_group), given(row_group), given(global_scales),
                         given(amax), packed, scales, global_out)
    compiled(*pointers, Int32(x.shape[0]), Int32(num_groups), Int32(scale_rows), Int32(capacity), current_stream())


def run_single(x: torch.Tensor, input_scale):
    """One group on the GPU: x bf16 [M, K], input_scale fp32 [] on x's device or None (dynamic).
    Returns (packed uint8 [M, K/2], swizzled e4m3 [Mp*K16p], global_scale fp32 [])."""
    x = _aligned(x)
    m, k = x.shape
    rows = padded_rows(m)
    packed = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows * padded_scale_cols(k // BLOCK_SIZE), dtype=torch.uint8, device=x.device)
    global_out = torch.empty(1, dtype=torch.float32, device=x.device)
    amax = global_scales = None
    if input_scale is None:
        amax = torch.zeros(1, dtype=torch.int32, device=x.device)
    else:
        global_scales = input_scale.reshape(1).to(torch.float32).contiguous()
    if m == 0:  # no CTA would run: the reference's answer for an empty input
        if amax is None:
            global_out.copy_(global_scales)
        else:
            global_out.fill_(1.0)
    else:
        _launch(x, packed, scales, global_out, 1, rows, m, grouped=False, global_scales=global_scales, amax=amax)
    return packed, scales.view(torch.float8_e4m3fn), global_out.reshape(())


def run_grouped(x: torch.Tensor, offsets: torch.Tensor, input_scale, capacity: int):
    """MoE groups on the GPU: x bf16 [M, K], offsets int [E+1] on x's device, input_scale fp32 [] / [E]
    or None (dynamic), capacity rows per group. Returns (packed uint8 [M, K/2], swizzled e4m3
    [R*K16p], padded_offsets int32 [E+1], global_scales fp32 [E])."""
    from ...scales import grouped_scale_rows, padded_group_offsets, sanitized_offsets

    x = _aligned(x)
    m, k = x.shape
    num_groups = offsets.numel() - 1
    rows = grouped_scale_rows(m, num_groups, capacity)
    bounds = sanitized_offsets(offsets, m)
    padded = padded_group_offsets(bounds, m, capacity, sanitized=True)
    packed = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows * padded_scale_cols(k // BLOCK_SIZE), dtype=torch.uint8, device=x.device)
    global_out = torch.empty(num_groups, dtype=torch.float32, device=x.device)
    amax = global_scales = row_group = None
    if input_scale is None:
        amax = torch.zeros(num_groups, dtype=torch.int32, device=x.device)
        row_group = torch.searchsorted(bounds[1:], torch.arange(m, device=x.device), right=True).to(torch.int32)
    else:
        global_scales = input_scale.to(torch.float32).reshape(-1).expand(num_groups).contiguous()
    if rows == 0 or m == 0:  # no rows: every group is empty
        if amax is None:
            global_out.copy_(global_scales)
        else:
            global_out.fill_(1.0)
        packed.zero_()
        scales.zero_()
    else:
        band_starts = torch.arange(0, rows, ATOM_ROWS, device=x.device, dtype=torch.int32)
        band_group = torch.searchsorted(padded[1:], band_starts, right=True).to(torch.int32)
        _launch(x, packed, scales, global_out, num_groups, rows, capacity, grouped=True, offsets=bounds.to(torch.int32),
                padded=padded, band_group=band_group, row_group=row_group, global_scales=global_scales, amax=amax)
    return packed, scales.view(torch.float8_e4m3fn), padded, global_out
