"""Activation scale assembly on the GPU: bf16 activations -> packed E2M1 + E4M3 block scales stored
straight into the 128x4 swizzled layout, for one group or for MoE groups. CuTeDSL, sm_90a (Hopper);
the same source compiles for sm_100a (Blackwell).

Equals :func:`nvfp4lib.scales.reference_assemble` / ``reference_assemble_grouped`` bit for bit: every
step is either exact or one IEEE-rounded fp32 operation done in the reference's order.

- Block amax, sign and magnitude come from the bf16 bit patterns (integer max of ``bits & 0x7fff``:
  exact, and a NaN wins as it does in torch's amax).
- Block scale ``(amax / 6) / g`` with two round-to-nearest divisions, clamped to [2**-6, 448], rounded
  to E4M3 (round to nearest even on the fp32 bits; every value in range is an E4M3 normal).
- ``reciprocal = (1 / g) / scale`` (two divisions), ``scaled = x * reciprocal`` (one multiply), E2M1
  code by comparison against the rounding midpoints (ties to even) - exactly ``formats.e2m1_encode``.

Work split: one CTA per (scale row of the output buffer, chunk of scale columns), one thread per block
of 16 elements: two 16-byte loads, one 8-byte store of packed codes, one byte of scale. For the grouped
buffer, a CTA's row p finds its group by a binary search over ``padded_offsets`` (largest g with
``padded_offsets[g] <= p``); rows past a group's real rows (and past the last group) store zero scales,
so the padding is zero without a separate memset. Dynamic mode first runs :meth:`amax_kernel` (one
CTA per token row and chunk, warp max, one ``atom.max`` per warp on the fp32 bits of the group's amax),
then the quantize kernel derives ``g = amax / 2688`` (1.0 when amax is 0) on the fly. No host sync.

Out-of-bounds safety: a CTA's scale row p < R (the grid), its token row is ``offsets[g] + local`` with
``local < min(offsets[g+1] - offsets[g], capacity)``, and the offsets the host passes are sanitised
(:func:`nvfp4lib.scales.sanitized_offsets`), so no write leaves its buffer for any offsets' values.
"""
from __future__ import annotations

import math

import torch

from ...formats import BLOCK_SIZE
from ...layout import ATOM_ROWS, padded_rows, padded_scale_cols
from ..cute_compile import compile_kernel, import_cute

cutlass, cute = import_cute()

from cutlass import Float32, Int32, Uint8  # noqa: E402

MAX_THREADS = 256
DEFAULT_MAX_GROUPS = 1024  # the binary search is unrolled for up to this many groups


