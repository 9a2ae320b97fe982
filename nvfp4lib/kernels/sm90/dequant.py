"""The sm_90 decode layout of an NVFP4 weight, and the register decode E2M1 x E4M3 -> bf16 it enables.

The decode kernel runs ``mma.sync.m16n8k16`` (bf16 in, fp32 accumulate) with the *weight* as operand A
(16 weight rows x 16 k) and the activations as operand B (16 k x 8 tokens). Lane ``(g, t) = (lane // 4,
lane % 4)`` owns A elements of rows ``g`` and ``g + 8``. The k order inside an MMA is free as long as A
and B agree, so logical k ``(step kk, half h, element e)`` of lane t in 64-wide chunk c is mapped to the
actual k ``64c + 16t + 4kk + 2h + e``. Then:

- a lane's activations for one chunk are 16 contiguous bf16 (two 16-byte loads);
- all its weight elements in a chunk fall in ONE 16-wide scale block per row (block ``4c + t``), so a lane
  needs two E4M3 scales per chunk (rows g and g+8);
- its weight elements for a chunk are 4 words (one per MMA step), i.e. one 16-byte load.

Weight layout (:func:`repack_weight`): int32 ``[RG, K/64, 32, 4]`` (row group of 16 rows, chunk, lane,
step). Word bits: register j (j = rh + 2h: rows g + 8rh, k pair h) needs, per half e (element 0 / 1), the
E2M1 bits (m, e0, e1) at bf16 bits 6..8 (+16e) and the sign at bit 15 (+16e). The repack stores them so
that plain shifts and masks recover each register (:data:`EM_SOURCE`, :data:`SIGN_SOURCE`)::

    a0 = w & 0x81C081C0                  a1 = (w << 3) & 0x81C081C0
    a2 = (w << 6) & 0x81C081C0           a3 = ((w >> 4) & 0x00C000C0) | ((w >> 5) & 0x01000100) | ((w << 1) & 0x80008000)

(11 integer ops per word, the left shifts can issue on the FMA pipe; each of the 32 bits is used once).
The result is the bf16 pattern of ``v * 2**-126``, exactly (0.5 is the subnormal ``0x0040``).

Scale layout (:func:`repack_weight`): uint8 ``[RG, K/256, 32, 4, 2]`` viewed as int32
``[RG, K/256, 32, 2]``: for lane (g, t) and chunk 4cq + ci, the scale bytes of (row g, block 4c + t) and
(row g + 8, same block). In the kernel a scale byte b (a positive E4M3 normal) becomes the bf16
``s * 2**119``: bits ``(b << 4) + 0x7780``. One ``mul.rn.bf16x2`` gives
``(v * 2**-126) * (s * 2**119) = v * s * 2**-7``, exact (at most 6 significant bits, range 2**-14 .. 21);
the kernel multiplies the fp32 accumulator by ``alpha * 2**7``.

Scales the conversion cannot take directly are rewritten exactly: a zero scale zeroes its block's codes
(scale set to 1.0), a negative scale flips its block's signs. Subnormal E4M3 scales and NaN cannot be
expressed: :func:`decode_layout_supported` says so, and ``prepare_weight`` then keeps the ModelOpt layout
(exact, slower path).
"""
from __future__ import annotations

import torch

from ...formats import BLOCK_SIZE, unpack_nibbles

ROWS_PER_GROUP = 16  # weight rows per MMA (operand A's M)
CHUNK_K = 64  # k per 16-byte weight load of one lane
QUAD_K = 256  # k per scale load (4 chunks)
# source bit positions in the word of register j's lo half (e = 0; the hi half is +16):
# magnitude bits (m, e0, e1) and sign
EM_SOURCE = ((6, 7, 8), (3, 4, 5), (0, 1, 2), (10, 11, 13))
SIGN_SOURCE = (15, 12, 9, 14)
EM_MASK = 0x01C001C0
SIGN_MASK = 0x80008000
SCALE_BIAS_BITS = 0x7780  # (239 << 7): e4m3 bits << 4 plus this = bf16 of s * 2**119
MAGNITUDE_SHIFT = 7  # the decoded products are v * s * 2**-7
E4M3_ONE = 0x38


