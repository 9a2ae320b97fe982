"""The nvfp4lib vLLM plugin against real vLLM 0.33.0 on CPU.

Everything vLLM-side is vLLM's own code: the entry-point loader, ModelConfig's choice of quantization
method, the linear layer classes, their weight loaders, the safetensors reader and
``process_weights_after_loading``. Only the name routing in ``tiny_model.TinyDSV4Block.load_weights`` is
ours, as it is every model's.
"""
import importlib.metadata
import pickle

import pytest
import torch

from nvfp4lib.formats import dequantize
from nvfp4lib.integrations import vllm as plugin
from nvfp4lib.ops.gemm import reference_gemm
from tiny_model import PARTS, build_block

ENTRY_POINT = "nvfp4lib.integrations.vllm:register"
CPU = torch.device("cpu")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm())


def parts_of(checkpoint, layer: int, module: str):
    """The checkpoint linears feeding a vLLM module, in shard order: (weight, weight_scale, weight_scale_2)."""
    return [tuple(checkpoint[f"layers.{layer}.{part}.{t}"] for t in ("weight", "weight_scale", "weight_scale_2")) for part in PARTS[module]]


def exact_reference(x: torch.Tensor, parts) -> torch.Tensor:
    """Independent of the plugin: each part dequantized with its own global scale in fp32, x @ W^T, bf16."""
    w = torch.cat([dequantize(packed, scale, g, torch.float32) for packed, scale, g in parts])
    return (x.float() @ w.t()).to(torch.bfloat16)


def load_block(vllm_config, checkpoint, quant_config, layer_ids=(0, 1)):
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    block = build_block(vllm_config, quant_config, layer_ids)
    block.load_weights(checkpoint.items())
    process_weights_after_loading(block, vllm_config.model_config, CPU)
    return block


