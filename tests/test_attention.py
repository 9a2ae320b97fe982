"""Attention projection modules (fused_wqa_wkv, wq_b, grouped wo_a in NVFP4 / FP8, wo_b) and the attention
benchmark's CPU dry run. GPU tests compare the CUDA path against the CPU reference and skip here."""
import json
import os

import pytest
import torch

from conftest import requires_gpu
from nvfp4lib.checkpoint import Checkpoint
from nvfp4lib.modules.attention import (
    AttentionProjections,
    FusedWqaWkv,
    GroupedFP8Projection,
    GroupedNVFP4Projection,
    NVFP4Projection,
    quantize_fp8_activations,
    reference_grouped_gemm,
    wo_a_format_errors,
)
from nvfp4lib.synthetic import TINY, TINY_CHECKPOINT, quantize_fp8_linear, quantize_nvfp4_linear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16_HALF_ULP = 2.0**-8


@pytest.fixture(scope="module")
def tiny():
    return Checkpoint(os.path.join(REPO, TINY_CHECKPOINT))


def assert_equal_to_bf16_rounding(out: torch.Tensor, reference_fp32: torch.Tensor):
    noise = 1e-5 * float(reference_fp32.abs().max())
    excess = (out.float() - reference_fp32).abs() - (BF16_HALF_ULP * reference_fp32.abs() + noise)
    assert float(excess.max()) <= 0, f"off by more than bf16 rounding: {float(excess.max())}"


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def test_nvfp4_projection_is_the_dequantized_product(tiny, fresh_seed):
    linear = tiny.nvfp4_linear("layers.0.attn.wq_b")
    x = torch.randn(5, 3, linear.k, dtype=torch.bfloat16)
    out = NVFP4Projection(linear)(x)
    assert out.shape == (5, 3, linear.n) and out.dtype == torch.bfloat16
    assert_equal_to_bf16_rounding(out, x.float() @ linear.dequantize(torch.float32).t())


def test_fused_wqa_wkv_keeps_both_scales(tiny, fresh_seed):
    wq_a, wkv = tiny.nvfp4_linear("layers.1.attn.wq_a"), tiny.nvfp4_linear("layers.1.attn.wkv")
    ratio = float(wkv.weight_scale_2 / wq_a.weight_scale_2)
    assert ratio > 30, "layer 1 of the tiny checkpoint has a ~40x scale ratio"
    x = torch.randn(7, TINY.hidden, dtype=torch.bfloat16)
    q_latent, kv = FusedWqaWkv(wq_a, wkv)(x)
    assert q_latent.shape == (7, TINY.q_lora_rank) and kv.shape == (7, TINY.head_dim)
    assert_equal_to_bf16_rounding(q_latent, x.float() @ wq_a.dequantize(torch.float32).t())
    assert_equal_to_bf16_rounding(kv, x.float() @ wkv.dequantize(torch.float32).t())
    # what vLLM 0.33 would compute: q_latent inflated by the ratio, kv right
    q_max, kv_max = FusedWqaWkv(wq_a, wkv, strategy="max")(x)
    assert rel_err(q_max, q_latent * ratio) < 2 * BF16_HALF_ULP
    assert torch.equal(kv_max, kv)


