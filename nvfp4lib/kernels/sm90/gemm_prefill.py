"""Prefill (large M) path for sm_90a: dequantize the sm90-layout weight to bf16 with a CuTeDSL kernel, then
one cuBLAS BF16 GEMM.

At large M the GEMM is compute-bound and cuBLAS is near the H100's bf16 peak; the dequantization reads the
4.5-bit weight once and writes N x K bf16 (``W * alpha`` rounded once to bf16, relative error <= 2**-9 per
element). With plain stores it cost ~80 us for gate_up on the H100 (ideal: ~38 us of traffic; data/bench/gemm_h100.json,
7932402); the coalesced stores (the default since d327329) bring it to 1.26x its traffic floor on an H200.
Dequantize + cuBLAS can never beat cuBLAS alone: it is the correct fallback, not the register-sourced WGMMA
kernel (:mod:`.gemm_wgmma`) the issue asks for.

Kernel: one warp per (row group of 16 rows, quad of 256 k); each lane decodes its 4 words per chunk with
the same register decode as the decode kernel (:func:`.gemm_decode.decode_word`), multiplies by
``alpha[n] * 2**7`` in fp32, rounds to bf16 and stores 32 contiguous bytes per row and chunk.
"""
from __future__ import annotations

import torch

from ..cute_compile import compile_kernel, import_cute
from ..launch import current_stream
from . import dequant as D
from .gemm_decode import decode_word, prmt

cutlass, cute = import_cute()

from cutlass import Float32, Int32  # noqa: E402
from cutlass._mlir.dialects import llvm  # noqa: E402
from cutlass.cutlass_dsl import T, dsl_user_op  # noqa: E402

WARPS = 8


