"""Numerical tests of the Blackwell block-scaled kernels. They run only on a compute-capability-10.x GPU;
none exists in this workbook's environment, so here they are skipped and the sm100 path is
compile-verified only."""
import torch

from conftest import requires_blackwell, requires_cute

from nvfp4lib import moe, quantize, swizzle_scales
from nvfp4lib.ops.gemm import dequantize_rows


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@requires_cute
@requires_blackwell
def test_single_group_kernel_equals_reference(fresh_seed):
    from nvfp4lib.kernels.sm100.blockscaled_gemm import run_blockscaled_gemm

    for m, n, k, tile_n in [(1, 256, 512, 128), (200, 384, 1024, 128), (300, 512, 7168, 256)]:
        a = quantize(torch.randn(m, k, device="cuda"))
        w = quantize(torch.randn(n, k, device="cuda") * 0.02)
        alpha = (a.global_scale * w.global_scale).expand(n).contiguous() * torch.linspace(0.5, 2, n, device="cuda")
        out = run_blockscaled_gemm(a.packed, swizzle_scales(a.block_scale), w.packed, swizzle_scales(w.block_scale), alpha, tile_n=tile_n)
        expected = (dequantize_rows(a.packed, a.block_scale) @ dequantize_rows(w.packed, w.block_scale).t()) * alpha
        assert torch.isfinite(out).all()
        # fp32 accumulation order differs from torch's: bf16 rounding dominates
        assert (out.float() - expected).abs().max() <= 1e-2 * expected.abs().max()
        assert _cosine(out, expected) > 0.99999


@requires_cute
@requires_blackwell
def test_grouped_kernel_equals_reference_with_uneven_and_empty_experts(fresh_seed):
    from nvfp4lib.kernels.sm100.grouped_blockscaled_gemm import run_grouped_blockscaled_gemm

    num_experts, hidden, inter = 8, 512, 256
    gate_up = torch.randn(num_experts, 2 * inter, hidden) * 0.05
    weights = moe.quantize_experts(gate_up, (inter, inter))
    weights = moe.GroupedWeight(weights.weight.cuda(), weights.block_scale.cuda(), weights.alpha.cuda(), weights.segment_sizes)
    ids = torch.randint(0, num_experts - 2, (150, 4), device="cuda")  # the last two experts stay empty
    ids[:90, 0] = 0  # expert 0 spans several 128-row tiles
    routing = moe.route(ids, torch.rand(150, 4, device="cuda"), num_experts)
    x_sorted = torch.randn(600, hidden, device="cuda").bfloat16()
    acts = moe.quantize_groups(x_sorted, routing.offsets)  # the scale assembly's grouped kernel on the GPU
    out = run_grouped_blockscaled_gemm(acts.packed, acts.swizzled_scale, acts.global_scales, routing.offsets, acts.padded_offsets,
                                       weights.weight, weights.swizzled_block_scale(), weights.alpha)
    expected = moe.reference_grouped_gemm_w4a4(acts, routing.offsets, weights)
    assert torch.isfinite(out).all()
    assert (out.float() - expected.float()).abs().max() <= 1e-2 * expected.float().abs().max()
    assert _cosine(out, expected) > 0.99999


@requires_cute
@requires_blackwell
def test_moe_block_dispatches_to_w4a4_on_blackwell(fresh_seed):
    num_experts, hidden, inter = 8, 512, 256
    gate_up = torch.randn(num_experts, 2 * inter, hidden) * 0.05
    down = torch.randn(num_experts, hidden, inter) * 0.05
    weights = moe.MoEWeights(moe.quantize_experts(gate_up, (inter, inter)), moe.quantize_experts(down))
    cuda = moe.MoEWeights(*(moe.GroupedWeight(w.weight.cuda(), w.block_scale.cuda(), w.alpha.cuda(), w.segment_sizes) for w in (weights.gate_up, weights.down)))
    ids = torch.randint(0, num_experts, (64, 6))
    topk = torch.softmax(torch.randn(64, 6), -1)
    x = torch.randn(64, hidden).bfloat16()
    out = moe.moe_block(x.cuda(), ids.cuda(), topk.cuda(), cuda).cpu()
    expected = moe.moe_block_w4a4_reference(x, ids, topk, weights)  # the same W4A4 math, on the CPU
    assert torch.isfinite(out).all()
    assert _cosine(out, expected) >= 0.9999
    assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() <= 1e-2