def test_grouped_nvfp4_reference_and_loop_agree(tiny, fresh_seed):
    linear = tiny.nvfp4_linear("layers.0.attn.wo_a")
    module = GroupedNVFP4Projection(linear, TINY.o_groups)
    assert module.n_group == TINY.o_lora_rank and module.k == TINY.wo_a_group_k and not module.grouped_kernel
    x = torch.randn(6, TINY.o_groups, module.k, dtype=torch.bfloat16)
    decoded = linear.dequantize(torch.float32).view(TINY.o_groups, module.n_group, module.k)
    reference = torch.stack([x[:, g].float() @ decoded[g].t() for g in range(TINY.o_groups)], dim=1)
    batched, looped, diagonal = module.forward_reference(x), module.forward_loop(x), module.forward_diagonal(x)
    assert batched.shape == diagonal.shape == (6, TINY.o_groups, TINY.o_lora_rank)
    assert_equal_to_bf16_rounding(batched, reference)
    assert_equal_to_bf16_rounding(looped, reference)
    assert_equal_to_bf16_rounding(diagonal, reference)
    assert torch.equal(module(x), batched), "CPU forward is the batched reference"
    # group g only sees its own slice of the weight: zeroing x's group 3 zeroes output group 3 only
    x[:, 3] = 0
    out = module(x)
    assert bool((out[:, 3] == 0).all()) and bool((out[:, 4] != 0).any())


def test_reference_grouped_gemm_applies_per_group_alpha(fresh_seed):
    parts = [quantize_nvfp4_linear(f"g{g}", torch.randn(16, 32, dtype=torch.bfloat16) * (g + 1), input_amax=1.0) for g in range(3)]
    weight = torch.stack([p.weight for p in parts])
    block = torch.stack([p.weight_scale for p in parts])
    alpha = torch.stack([p.weight_scale_2.expand(16) for p in parts])
    x = torch.randn(4, 3, 32, dtype=torch.bfloat16)
    out = reference_grouped_gemm(x, weight, block, alpha)
    for g, part in enumerate(parts):
        assert_equal_to_bf16_rounding(out[:, g], x[:, g].float() @ part.dequantize(torch.float32).t())


def test_grouped_fp8_w8a8_reference(tiny, fresh_seed):
    linear = tiny.fp8_linear("layers.1.attn.wo_a")
    module = GroupedFP8Projection(linear, TINY.o_groups)
    x = torch.randn(5, TINY.o_groups, TINY.wo_a_group_k, dtype=torch.bfloat16)
    x_fp8 = quantize_fp8_activations(x, linear.input_scale).float()
    weight = linear.weight.float().view(TINY.o_groups, -1, TINY.wo_a_group_k)
    expected = torch.einsum("tgk,gnk->tgn", x_fp8, weight) * (linear.input_scale * linear.weight_scale)
    assert_equal_to_bf16_rounding(module(x), expected)
    assert_equal_to_bf16_rounding(module.forward_scaled_mm(x), expected), "the GPU path's layouts, via CPU _scaled_mm"
    weight_only = GroupedFP8Projection(linear, TINY.o_groups, activations="bf16")
    weight_only_reference = torch.einsum("tgk,gnk->tgn", x.float(), weight * linear.weight_scale)
    assert_equal_to_bf16_rounding(weight_only(x), weight_only_reference)
    # the GPU weight-only path decodes the weight to bf16 first: one more rounding of each weight
    assert rel_err(weight_only.forward_scaled_mm(x), weight_only_reference) < 2 * BF16_HALF_ULP


def test_wo_a_format_accuracy_ordering(fresh_seed):
    groups, n_group, k = 16, 32, 64
    weight = (torch.randn(groups * n_group, k) / k**0.5).to(torch.bfloat16)
    x = torch.randn(8, groups, k, dtype=torch.bfloat16)
    errors = {row["format"]: row["rel_err"] for row in wo_a_format_errors(weight, x, groups)}
    # E2M1 (1 mantissa bit, per-16 scale) ~ 9-10%; E4M3 weight ~ 2-3%; W8A8 adds the activation's ~2-3%
    assert 0.06 < errors["nvfp4"] < 0.13
    assert errors["fp8 weight-only"] < errors["fp8 W8A8"] < 0.06