# ----------------------------------------------------------------------------------------------
# Hooking in
# ----------------------------------------------------------------------------------------------
def test_entry_point_selects_the_plugin(vllm_config, results):
    """The installed entry point ran (load_general_plugins) and vLLM chose our config from hf_quant_config.json."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    values = [ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")]
    assert ENTRY_POINT in values, f"entry point {ENTRY_POINT} not installed (pyproject.toml [project.entry-points.\"vllm.general_plugins\"]); found {values}"
    assert plugin.QUANTIZATION_NAME in QUANTIZATION_METHODS
    assert vllm_config.model_config.quantization == plugin.QUANTIZATION_NAME
    assert type(vllm_config.quant_config).__name__ == "Nvfp4libModelOptConfig"
    results["selected_quantization"] = vllm_config.model_config.quantization


def test_register_is_reentrant(vllm_config):
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    for _ in range(3):
        plugin.register()
    assert QUANTIZATION_METHODS.count(plugin.QUANTIZATION_NAME) == 1
    assert WEIGHT_LOADER_V2_SUPPORTED.count("Nvfp4libLinearMethod") == 1
    assert get_quantization_config(plugin.QUANTIZATION_NAME) is plugin.Nvfp4libModelOptConfig
    copy = pickle.loads(pickle.dumps(vllm_config.quant_config))  # workers receive configs pickled
    assert type(copy) is plugin.Nvfp4libModelOptConfig and copy.exclude_modules == vllm_config.quant_config.exclude_modules


def test_override_rules(vllm_config):
    cls = plugin.Nvfp4libModelOptConfig
    cfg = lambda algo: {"quant_method": "modelopt_fp4", "quantization": {"quant_algo": algo}}  # noqa: E731
    assert cls.override_quantization_method(cfg("NVFP4"), None) == plugin.QUANTIZATION_NAME
    assert cls.override_quantization_method(cfg("W4A16_NVFP4"), None) == plugin.QUANTIZATION_NAME
    assert cls.override_quantization_method(cfg("NVFP4"), "modelopt_fp4") is None  # the user's explicit choice wins
    assert cls.override_quantization_method(cfg("MIXED_PRECISION"), None) is None  # left to vLLM's modelopt_mixed
    assert cls.override_quantization_method(cfg("FP8"), None) is None


def test_user_can_choose_the_stock_method(model_dir, vllm_config):
    from vllm.config import ModelConfig

    assert ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16", quantization="modelopt_fp4").quantization == "modelopt_fp4"


def test_layers_get_our_method_and_vllm_parameters(vllm_config, dims):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.model_executor.parameter import ModelWeightParameter, PerTensorScaleParameter

    block = build_block(vllm_config, vllm_config.quant_config, [0])
    for (_, name), layer in block.linears().items():
        assert type(layer.quant_method).__name__ == "Nvfp4libLinearMethod", name
        assert isinstance(layer.weight, ModelWeightParameter) and layer.weight.dtype == torch.uint8
        assert isinstance(layer.weight_scale, ModelWeightParameter) and layer.weight_scale.dtype == torch.float8_e4m3fn
        shards = len(PARTS[name])
        for scale in (layer.weight_scale_2, layer.input_scale):
            assert isinstance(scale, PerTensorScaleParameter) and scale.shape == (shards,)
        # the loaders are the layer's own (v2 for the parallel layers, as for vLLM's ModelOpt method)
        assert layer.weight.weight_loader.__self__ is layer
    excluded = ReplicatedLinear(dims["hidden"], 64, bias=False, quant_config=vllm_config.quant_config, prefix="lm_head")
    assert isinstance(excluded.quant_method, UnquantizedLinearMethod)


# ----------------------------------------------------------------------------------------------
# Loading through vLLM's loaders, exactness
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_outputs_equal_the_reference(vllm_config, checkpoint, fresh_seed, tokens, results):
    block = load_block(vllm_config, checkpoint, vllm_config.quant_config)
    for (layer_id, name), layer in block.linears().items():
        parts = parts_of(checkpoint, layer_id, name)
        # post-load state: the checkpoint bytes untouched, one exact alpha per output row, no per-shard leftovers
        assert torch.equal(layer.weight, torch.cat([p[0] for p in parts]))
        assert torch.equal(layer.weight_scale.view(torch.uint8), torch.cat([p[1] for p in parts]).view(torch.uint8))
        alpha = torch.cat([g.float().expand(p.shape[0]) for p, _, g in parts])
        assert torch.equal(layer.alpha, alpha)
        assert getattr(layer, "weight_scale_2", None) is None and getattr(layer, "input_scale", None) is None
        x = torch.randn(tokens, layer.input_size_per_partition, dtype=torch.bfloat16)
        out = layer(x)[0]
        assert out.dtype == torch.bfloat16 and out.shape == (tokens, layer.output_size_per_partition)
        assert torch.equal(out, reference_gemm(x, layer.weight, layer.weight_scale, alpha))
        # the independent fp32 reference sums in another order: at most one bf16 rounding step (2**-7) apart
        ref = exact_reference(x, parts)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-6 * ref.float().abs().max().item())
        if tokens == 7:
            results.setdefault("plugin_rel_error_vs_fp32_dequant", {})[f"layers.{layer_id}.{name}"] = rel_error(out, ref)


# ----------------------------------------------------------------------------------------------
# The stock ModelOpt method beside ours
# ----------------------------------------------------------------------------------------------
def test_stock_method_on_unequal_shard_scales(vllm_config, checkpoint, dims, fresh_seed, monkeypatch, results):
    """fused_wqa_wkv: wq_a and wkv quantized separately (weight_scale_2 ratio 3 in layer 0, 40 in layer 1).

    vLLM's stock ModelOpt NVFP4 method finds no NVFP4 kernel on CPU; with VLLM_BATCH_INVARIANT=1 it takes
    its emulation kernel (W4A4: it also quantizes activations to NVFP4). Its post-load keeps only the max
    weight_scale_2, so the shard with the smaller scale comes out scaled by max/own. On Hopper, W4A16 goes
    to Marlin with the same single max scale: that output is computed here as reference_gemm with
    alpha = max.
    """
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    stock_config = ModelOptNvFp4Config.from_config(vllm_config.model_config.hf_config.quantization_config)
    def make():
        with set_default_torch_dtype(torch.bfloat16):
            return MergedColumnParallelLinear(dims["hidden"], [dims["q_lora_rank"], dims["head_dim"]], bias=False, quant_config=stock_config, prefix="layers.0.attn.fused_wqa_wkv", disable_tp=True)

    with pytest.raises(ValueError, match="Failed to find a kernel"):
        make()
    record = {"stock_default_on_cpu": "ValueError: Failed to find a kernel that can implement the NVFP4 linear layer"}
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    ours_block = load_block(vllm_config, checkpoint, vllm_config.quant_config)
    for layer_id in (0, 1):
        stock = make()
        assert type(stock.quant_method.kernel).__name__ == "EmulationNvFp4LinearKernel"
        module = torch.nn.Module()
        module.fused_wqa_wkv = stock
        for shard, part in enumerate(PARTS["fused_wqa_wkv"]):
            for t in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
                param = getattr(stock, t)
                param.weight_loader(param, checkpoint[f"layers.{layer_id}.{part}.{t}"], shard)
        scales = stock.weight_scale_2.detach().clone()
        process_weights_after_loading(module, vllm_config.model_config, CPU)
        # the order problem: after the stock post-load, the per-shard scales are gone, only the max is left
        assert getattr(stock, "weight_scale_2", None) is None
        assert torch.equal(stock.weight_global_scale.reshape(()), scales.max())

        ours = ours_block.layers[str(layer_id)].fused_wqa_wkv
        parts = parts_of(checkpoint, layer_id, "fused_wqa_wkv")
        x = torch.randn(16, dims["hidden"], dtype=torch.bfloat16)
        ref = exact_reference(x, parts)
        out_ours, out_stock = ours(x)[0], stock(x)[0]
        marlin_like = reference_gemm(x, ours.weight, ours.weight_scale, torch.full_like(ours.alpha, float(scales.max())))
        split = dims["q_lora_rank"]
        entry = {"weight_scale_2": [float(s) for s in scales], "ratio": float(scales.max() / scales.min()), "stock_post_load_weight_global_scale": float(stock.weight_global_scale)}
        for label, out in (("ours", out_ours), ("stock_w4a4_emulation", out_stock), ("stock_w4a16_single_max_scale", marlin_like)):
            entry[label] = {shard: rel_error(out[:, sl], ref[:, sl]) for shard, sl in (("wq_a", slice(0, split)), ("wkv", slice(split, None)))}
        record[f"layers.{layer_id}.fused_wqa_wkv"] = entry
        ratio = entry["ratio"]
        # wkv holds the max scale; wq_a is decoded with it instead of its own: output scaled by `ratio`
        assert entry["stock_w4a16_single_max_scale"]["wq_a"] == pytest.approx(ratio - 1, rel=1e-2)
        assert entry["stock_w4a16_single_max_scale"]["wkv"] < 1e-2
        assert entry["stock_w4a4_emulation"]["wq_a"] > 0.5 * (ratio - 1)
        assert entry["ours"]["wq_a"] < 1e-2 and entry["ours"]["wkv"] < 1e-2
    results["unequal_shard_scales"] = record


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph(vllm_config, checkpoint, fresh_seed, results):
    """The layer forward traces in one graph with our op inside, then inductor's output equals eager."""
    block = load_block(vllm_config, checkpoint, vllm_config.quant_config, layer_ids=(0,))
    layers = block.layers["0"]

    def shared_expert(x):
        gate_up = layers.gate_up(x)[0]
        gate, up = gate_up.chunk(2, dim=-1)
        return layers.down(torch.nn.functional.silu(gate) * up)[0] + layers.fused_wqa_wkv(x)[0][:, : x.shape[1]].sum()

    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    x = torch.randn(5, layers.gate_up.input_size_per_partition, dtype=torch.bfloat16)
    torch._dynamo.reset()
    traced = torch.compile(shared_expert, fullgraph=True, backend=recording_backend)
    assert torch.equal(traced(x), shared_expert(x))
    assert sum("nvfp4lib.gemm_w4a16" in t for t in seen) == 3, seen
    compiled = torch.compile(shared_expert, fullgraph=True, backend="inductor", dynamic=True)
    for tokens in (5, 12):
        x = torch.randn(tokens, layers.gate_up.input_size_per_partition, dtype=torch.bfloat16)
        eager = shared_expert(x)
        torch.testing.assert_close(compiled(x), eager, rtol=2**-7, atol=1e-2 * eager.float().abs().max().item())
    results["torch_compile"] = {"fullgraph": True, "gemm_ops_in_graph": 3, "backends": ["recording (exact)", "inductor, dynamic tokens 5 and 12 (vs eager)"]}