@dsl_user_op
def scale_bf16x2(pair: Int32, factor: Float32, *, loc=None, ip=None) -> Int32:
    """bf16x2 ``pair`` times the fp32 ``factor``, rounded once to bf16x2."""
    return Int32(llvm.inline_asm(
        T.i32(), [Int32(pair).ir_value(loc=loc, ip=ip), Float32(factor).ir_value(loc=loc, ip=ip)],
        "{\n.reg .b32 lo, hi;\n.reg .f32 flo, fhi;\n"
        "shl.b32 lo, $1, 16;\nand.b32 hi, $1, 0xFFFF0000;\n"
        "mov.b32 flo, lo;\nmov.b32 fhi, hi;\n"
        "mul.f32 flo, flo, $2;\nmul.f32 fhi, fhi, $2;\n"
        "cvt.rn.bf16x2.f32 $0, fhi, flo;\n}",
        "=r,r,f", has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


class DequantKernel:
    """sm90 layout -> bf16 [RG*16, K] = e2m1 * block scale * alpha[n] (rows past N: zero). Static: k,
    coalesced (see :meth:`_store_row`)."""

    def __init__(self, k: int, coalesced: bool = False):
        D.check_decode_shape(16, k)
        self.k = k
        self.coalesced = coalesced
        self.chunks = k // D.CHUNK_K
        self.quads = k // D.QUAD_K

    @cute.jit
    def __call__(self, w_ptr: cute.Pointer, s_ptr: cute.Pointer, alpha_ptr: cute.Pointer, out_ptr: cute.Pointer,
                 n: Int32, row_groups: Int32, stream):
        mW = cute.make_tensor(w_ptr, cute.make_layout((row_groups, self.chunks, 32, 4), stride=(self.chunks * 128, 128, 4, 1)))
        mS = cute.make_tensor(s_ptr, cute.make_layout((row_groups, self.quads, 32, 2), stride=(self.quads * 64, 64, 2, 1)))
        mAlpha = cute.make_tensor(alpha_ptr, cute.make_layout((n,)))
        mOut = cute.make_tensor(out_ptr, cute.make_layout((row_groups * 16, self.chunks, 8, 4), stride=(self.k // 2, 32, 4, 1)))
        self.kernel(mW, mS, mAlpha, mOut, n, row_groups).launch(
            grid=[(row_groups + WARPS - 1) // WARPS, self.quads, 1], block=[32 * WARPS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mS: cute.Tensor, mAlpha: cute.Tensor, mOut: cute.Tensor, n: Int32, row_groups: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        rgb, q, _ = cute.arch.block_idx()
        lane = tidx % 32
        rg = rgb * WARPS + tidx // 32
        g = lane // 4
        t = lane % 4
        if rg < row_groups:
            wreg = cute.make_rmem_tensor(cute.make_ordered_layout((4, 4), order=(1, 0)), Int32)
            sreg = cute.make_rmem_tensor((2,), Int32)
            for ci in cutlass.range_constexpr(4):
                cute.autovec_copy(mW[rg, 4 * q + ci, lane, None], wreg[ci, None])
            cute.autovec_copy(mS[rg, q, lane, None], sreg)
            row_g = rg * D.ROWS_PER_GROUP + g
            row_g8 = row_g + 8
            factor_g = Float32(0.0)
            factor_g8 = Float32(0.0)
            if row_g < n:
                factor_g = mAlpha[row_g] * Float32(2.0 ** D.MAGNITUDE_SHIFT)
            if row_g8 < n:
                factor_g8 = mAlpha[row_g8] * Float32(2.0 ** D.MAGNITUDE_SHIFT)
            bias_bits = (D.SCALE_BIAS_BITS << 16) | D.SCALE_BIAS_BITS
            for ci in cutlass.range_constexpr(4):
                word = sreg[ci // 2]
                sel = (ci % 2) * 2
                scale_g = prmt(word, Int32(0), 0x4040 + sel * 0x0101) * 16 + bias_bits
                scale_g8 = prmt(word, Int32(0), 0x4040 + (sel + 1) * 0x0101) * 16 + bias_bits
                out_g = cute.make_rmem_tensor((8,), Int32)
                out_g8 = cute.make_rmem_tensor((8,), Int32)
                for kk in cutlass.range_constexpr(4):
                    a = decode_word(wreg[ci, kk], scale_g, scale_g8)
                    # a0: row g, k 4kk+{0,1}; a2: row g, k 4kk+{2,3}; a1 / a3: row g+8
                    out_g[2 * kk] = scale_bf16x2(a[0], factor_g)
                    out_g[2 * kk + 1] = scale_bf16x2(a[2], factor_g)
                    out_g8[2 * kk] = scale_bf16x2(a[1], factor_g8)
                    out_g8[2 * kk + 1] = scale_bf16x2(a[3], factor_g8)
                self._store_row(out_g, mOut, row_g, 4 * q + ci, lane)
                self._store_row(out_g8, mOut, row_g8, 4 * q + ci, lane)

    @cute.jit
    def _store_row(self, vals: cute.Tensor, mOut: cute.Tensor, row: Int32, chunk: Int32, lane: Int32):
        """Store one row's 64 bf16 of a chunk, held 16 per lane (lanes 4g..4g+3; lane t has 16-byte pieces
        2t and 2t+1 of the row's 128 bytes). Plain: each lane stores its own two pieces, so one store
        instruction half-fills every 32-byte sector it touches. ``coalesced``: pieces are exchanged with
        shuffles first so the first store writes pieces 0..3 (lane t piece t) and the second pieces 4..7:
        every store fills whole sectors."""
        t = lane % 4
        if cutlass.const_expr(self.coalesced):
            src_a = lane - t + t // 2  # owner of piece t (slot t % 2)
            odd = (t % 2) == 1
            first = cute.make_rmem_tensor((4,), Int32)
            second = cute.make_rmem_tensor((4,), Int32)
            for i in cutlass.range_constexpr(4):
                lo = cute.arch.shuffle_sync(vals[i], src_a)
                hi = cute.arch.shuffle_sync(vals[4 + i], src_a)
                first[i] = Int32(cutlass.select_(odd, hi, lo))
                lo = cute.arch.shuffle_sync(vals[i], src_a + 2)  # owner of piece t + 4
                hi = cute.arch.shuffle_sync(vals[4 + i], src_a + 2)
                second[i] = Int32(cutlass.select_(odd, hi, lo))
            cute.autovec_copy(first, mOut[row, chunk, t, None])
            cute.autovec_copy(second, mOut[row, chunk, t + 4, None])
        else:
            lower = cute.make_rmem_tensor((4,), Int32)
            upper = cute.make_rmem_tensor((4,), Int32)
            for i in cutlass.range_constexpr(4):
                lower[i] = vals[i]
                upper[i] = vals[4 + i]
            cute.autovec_copy(lower, mOut[row, chunk, 2 * t, None])
            cute.autovec_copy(upper, mOut[row, chunk, 2 * t + 1, None])


def _pointers(words=None, scale_words=None, alpha=None, out=None):
    from cutlass.cute.runtime import make_ptr

    gmem = cute.AddressSpace.gmem

    def pointer(dtype, t, align):
        return make_ptr(dtype, 0 if t is None else t.data_ptr(), gmem, assumed_align=align)

    return (pointer(Int32, words, 16), pointer(Int32, scale_words, 8), pointer(Float32, alpha, 4), pointer(Int32, out, 16))


# The default store pattern: coalesced (pieces exchanged with shuffles so every store fills whole 32-byte
# sectors). Measured on an H200 (data/bench/dequant_store_nvidia_h200.json): identical bytes, gate_up 33.7 us
# against 66.2 us plain (floor 26.7), wo_b 89.3 against 157.1 (floor 71.3).
DEQUANT_COALESCED = True


def compile_dequant(k: int, arch: str | None = None, keep_ptx: bool = False, coalesced: bool | None = None):
    from cutlass.cute.runtime import make_fake_stream

    coalesced = DEQUANT_COALESCED if coalesced is None else coalesced
    return compile_kernel(("DequantKernel", k, coalesced), DequantKernel(k, coalesced), *_pointers(), Int32(16), Int32(1),
                          make_fake_stream(), arch=arch, keep_ptx=keep_ptx)


def dequantize_to_bf16(words: torch.Tensor, scale_words: torch.Tensor, alpha: torch.Tensor, n: int,
                       out: torch.Tensor | None = None, coalesced: bool | None = None) -> torch.Tensor:
    """bf16 [n, K] = bf16(e2m1 * block scale * alpha[n]) on the GPU (one kernel, on the current stream).
    out: an optional bf16 buffer of at least RG*16*K elements (contiguous) to write into."""
    row_groups, chunks = words.shape[0], words.shape[1]
    k = chunks * D.CHUNK_K
    size = row_groups * D.ROWS_PER_GROUP * k
    if out is None:
        out = torch.empty(row_groups * D.ROWS_PER_GROUP, k, dtype=torch.bfloat16, device=words.device)
    elif out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() < size:
        raise ValueError(f"out must be a contiguous bf16 buffer of at least {size} elements")
    out = out.reshape(-1)[:size].view(row_groups * D.ROWS_PER_GROUP, k)
    compile_dequant(k, coalesced=coalesced)(*_pointers(words, scale_words, alpha, out), Int32(n), Int32(row_groups), current_stream())
    return out[:n]


def run_prefill(x: torch.Tensor, words: torch.Tensor, scale_words: torch.Tensor, alpha: torch.Tensor, n: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x bf16 [M, K] -> bf16 [M, n]: dequantize (alpha folded in) then cuBLAS (bias in its epilogue).

    Dequantizing in row chunks through one reused bf16 buffer (so each chunk stays in the L2) was measured and
    dropped: on an H100 it gained 3-7% for gate_up at M = 2048 and 8192 only, and lost up to 2x for small chunks, down
    and wo_b (data/bench/chunked_prefill_probe_nvidia_h100_80gb_hbm3_517eb25.json, script at 517eb25)."""
    weight = dequantize_to_bf16(words, scale_words, alpha, n)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(torch.bfloat16))