def test_attention_projections_from_checkpoint(tiny, fresh_seed):
    x = torch.randn(4, TINY.hidden, dtype=torch.bfloat16)
    o = torch.randn(4, TINY.n_heads * TINY.head_dim, dtype=torch.bfloat16)
    for layer, wo_a_type in ((0, GroupedNVFP4Projection), (1, GroupedFP8Projection)):
        projections = AttentionProjections.from_checkpoint(tiny, layer)
        assert isinstance(projections.wo_a, wo_a_type)
        q, kv = projections.project_in(x)
        assert q.shape == (4, TINY.n_heads * TINY.head_dim) and kv.shape == (4, TINY.head_dim)
        wq_a = tiny.nvfp4_linear(f"layers.{layer}.attn.wq_a").dequantize(torch.float32)
        wq_b = tiny.nvfp4_linear(f"layers.{layer}.attn.wq_b").dequantize(torch.float32)
        q_reference = (x.float() @ wq_a.t()).to(torch.bfloat16).float() @ wq_b.t()
        assert rel_err(q, q_reference) < 2 * BF16_HALF_ULP
        y = projections.project_out(o)
        assert y.shape == (4, TINY.hidden) and bool(torch.isfinite(y).all())


def test_modules_refuse_moving_and_bad_inputs(tiny):
    module = NVFP4Projection(tiny.nvfp4_linear("layers.0.attn.wq_b"))
    with pytest.raises(RuntimeError, match="build it from tensors on the target device"):
        module.to(torch.float32)
    with pytest.raises(ValueError, match="x must be bf16"):
        module(torch.randn(2, module.k))
    with pytest.raises(ValueError, match="the weight expects K=128"):
        module(torch.randn(2, 64, dtype=torch.bfloat16))
    grouped = GroupedNVFP4Projection(tiny.nvfp4_linear("layers.0.attn.wo_a"), TINY.o_groups)
    with pytest.raises(ValueError, match=r"x must be \[T, 16, 64\]"):
        grouped(torch.randn(2, 8, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        GroupedNVFP4Projection(tiny.nvfp4_linear("layers.0.attn.wo_a"), 3)
    with pytest.raises(ValueError, match="K=256 but .* K=128"):
        FusedWqaWkv(tiny.nvfp4_linear("layers.0.attn.wq_a"), tiny.nvfp4_linear("layers.0.attn.wq_b"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark would time for real (this is the CPU dry run)")
def test_benchmark_dry_run_on_cpu(tmp_path):
    """The GPU benchmark's structure (cases, correctness checks, JSON) runs at tiny sizes on a CPU; no times."""
    from nvfp4lib.bench import attention

    out = tmp_path / "attention_cpu.json"
    assert attention.main(["--small", "--sets", "2", "--out", str(out)]) == 0
    result = json.load(open(out))
    assert {"device", "date", "commit", "method"} <= result.keys()
    cases = {(row["case"], row["m"]) for row in result["rows"]}
    assert ("fused_wqa_wkv", 1) in cases and ("wo_a_grouped", 16) in cases and ("wo_b", 16) in cases
    for row in result["rows"]:
        assert row["rel_err"] <= 1e-2 and row["cosine"] >= 0.9999, row
        assert row["time_us"] is None, "no timing without a GPU"
        if row["case"] == "wo_a_grouped":
            assert row["diagonal_rel_err"] <= 1e-2 and row["fp8_rel_err"] < 0.06, row


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA paths against the CPU reference (skipped on this machine, with the reason)
# ----------------------------------------------------------------------------------------------
@requires_gpu
def test_attention_projections_on_gpu_match_cpu(tiny, fresh_seed):
    x = torch.randn(16, TINY.hidden, dtype=torch.bfloat16)
    o = torch.randn(16, TINY.n_heads * TINY.head_dim, dtype=torch.bfloat16)
    for layer in (0, 1):
        cpu = AttentionProjections.from_checkpoint(tiny, layer)
        gpu = AttentionProjections.from_checkpoint(tiny, layer, device="cuda")
        for got, want in zip(gpu.project_in(x.cuda()), cpu.project_in(x)):
            assert rel_err(got.cpu(), want) <= 1e-2
        got, want = gpu.project_out(o.cuda()).cpu(), cpu.project_out(o)
        assert rel_err(got, want) <= 1e-2
        assert float(torch.nn.functional.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0)) >= 0.9999


@requires_gpu
def test_grouped_fp8_scaled_mm_matches_emulation(fresh_seed):
    weight = torch.randn(16 * 64, 128, dtype=torch.bfloat16) / 128**0.5
    linear = quantize_fp8_linear("wo_a", weight, input_amax=4.0)
    x = torch.randn(32, 16, 128, dtype=torch.bfloat16)
    cpu = GroupedFP8Projection(linear, 16)(x)
    gpu = GroupedFP8Projection(linear, 16, device="cuda")(x.cuda()).cpu()
    assert rel_err(gpu, cpu) <= 1e-2


@requires_gpu
@pytest.mark.parametrize("m", [1, 16, 256])
def test_full_size_projections_on_gpu(fresh_seed, m):
    """DeepSeek-V4-Pro shapes through the CUDA dispatch against the fp32 reference (rel err <= 1e-2,
    cosine >= 0.9999): fused_wqa_wkv with two scales, wo_a (grouped op, loop and diagonal; on Hopper the
    grouped kernel captured in a CUDA graph and replayed with new input), wo_b."""
    from nvfp4lib.bench.attention import decoded, random_nvfp4
    from nvfp4lib.synthetic import DEEPSEEK_V4_PRO as dims

    def check(out, reference):
        assert rel_err(out, reference) <= 1e-2
        assert float(torch.nn.functional.cosine_similarity(out.float().flatten(), reference.flatten(), dim=0)) >= 0.9999

    wq_a = random_nvfp4("wq_a", dims.q_lora_rank, dims.hidden, "cuda")
    wkv = random_nvfp4("wkv", dims.head_dim, dims.hidden, "cuda", global_scale=float(wq_a.weight_scale_2) * 37)
    x = torch.randn(m, dims.hidden, dtype=torch.bfloat16, device="cuda")
    q_latent, kv = FusedWqaWkv(wq_a, wkv, device="cuda")(x)
    check(q_latent, x.float() @ decoded(wq_a, torch.float32).t())
    check(kv, x.float() @ decoded(wkv, torch.float32).t())

    wo_a = random_nvfp4("wo_a", dims.o_groups * dims.o_lora_rank, dims.wo_a_group_k, "cuda")
    o = torch.randn(m, dims.o_groups, dims.wo_a_group_k, dtype=torch.bfloat16, device="cuda")
    reference = torch.einsum("tgk,gnk->tgn", o.float(), decoded(wo_a, torch.float32).view(dims.o_groups, dims.o_lora_rank, -1))
    module = GroupedNVFP4Projection(wo_a, dims.o_groups, device="cuda")
    check(module(o), reference)
    check(module.forward_loop(o), reference)
    if module.grouped_kernel:
        check(module.forward_batched(o), reference)
    check(module.forward_diagonal(o), reference)
    if torch.cuda.get_device_capability()[0] == 9:  # Hopper: the one-launch grouped kernel, replayed in a graph
        assert module.grouped_kernel
        static = o.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = module(static)
        static.copy_(torch.randn_like(o))
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        fresh = torch.einsum("tgk,gnk->tgn", static.float(), decoded(wo_a, torch.float32).view(dims.o_groups, dims.o_lora_rank, -1))
        check(captured, fresh)
        assert torch.equal(captured, module(static))  # eager runs the same kernels (grouped for T <= 64, else the loop)

    wo_b = random_nvfp4("wo_b", *dims.shapes()["attn.wo_b"], "cuda")
    z = torch.randn(m, dims.o_groups * dims.o_lora_rank, dtype=torch.bfloat16, device="cuda")
    check(NVFP4Projection(wo_b, device="cuda")(z), z.float() @ decoded(wo_b, torch.float32).t())