# ----------------------------------------------------------------------------------------------
# Errors that name the problem
# ----------------------------------------------------------------------------------------------
def test_unloaded_shard_is_an_error(vllm_config, checkpoint, dims):
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    block = build_block(vllm_config, vllm_config.quant_config, [0])
    block.load_weights((k, v) for k, v in checkpoint.items() if "attn.wkv." not in k)
    with pytest.raises(ValueError, match="never loaded"):
        process_weights_after_loading(block, vllm_config.model_config, CPU)


def test_w4a16_checkpoint_without_input_scale(vllm_config, checkpoint, fresh_seed):
    """W4A16_NVFP4 exports carry no input_scale: loading without it works and gives the same output."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    block = build_block(vllm_config, vllm_config.quant_config, [0])
    block.load_weights((k, v) for k, v in checkpoint.items() if not k.endswith(".input_scale"))
    process_weights_after_loading(block, vllm_config.model_config, CPU)
    layer = block.layers["0"].fused_wqa_wkv
    x = torch.randn(3, layer.input_size_per_partition, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x)[0].float(), exact_reference(x, parts_of(checkpoint, 0, "fused_wqa_wkv")).float(), rtol=2**-7, atol=1e-6)


def test_partial_input_scale_is_an_error(vllm_config, checkpoint):
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    block = build_block(vllm_config, vllm_config.quant_config, [0])
    block.load_weights((k, v) for k, v in checkpoint.items() if k != "layers.0.attn.wkv.input_scale")
    with pytest.raises(ValueError, match="input_scale of shard 1 was never loaded"):
        process_weights_after_loading(block, vllm_config.model_config, CPU)


def test_fp16_model_is_an_error(vllm_config, dims):
    from vllm.model_executor.layers.linear import ReplicatedLinear

    with pytest.raises(ValueError, match="bf16"):
        ReplicatedLinear(dims["hidden"], 64, bias=False, params_dtype=torch.float16, quant_config=vllm_config.quant_config, prefix="x")


def test_batched_layer_is_an_error(vllm_config, checkpoint, dims):
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    block = build_block(vllm_config, vllm_config.quant_config, [0])
    block.load_weights(checkpoint.items())
    block.layers["0"].wq_b.is_bmm = True
    with pytest.raises(ValueError, match="is_bmm"):
        process_weights_after_loading(block, vllm_config.model_config, CPU)
