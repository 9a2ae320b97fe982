"""SharedExpert (gate_up -> clamped SwiGLU -> down over NVFP4 weights) against the fp32 reference that
composes quantize / dequantize; checkpoint loading by name; bad input. The GPU test runs the same module
on a Hopper GPU at DeepSeek-V4-Pro shapes and skips here."""
import os

import pytest
import torch

from conftest import requires_gpu, requires_hopper
from nvfp4lib.checkpoint import Checkpoint, CheckpointError
from nvfp4lib.modules.shared_expert import (
    SWIGLU_LIMIT,
    SharedExpert,
    clamped_swiglu,
    reference_shared_expert,
    shared_expert_prefix,
)
from nvfp4lib.synthetic import TINY, TINY_CHECKPOINT, UP, quantize_nvfp4_linear, synthetic_weight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL_REL, TOL_COS = 1e-2, 0.9999  # issue 4: bf16 rounding only


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def cosine(out, ref):
    a, b = out.float().flatten(), ref.float().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def random_linears(hidden, inter, same_gate_up_scale=True, device=None):
    """Quantized random gate / up / down linears and their bf16 originals (rows with spread norms)."""
    def weight(n, k):
        w = torch.randn(n, k) / k**0.5 * torch.exp(0.5 * torch.randn(n, 1))
        return w.to(torch.bfloat16)

    wg, wu, wd = weight(inter, hidden), weight(inter, hidden) * 3, weight(hidden, inter)
    common = torch.maximum(wg.float().abs().amax(), wu.float().abs().amax()) if same_gate_up_scale else None
    gate = quantize_nvfp4_linear("se.w1", wg, 8.0, common)
    up = quantize_nvfp4_linear("se.w3", wu, 8.0, common)
    down = quantize_nvfp4_linear("se.w2", wd, 8.0)
    return (gate, up, down), (wg, wu, wd)


def activations(t, hidden, scale=4.0):
    return (torch.randn(t, hidden) * scale).to(torch.bfloat16)


def test_clamped_swiglu_clamps_gate_above_and_up_both_sides():
    gate = torch.tensor([-30.0, -1.0, 0.5, 9.0, 10.0, 25.0])
    up = torch.tensor([-40.0, -3.0, 2.0, 11.0, -10.5, 50.0])
    out = clamped_swiglu(gate, up, SWIGLU_LIMIT)
    g = torch.minimum(gate, torch.tensor(10.0))
    u = up.clamp(-10.0, 10.0)
    torch.testing.assert_close(out, g * torch.sigmoid(g) * u, rtol=1e-6, atol=0)
    assert 0 < out[0] < 1e-10  # silu(-30) * -10: the gate is not clamped below
    assert torch.equal(clamped_swiglu(gate, up, None), torch.nn.functional.silu(gate) * up)


def test_tiny_checkpoint_layer_matches_reference(fresh_seed):
    ckpt = Checkpoint(os.path.join(REPO, TINY_CHECKPOINT))
    expert = SharedExpert.from_checkpoint(ckpt, layer=1)
    prefix = shared_expert_prefix(1)
    linears = [ckpt.nvfp4_linear(f"{prefix}.{n}") for n in ("w1", "w3", "w2")]
    assert (expert.hidden, expert.intermediate) == (TINY.hidden, TINY.shared_intermediate)
    x = activations(33, TINY.hidden)
    out = expert(x)
    ref = reference_shared_expert(x, *linears)
    assert out.dtype == torch.bfloat16 and out.shape == (33, TINY.hidden)
    assert rel_err(out, ref) <= TOL_REL and cosine(out, ref) >= TOL_COS
    # the same bf16 rounding points as the reference: nearly every element is identical
    assert float((out != ref).float().mean()) < 0.05


@pytest.mark.parametrize("same_scale", [True, False])
def test_random_expert_matches_reference_and_reports_quantization_error(fresh_seed, same_scale):
    (gate, up, down), originals = random_linears(256, 384, same_gate_up_scale=same_scale)
    if not same_scale:
        assert float(gate.weight_scale_2) != float(up.weight_scale_2)
    expert = SharedExpert(gate, up, down)
    assert expert.gate_up.segment_sizes == (384, 384)
    x = activations(17, 256)
    out = expert(x.reshape(1, 17, 256)).reshape(17, 256)
    ref = reference_shared_expert(x, gate, up, down)
    assert rel_err(out, ref) <= TOL_REL and cosine(out, ref) >= TOL_COS
    # quantization error against the bf16 originals is reported separately: NVFP4-sized, not bf16-sized
    quant = rel_err(out, reference_shared_expert(x, gate, up, down, weights=originals))
    assert 2e-2 < quant < 0.25


