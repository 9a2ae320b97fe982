"""The Blackwell (sm_100a) block-scaled kernels compile on a CPU machine, and their PTX holds the
block-scaled tcgen05 MMA on NVFP4 operands. (Compile-verified only: never run on hardware here.)"""
import re

import pytest
import torch

from conftest import requires_cute

pytestmark = requires_cute

BLOCK_SCALED_MMA = re.compile(r"tcgen05\.mma\.cta_group::1\.kind::mxf4nvf4\.block_scale\.block16")


def _ptx(compile_fn, tile_n):
    from nvfp4lib.kernels.cute_compile import ptx_of

    compiled = compile_fn(tile_n, arch="sm_100a", keep_ptx=True)
    _check_cubin(compiled)
    return ptx_of(compiled)


def _check_ptx(ptx):
    assert ".target sm_100a" in ptx
    # E2M1 x E2M1 with E4M3 scales over 16 elements: kind::mxf4nvf4, block_scale, block16
    assert BLOCK_SCALED_MMA.search(ptx), sorted(set(re.findall(r"tcgen05\.mma[\w.:]*", ptx)))
    assert "tcgen05.cp" in ptx  # scales copied shared -> tensor memory
    assert "tcgen05.ld" in ptx  # accumulator read back in the epilogue
    assert "cp.async.bulk.tensor" in ptx  # TMA loads
    assert "tcgen05.alloc" in ptx and "tcgen05.dealloc" in ptx
    # the epilogue stores each thread's bf16 row fragment with 16-byte vector stores, never element-wise
    stores = re.findall(r"st\.global[\w.]*", ptx)
    assert stores and all(".v4." in store for store in stores), sorted(set(stores))


def _check_cubin(compiled):
    """ptxas accepted it: an sm_100a ELF binary was produced (still never run on hardware)."""
    assert compiled.artifacts.CUBIN[:4] == b"\x7fELF"


@pytest.mark.parametrize("tile_n", [128, 256])
def test_single_group_kernel_compiles_to_block_scaled_tcgen05_mma(tile_n):
    from nvfp4lib.kernels.sm100.blockscaled_gemm import compile_blockscaled_gemm

    _check_ptx(_ptx(compile_blockscaled_gemm, tile_n))


@pytest.mark.parametrize("tile_n", [128, 256])
def test_grouped_kernel_compiles_to_block_scaled_tcgen05_mma(tile_n):
    from nvfp4lib.kernels.sm100.grouped_blockscaled_gemm import compile_grouped_blockscaled_gemm

    ptx = _ptx(compile_grouped_blockscaled_gemm, tile_n)
    _check_ptx(ptx)
    # the expert search reads offsets and padded offsets from global memory (device-side, no host sync)
    assert "ld.global" in ptx


def test_kernel_rejects_bad_tile():
    from nvfp4lib.kernels.sm100.blockscaled_gemm import BlockScaledGemmSm100

    with pytest.raises(ValueError, match="tile_n"):
        BlockScaledGemmSm100(192)


@pytest.mark.parametrize("n,k,experts", [(256, 512, 3), (384, 7168, 2)])
def test_grouped_weight_scales_match_cutedsl_batched_sf_layout(n, k, experts):
    """The layout the kernel builds for the expert scales, tile_atom_to_shape_SF((N, K, E)), addresses
    exactly the bytes that swizzle_scales writes for [E, N, K/16] (including the per-expert stride)."""
    from nvfp4lib import swizzle_scales
    from nvfp4lib.kernels.cute_compile import import_cute
    from nvfp4lib.kernels.cute_layout_probe import _mode_offset
    from cutlass.utils import blockscaled_layout

    _, cute = import_cute()
    captured = {}

    @cute.jit
    def trace():
        layout = blockscaled_layout.tile_atom_to_shape_SF((n, k, experts), 16)
        captured["shape"], captured["stride"] = layout.shape, layout.stride

    cute.compile(trace)
    shape, stride = captured["shape"], captured["stride"]
    scales = torch.randint(1, 255, (experts, n, k // 16), dtype=torch.uint8)
    swizzled = swizzle_scales(scales).reshape(-1)
    e, rows, cols = torch.meshgrid(torch.arange(experts), torch.arange(n), torch.arange(k // 16) * 16, indexing="ij")
    offsets = _mode_offset(rows, shape[0], stride[0]) + _mode_offset(cols, shape[1], stride[1]) + _mode_offset(e, shape[2], stride[2])
    assert torch.equal(swizzled[offsets], scales)


@pytest.mark.parametrize("tokens,top_k,num_experts", [(1, 6, 48), (37, 4, 8), (700, 6, 16)])
def test_grouped_tile_placement_covers_every_row_once_with_its_expert_and_scale_rows(fresh_seed, tokens, top_k, num_experts):
    """The grouped kernel's per-CTA arithmetic (mirrored by tile_placement) against the routing and the
    scale rows that moe.quantize_groups writes: every sorted row is computed by exactly one CTA, with
    its own expert's weights and its own scale row; unused tiles exit; nothing outside [0, M) is stored."""
    from nvfp4lib import moe
    from nvfp4lib.kernels.sm100.grouped_blockscaled_gemm import tile_placement

    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    ids[: tokens // 2, 0] = 0  # one hot expert
    ids = torch.where(ids == num_experts - 1, torch.zeros_like(ids), ids)  # the last expert stays empty
    routing = moe.route(ids, torch.rand(tokens, top_k), num_experts)
    offsets, padded = routing.offsets.tolist(), routing.padded_offsets.tolist()
    m = tokens * top_k
    capacity = moe.padded_rows_capacity(m, num_experts)
    covered = torch.zeros(m, dtype=torch.int64)
    for tile in range(capacity // 128):
        placement = tile_placement(tile, offsets, padded)
        if placement is None:
            assert tile * 128 >= padded[-1]
            continue
        expert, row_start, rows_valid, scale_tile = placement
        assert rows_valid > 0, "a used tile always holds at least one row of its expert"
        for r in range(min(128, rows_valid)):
            row = row_start + r
            assert 0 <= row < m and routing.expert_of_row[row] == expert
            # the scale row quantize_groups wrote for this activation row
            assert padded[expert] + (row - offsets[expert]) == 128 * scale_tile + r
            covered[row] += 1
    assert covered.eq(1).all()