def _em_positions(j: int, e: int):
    return tuple(b + 16 * e for b in EM_SOURCE[j])


def _sign_position(j: int, e: int) -> int:
    return SIGN_SOURCE[j] + 16 * e


def _check_bit_plan() -> None:
    used = []
    for j in range(4):
        for e in range(2):
            used += list(_em_positions(j, e)) + [_sign_position(j, e)]
    assert sorted(used) == list(range(32)), "the decode bit plan must use each word bit once"


_check_bit_plan()


def check_decode_shape(n: int, k: int) -> None:
    """Raise ValueError unless the decode layout can hold an [N, K] weight (K a multiple of 256)."""
    if k % QUAD_K or k <= 0:
        raise ValueError(f"the sm90 layout needs K to be a positive multiple of {QUAD_K}, got K={k}")
    if n <= 0:
        raise ValueError(f"N must be positive, got {n}")


def decode_layout_supported(weight_scale: torch.Tensor) -> bool:
    """False when a block scale is NaN or an E4M3 subnormal (the kernel's scale conversion is exact only
    for normals; zero and negative scales are rewritten exactly by :func:`repack_weight`)."""
    bits = weight_scale.view(torch.uint8) & 0x7F
    subnormal = ((bits >> 3) == 0) & (bits != 0)
    nan = bits == 0x7F
    return not bool((subnormal | nan).any())