def test_clamp_is_active_on_large_activations(fresh_seed):
    (gate, up, down), _ = random_linears(256, 256)
    expert = SharedExpert(gate, up, down)
    x = activations(8, 256, scale=40.0)
    h = torch.ops.nvfp4lib.gemm_w4a16(x, expert.gate_up.weight, expert.gate_up.block_scale, expert.gate_up.alpha, None)
    assert float(h[:, :256].float().max()) > SWIGLU_LIMIT and float(h[:, 256:].float().abs().max()) > SWIGLU_LIMIT
    out = expert(x)
    ref = reference_shared_expert(x, gate, up, down)
    unclamped = reference_shared_expert(x, gate, up, down, swiglu_limit=None)
    assert rel_err(out, ref) <= TOL_REL
    assert rel_err(unclamped, ref) > 0.05  # the clamp changed the result, and the module follows it


def test_from_tensors_names_missing_and_mismatched(fresh_seed):
    (gate, up, down), _ = random_linears(256, 128)
    tensors = {}
    for lin, name in zip((gate, up, down), ("w1", "w3", "w2")):
        for key, t in lin.tensors().items():
            tensors[key.replace(lin.prefix, f"p.{name}")] = t
    expert = SharedExpert.from_tensors(tensors, "p")
    assert expert.names == ("p.w1", "p.w3", "p.w2")
    missing = dict(tensors)
    del missing["p.w3.weight_scale"]
    with pytest.raises((CheckpointError, ValueError), match="p.w3.weight_scale"):
        SharedExpert.from_tensors(missing, "p")
    (g2, u2, d2), _ = random_linears(256, 128)
    small_up = quantize_nvfp4_linear("se.w3", synthetic_weight(TINY, 0, UP)[:64], 4.0)
    with pytest.raises(ValueError, match="gate"):
        SharedExpert(g2, small_up, d2)
    with pytest.raises(ValueError, match="down"):
        SharedExpert(g2, u2, quantize_nvfp4_linear("se.w2", torch.randn(256, 256).to(torch.bfloat16), 4.0))


def test_bad_input_and_move_refused(fresh_seed):
    (gate, up, down), _ = random_linears(256, 128)
    expert = SharedExpert(gate, up, down)
    with pytest.raises(ValueError, match="bf16"):
        expert(torch.randn(2, 256))
    with pytest.raises(ValueError, match="hidden=256"):
        expert(torch.randn(2, 128).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="one device"):
        expert.to(torch.float32)
    # weights only: about N*K*9/16 bytes plus alpha, no bf16 copy
    n_params = 2 * 128 * 256 + 256 * 128
    assert expert.nbytes < n_params * 9 / 16 + 4 * (2 * 128 + 256) + 1


@pytest.fixture(scope="module")
def gpu_expert():
    """A DeepSeek-V4-Pro-sized shared expert quantized on the GPU (hidden 7168, intermediate 3072)."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))

    def weight(n, k):
        return (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)

    wg, wu, wd = weight(3072, 7168), weight(3072, 7168) * 3, weight(7168, 3072)
    linears = (quantize_nvfp4_linear("se.w1", wg, 8.0), quantize_nvfp4_linear("se.w3", wu, 8.0), quantize_nvfp4_linear("se.w2", wd, 8.0))
    return SharedExpert(*linears), linears


@requires_gpu
@requires_hopper
@pytest.mark.parametrize("t", [1, 16, 128])
def test_gpu_shared_expert_deepseek_v4_pro_shapes(gpu_expert, t):
    expert, linears = gpu_expert
    assert expert.gate_up.layout == "sm90" and expert.down.layout == "sm90"
    x = activations(t, 7168).cuda()
    out = expert(x)
    torch.cuda.synchronize()
    ref = reference_shared_expert(x, *linears)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL_REL and cosine(out, ref) >= TOL_COS


def test_fused_swiglu_op_matches_the_module_activation(fresh_seed):
    """The op SharedExpert uses on a GPU (gate_up GEMM with the SwiGLU fused) computes, on the prepared
    gate_up weight, what the composed path computes: equal up to the composed path's extra bf16 rounding."""
    op = getattr(torch.ops.nvfp4lib, "gemm_w4a16_swiglu", None)
    if op is None:
        pytest.skip("the GEMM package registers no fused gate_up + SwiGLU op")
    (gate, up, down), _ = random_linears(256, 128, same_gate_up_scale=False)
    expert = SharedExpert(gate, up, down)
    x = activations(9, 256, scale=30.0)
    p = expert.gate_up
    fused = op(x, p.weight, p.block_scale, p.alpha, p.n, SWIGLU_LIMIT)
    composed = expert.activation(x)
    assert fused.shape == composed.shape == (9, 128) and fused.dtype == torch.bfloat16
    assert rel_err(fused, composed) <= TOL_REL and cosine(fused, composed) >= TOL_COS
    no_clamp = op(x, p.weight, p.block_scale, p.alpha, p.n, float("inf"))
    assert rel_err(no_clamp, fused) > 0.05  # the limit is applied (activations are large enough to clamp)