def _threads_and_chunks(k16p: int):
    """Threads per CTA (a multiple of 32) and column chunks per row covering k16p scale columns."""
    chunks = -(-k16p // MAX_THREADS)
    per_chunk = -(-k16p // chunks)
    return 32 * (-(-per_chunk // 32)), chunks


class ScaleAssemblyKernel:
    """Fused amax + NVFP4 quantization + swizzled scale store (see the module docstring).

    Static configuration: k (elements per row, a multiple of 16), grouped (MoE buffer with
    padded offsets, else one group), dynamic (amax on the device, else given global scales),
    max_groups (bound for the unrolled binary search). Sizes m, groups, scale rows, capacity are
    dynamic Int32.
    """

    def __init__(self, k: int, grouped: bool, dynamic: bool, max_groups: int = DEFAULT_MAX_GROUPS):
        if k % BLOCK_SIZE or k <= 0:
            raise ValueError(f"k must be a positive multiple of {BLOCK_SIZE}, got {k}")
        self.k = k
        self.k16 = k // BLOCK_SIZE
        self.k16p = padded_scale_cols(self.k16)
        self.atoms_per_band = self.k16p // 4
        self.grouped = grouped
        self.dynamic = dynamic
        self.max_groups = max_groups if grouped else 1
        self.search_steps = max(1, math.ceil(math.log2(self.max_groups + 1)))
        self.threads, self.chunks = _threads_and_chunks(self.k16p)

    # ------------------------------------------------------------------------------------------
    # host launch
    # ------------------------------------------------------------------------------------------
    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, offsets_ptr: cute.Pointer, padded_offsets_ptr: cute.Pointer,
                 global_scale_ptr: cute.Pointer, amax_ptr: cute.Pointer, packed_ptr: cute.Pointer,
                 scale_ptr: cute.Pointer, global_out_ptr: cute.Pointer, m: Int32, num_groups: Int32, scale_rows: Int32, capacity: Int32,
                 stream):
        """x_ptr: bf16 [m, k]; offsets_ptr / padded_offsets_ptr: int32 [groups+1] (sanitised; unused for
        one group); global_scale_ptr: fp32 [groups] (static mode) ; amax_ptr: int32 [groups], zeroed,
        receives the fp32 bits of each group's amax (dynamic mode); packed_ptr: int32 view of uint8
        [m, k/2]; scale_ptr: uint8 [scale_rows * k16p]; global_out_ptr: fp32 [groups], receives every
        group's global scale (the given one, or amax / 2688)."""
        mX = cute.make_tensor(x_ptr, cute.make_layout((m, self.k16, BLOCK_SIZE), stride=(self.k, BLOCK_SIZE, 1)))
        mOffsets = cute.make_tensor(offsets_ptr, cute.make_layout((num_groups + 1,)))
        mPadded = cute.make_tensor(padded_offsets_ptr, cute.make_layout((num_groups + 1,)))
        mGlobal = cute.make_tensor(global_scale_ptr, cute.make_layout((num_groups,)))
        mAmax = cute.make_tensor(amax_ptr, cute.make_layout((num_groups,)))
        mPacked = cute.make_tensor(packed_ptr, cute.make_layout((m, self.k16, 2), stride=(self.k // 8, 2, 1)))
        mScale = cute.make_tensor(scale_ptr, cute.make_layout((scale_rows * self.k16p,)))
        mGlobalOut = cute.make_tensor(global_out_ptr, cute.make_layout((num_groups,)))
        if cutlass.const_expr(self.dynamic):
            self.amax_kernel(mX, mOffsets, mAmax, num_groups).launch(
                grid=[m, self.chunks, 1], block=[self.threads, 1, 1], stream=stream)
        self.quantize_kernel(mX, mOffsets, mPadded, mGlobal, mAmax, mPacked, mScale, mGlobalOut, m, num_groups,
                             capacity).launch(
            grid=[scale_rows, self.chunks, 1], block=[self.threads, 1, 1], stream=stream)

    # ------------------------------------------------------------------------------------------
    # device helpers
    # ------------------------------------------------------------------------------------------
    @cute.jit
    def _last_at_or_below(self, sorted_values: cute.Tensor, key: Int32, num_groups: Int32) -> Int32:
        """Largest g in [0, num_groups] with sorted_values[g] <= key (sorted_values[0] must be <= key).
        Binary lifting, unrolled, branch-free; every load index is clamped into [0, num_groups]."""
        found = Int32(0)
        for level in cutlass.range_constexpr(self.search_steps):
            step = 1 << (self.search_steps - 1 - level)
            candidate = found + step
            index = cutlass.min(candidate, num_groups)
            take = (candidate <= num_groups) & (sorted_values[index] <= key)
            found = cutlass.select_(take, candidate, found)
            found = Int32(found)
        return found

    @cute.jit
    def _load_block_words(self, mX: cute.Tensor, row: Int32, kb: Int32):
        """The 16 bf16 of block (row, kb) as 8 int32 words (element 2i in the low half): 2 x 16 B."""
        fragment = cute.make_rmem_tensor((BLOCK_SIZE,), cutlass.BFloat16)
        cute.autovec_copy(mX[row, kb, None], fragment)
        return fragment.load().bitcast(Int32)

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
    def _e2m1_code(self, magnitude: Float32, negative: Int32) -> Int32:
        """E2M1 code (sign in bit 3) of a scaled magnitude: formats.e2m1_encode's midpoint comparisons."""
        code = Int32(magnitude > Float32(0.25)) + Int32(magnitude >= Float32(0.75)) + Int32(magnitude > Float32(1.25))
        code = code + Int32(magnitude >= Float32(1.75)) + Int32(magnitude > Float32(2.5))
        code = code + Int32(magnitude >= Float32(3.5)) + Int32(magnitude > Float32(5.0))
        return code | (negative << 3)

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

    # ------------------------------------------------------------------------------------------
    # kernels
    # ------------------------------------------------------------------------------------------
    @cute.kernel
    def amax_kernel(self, mX: cute.Tensor, mOffsets: cute.Tensor, mAmax: cute.Tensor, num_groups: Int32):
        """Dynamic mode, pass 1: each group's amax (fp32 bits, atom.max) over its token rows."""
        tidx, _, _ = cute.arch.thread_idx()
        row, chunk, _ = cute.arch.block_idx()
        kb = chunk * self.threads + tidx
        best = Int32(0)
        if kb < self.k16:
            best = self._block_amax_bits(self._load_block_words(mX, row, kb))
        best = cute.arch.warp_reduction(best, lambda a, b: cutlass.max(a, b))
        group = Int32(0)
        if cutlass.const_expr(self.grouped):
            group = self._last_at_or_below(mOffsets, row, num_groups)
        if (cute.arch.lane_idx() == 0) & (group < num_groups):
            cute.arch.atomic_max((mAmax.iterator + group).llvm_ptr, best)

    @cute.kernel
    def quantize_kernel(self, mX: cute.Tensor, mOffsets: cute.Tensor, mPadded: cute.Tensor, mGlobal: cute.Tensor,
                        mAmax: cute.Tensor, mPacked: cute.Tensor, mScale: cute.Tensor, mGlobalOut: cute.Tensor,
                        m: Int32, num_groups: Int32, capacity: Int32):
        """Pass 2: quantize the token row behind scale row p and store codes and its swizzled scales;
        padding rows and columns get zero scales. CTA (0, 0) also writes every group's global scale."""
        tidx, _, _ = cute.arch.thread_idx()
        p, chunk, _ = cute.arch.block_idx()
        if (p == 0) & (chunk == 0):
            for g in range(tidx, num_groups, self.threads):
                mGlobalOut[g] = self._global_scale(mGlobal, mAmax, g)
        kb = chunk * self.threads + tidx
        group = Int32(0)
        token_row = p
        valid = p < m
        if cutlass.const_expr(self.grouped):
            group = self._last_at_or_below(mPadded, p, num_groups)
            safe_group = cutlass.min(group, num_groups - 1)
            local = p - mPadded[safe_group]
            rows_kept = cutlass.min(mOffsets[safe_group + 1] - mOffsets[safe_group], capacity)
            valid = (group < num_groups) & (local < rows_kept)
            token_row = mOffsets[safe_group] + local
        if kb < self.k16p:
            # 128x4 swizzle of (p, kb): ((p // 128) * atoms + kb // 4) * 512 + (p % 32) * 16 + ((p % 128) // 32) * 4 + kb % 4
            offset = ((p // ATOM_ROWS) * self.atoms_per_band + kb // 4) * 512 + (p % 32) * 16 + ((p % ATOM_ROWS) // 32) * 4 + kb % 4
            scale_byte = Int32(0)
            if valid & (kb < self.k16):
                words = self._load_block_words(mX, token_row, kb)
                amax = Float32(self._block_amax_bits(words).bitcast(Float32))
                global_scale = self._global_scale(mGlobal, mAmax, group)
                ratio = (amax / Float32(6.0)) / global_scale
                ratio = cute.arch.fmin(cute.arch.fmax(ratio, Float32(2.0 ** -6)), Float32(448.0))
                bits = ratio.bitcast(Int32)
                rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & Int32(-(1 << 20))
                block_scale = Float32(rounded.bitcast(Float32))
                scale_byte = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
                reciprocal = (Float32(1.0) / global_scale) / block_scale
                out = cute.make_rmem_tensor((2,), Int32)
                for half in cutlass.range_constexpr(2):
                    packed_word = Int32(0)
                    for j in cutlass.range_constexpr(4):
                        word = words[half * 4 + j]
                        low = self._e2m1_code(Float32(((word & 0x7FFF) << 16).bitcast(Float32)) * reciprocal, (word >> 15) & 1)
                        high = self._e2m1_code(Float32((word & 0x7FFF0000).bitcast(Float32)) * reciprocal, (word >> 31) & 1)
                        packed_word = packed_word | ((low | (high << 4)) << (8 * j))
                    out[half] = packed_word
                cute.autovec_copy(out, mPacked[token_row, kb, None])
            mScale[offset] = Uint8(scale_byte)


# ----------------------------------------------------------------------------------------------
# compile (fake pointers: works without a GPU) and launch
# ----------------------------------------------------------------------------------------------
def _pointers(x=None, offsets=None, padded=None, global_scales=None, amax=None, packed=None, scales=None, global_out=None):
    from cutlass.cute.runtime import make_ptr

    gmem = cute.AddressSpace.gmem

    def address(t):
        return 0 if t is None else t.data_ptr()

    return (
        make_ptr(cutlass.BFloat16, address(x), gmem, assumed_align=16),
        make_ptr(Int32, address(offsets), gmem, assumed_align=4),
        make_ptr(Int32, address(padded), gmem, assumed_align=4),
        make_ptr(Float32, address(global_scales), gmem, assumed_align=4),
        make_ptr(Int32, address(amax), gmem, assumed_align=4),
        make_ptr(Int32, address(packed), gmem, assumed_align=16),
        make_ptr(Uint8, address(scales), gmem, assumed_align=16),
        make_ptr(Float32, address(global_out), gmem, assumed_align=4),
    )


def compile_scale_assembly(k: int, grouped: bool, dynamic: bool, arch: str | None = None, keep_ptx: bool = False,
                           max_groups: int = DEFAULT_MAX_GROUPS):
    """Compile (cached) the kernel for rows of k elements. Works without a GPU (fake pointers)."""
    from cutlass.cute.runtime import make_fake_stream

    kernel = ScaleAssemblyKernel(k, grouped, dynamic, max_groups)
    sizes = (Int32(1), Int32(1), Int32(128), Int32(1))
    key = ("ScaleAssemblyKernel", k, grouped, dynamic, kernel.max_groups)
    return compile_kernel(key, kernel, *_pointers(), *sizes, make_fake_stream(), arch=arch, keep_ptx=keep_ptx)


def _current_stream():
    import cuda.bindings.driver as cuda_driver

    return cuda_driver.CUstream(torch.cuda.current_stream().cuda_stream)


def _launch(x, offsets, padded, global_scales, amax, packed, scales, global_out, num_groups, scale_rows, capacity, grouped):
    """Launch on the current stream (CUDA-graph capturable: no host sync, no allocation)."""
    compiled = compile_scale_assembly(x.shape[1], grouped, amax is not None)
    unused = global_out  # a valid address for pointers this configuration never dereferences
    pointers = _pointers(
        x,
        offsets if offsets is not None else unused,
        padded if padded is not None else unused,
        global_scales if global_scales is not None else unused,
        amax if amax is not None else unused,
        packed,
        scales,
        global_out,
    )
    compiled(*pointers, Int32(x.shape[0]), Int32(num_groups), Int32(scale_rows), Int32(capacity), _current_stream())


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned start (the kernel's vector loads assume it)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


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
        global_out.fill_(1.0) if amax is not None else global_out.copy_(global_scales)
    else:
        _launch(x, None, None, global_scales, amax, packed, scales, global_out, 1, rows, m, grouped=False)
    return packed, scales.view(torch.float8_e4m3fn), global_out.reshape(())


def run_grouped(x: torch.Tensor, offsets: torch.Tensor, input_scale, capacity: int):
    """MoE groups on the GPU: x bf16 [M, K], offsets int [E+1] on x's device, input_scale fp32 [] / [E]
    or None (dynamic), capacity rows per group. Returns (packed uint8 [M, K/2], swizzled e4m3
    [R*K16p], padded_offsets int32 [E+1], global_scales fp32 [E])."""
    from ...scales import grouped_scale_rows, padded_group_offsets, sanitized_offsets

    x = _aligned(x)
    m, k = x.shape
    num_groups = offsets.numel() - 1
    if num_groups > DEFAULT_MAX_GROUPS:
        raise ValueError(f"the kernel handles at most {DEFAULT_MAX_GROUPS} groups, got {num_groups}")
    rows = grouped_scale_rows(m, num_groups, capacity)
    bounds = sanitized_offsets(offsets, m).to(torch.int32)
    padded = padded_group_offsets(offsets, m, capacity)
    packed = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows * padded_scale_cols(k // BLOCK_SIZE), dtype=torch.uint8, device=x.device)
    global_out = torch.empty(num_groups, dtype=torch.float32, device=x.device)
    amax = global_scales = None
    if input_scale is None:
        amax = torch.zeros(num_groups, dtype=torch.int32, device=x.device)
    else:
        global_scales = input_scale.to(torch.float32).reshape(-1).expand(num_groups).contiguous()
    if rows == 0 or m == 0:  # no rows: every group empty
        global_out.fill_(1.0) if amax is not None else global_out.copy_(global_scales)
        packed.zero_()
        scales.zero_()
    else:
        _launch(x, bounds, padded, global_scales, amax, packed, scales, global_out, num_groups, rows, capacity, grouped=True)
    return packed, scales.view(torch.float8_e4m3fn), padded, global_out