def _normalized_codes_and_scales(weight: torch.Tensor, weight_scale: torch.Tensor):
    """codes uint8 [N, K] and scale bytes uint8 [N, K/16] with every scale a positive normal: zero scales
    -> 1.0 with zero codes, negative scales -> positive with flipped code signs (exact rewrites)."""
    codes = unpack_nibbles(weight).to(torch.uint8)
    n, k = codes.shape
    scale_bits = weight_scale.view(torch.uint8)
    blocks = codes.reshape(n, k // BLOCK_SIZE, BLOCK_SIZE)
    zero = (scale_bits & 0x7F) == 0
    negative = ((scale_bits & 0x80) != 0) & ~zero
    blocks = torch.where(negative.unsqueeze(-1), blocks ^ 0x8, blocks)
    blocks = torch.where(zero.unsqueeze(-1), torch.zeros_like(blocks), blocks)
    scale_bits = torch.where(zero, torch.full_like(scale_bits, E4M3_ONE), scale_bits & 0x7F)
    return blocks.reshape(n, k), scale_bits


def _padded_rows(t: torch.Tensor, rows: int, fill: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = torch.full((rows - t.shape[0],) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def repack_weight(weight: torch.Tensor, weight_scale: torch.Tensor):
    """ModelOpt (uint8 [N, K/2], e4m3 [N, K/16]) -> (int32 words [RG, K/64, 32, 4], int32 scale words
    [RG, K/256, 32, 2]), RG = ceil(N/16); padded rows have zero codes and scale 1.0. Runs on the tensors'
    device; raises ValueError for a shape or scale the layout cannot hold."""
    n, k = weight.shape[0], weight.shape[1] * 2
    check_decode_shape(n, k)
    if not decode_layout_supported(weight_scale):
        raise ValueError("a block scale is NaN or an E4M3 subnormal: the sm90 layout cannot hold it exactly")
    codes, scale_bits = _normalized_codes_and_scales(weight, weight_scale)
    rg = -(-n // ROWS_PER_GROUP)
    codes = _padded_rows(codes, rg * ROWS_PER_GROUP, 0)
    scale_bits = _padded_rows(scale_bits, rg * ROWS_PER_GROUP, E4M3_ONE)
    # codes [RG, rh, g, c, t, kk, h, e] with row = 16 RG + 8 rh + g, k = 64 c + 16 t + 4 kk + 2 h + e
    c = codes.to(torch.int64).reshape(rg, 2, 8, k // CHUNK_K, 4, 4, 2, 2)
    c = c.permute(0, 3, 2, 4, 5, 1, 6, 7)  # [RG, c, g, t, kk, rh, h, e]
    words = torch.zeros(c.shape[:5], dtype=torch.int64, device=c.device)
    for rh in range(2):
        for h in range(2):
            j = rh + 2 * h
            for e in range(2):
                code = c[..., rh, h, e]
                for bit, position in enumerate(_em_positions(j, e)):
                    words |= ((code >> bit) & 1) << position
                words |= ((code >> 3) & 1) << _sign_position(j, e)
    words = words.reshape(rg, k // CHUNK_K, 32, 4)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    # scales [RG, rh, g, cq, ci, t] with block = 4 (4 cq + ci) + t
    s = scale_bits.reshape(rg, 2, 8, k // QUAD_K, 4, 4)
    s = s.permute(0, 3, 2, 5, 4, 1).contiguous()  # [RG, cq, g, t, ci, rh]
    scale_words = s.reshape(rg, k // QUAD_K, 32, 8).view(torch.int32).reshape(rg, k // QUAD_K, 32, 2)
    return words.contiguous(), scale_words.contiguous()


def unpack_repacked(words: torch.Tensor, scale_words: torch.Tensor, n: int, k: int):
    """The inverse of :func:`repack_weight` up to its exact rewrites: (codes uint8 [N, K], scale bytes
    uint8 [N, K/16]). Used by the CPU reference of the sm90 op and by the tests."""
    rg = words.shape[0]
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(rg, k // CHUNK_K, 8, 4, 4)  # [RG, c, g, t, kk]
    c = torch.zeros(w.shape + (2, 2, 2), dtype=torch.int64, device=w.device)  # + [rh, h, e]
    for rh in range(2):
        for h in range(2):
            j = rh + 2 * h
            for e in range(2):
                code = ((w >> _sign_position(j, e)) & 1) << 3
                for bit, position in enumerate(_em_positions(j, e)):
                    code |= ((w >> position) & 1) << bit
                c[..., rh, h, e] = code
    c = c.permute(0, 5, 2, 1, 3, 4, 6, 7)  # [RG, rh, g, c, t, kk, h, e]
    codes = c.reshape(rg * ROWS_PER_GROUP, k)[:n].to(torch.uint8)
    s = scale_words.contiguous().view(torch.uint8).reshape(rg, k // QUAD_K, 8, 4, 4, 2)  # [RG, cq, g, t, ci, rh]
    s = s.permute(0, 5, 2, 1, 4, 3)  # [RG, rh, g, cq, ci, t]
    scale_bits = s.reshape(rg * ROWS_PER_GROUP, k // BLOCK_SIZE)[:n]
    return codes, scale_bits.contiguous()


def decode_word_reference(word: int, scale_row_g: int, scale_row_g8: int):
    """Python model of the kernel's register decode of one word: the four A registers a0..a3 as (lo, hi)
    pairs of floats ``v * s * 2**-7`` (the tests compare them with E2M1 value x E4M3 scale)."""
    import struct

    def bf16(bits16):
        return struct.unpack("<f", struct.pack("<I", (bits16 & 0xFFFF) << 16))[0]

    word &= 0xFFFFFFFF
    out = []
    full = EM_MASK | SIGN_MASK
    registers = [word & full, (word << 3) & full, (word << 6) & full,
                 ((word >> 4) & 0x00C000C0) | ((word >> 5) & 0x01000100) | ((word << 1) & 0x80008000)]
    for j in range(4):
        bits = registers[j] & 0xFFFFFFFF
        scale = bf16((scale_row_g if j % 2 == 0 else scale_row_g8) * 16 + SCALE_BIAS_BITS)
        out.append((bf16(bits) * scale, bf16(bits >> 16) * scale))
    return out
