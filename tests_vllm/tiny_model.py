"""A small DeepSeek-V4-shaped block built from vLLM's real linear layers, and its checkpoint.

``TinyDSV4Block`` holds, per decoder layer, the projections whose NVFP4 weights the plugin serves:

==================  ==========================================  ========================================
vLLM layer          class (as in vllm/models/deepseek_v4)        checkpoint tensors (shard id)
==================  ==========================================  ========================================
fused_wqa_wkv       MergedColumnParallelLinear, disable_tp       attn.wq_a (0), attn.wkv (1): unequal
                                                                 weight_scale_2 (ratio 3 and 40)
wq_b                ReplicatedLinear (the indexer's wq_b is one)  attn.wq_b
wo_b                RowParallelLinear                           attn.wo_b
gate_up             MergedColumnParallelLinear                  shared_experts.w1 (0), w3 (1): equal
down                RowParallelLinear                           shared_experts.w2
==================  ==========================================  ========================================

``load_weights`` maps checkpoint names to (parameter, shard id) the way a vLLM model's ``load_weights``
does and calls the parameter's own ``weight_loader`` (vLLM's). ``wo_a`` is skipped: vLLM runs it as a
batched einsum (``is_bmm``), which the plugin does not take over.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Dict, Iterable, List, Tuple

import torch

import nvfp4lib
from nvfp4lib.formats import GLOBAL_SCALE_DENOMINATOR

# (vLLM module, checkpoint name, shard id or None)
STACKED = (
    ("fused_wqa_wkv", "attn.wq_a", 0),
    ("fused_wqa_wkv", "attn.wkv", 1),
    ("gate_up", "ffn.shared_experts.w1", 0),
    ("gate_up", "ffn.shared_experts.w3", 1),
)
UNSTACKED = (("wq_b", "attn.wq_b"), ("wo_b", "attn.wo_b"), ("down", "ffn.shared_experts.w2"))
SKIPPED = ("attn.wo_a",)
# vLLM module -> its checkpoint parts in shard order
PARTS = {
    "fused_wqa_wkv": ("attn.wq_a", "attn.wkv"),
    "gate_up": ("ffn.shared_experts.w1", "ffn.shared_experts.w3"),
    "wq_b": ("attn.wq_b",),
    "wo_b": ("attn.wo_b",),
    "down": ("ffn.shared_experts.w2",),
}
COMMITTED_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "data", "checkpoints", "tiny-dsv4-nvfp4")
TINY_DIMS = dict(hidden=256, q_lora_rank=128, head_dim=64, n_heads=16, o_groups=16, o_lora_rank=32, shared_intermediate=256, layers=2)
WKV_AMAX_RATIOS = (3.0, 40.0)


class TinyDSV4Block(torch.nn.Module):
    """Per layer: fused_wqa_wkv, wq_b, wo_b, gate_up, down, built with ``quant_config`` (see module doc)."""

    def __init__(self, dims: dict, quant_config, layer_ids: Iterable[int]):
        from vllm.model_executor.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear

        super().__init__()
        self.layers = torch.nn.ModuleDict()
        for i in layer_ids:
            p = f"layers.{i}"
            hidden, q_lora, head_dim = dims["hidden"], dims["q_lora_rank"], dims["head_dim"]
            block = torch.nn.Module()
            block.fused_wqa_wkv = MergedColumnParallelLinear(hidden, [q_lora, head_dim], bias=False, quant_config=quant_config, prefix=f"{p}.attn.fused_wqa_wkv", disable_tp=True)
            block.wq_b = ReplicatedLinear(q_lora, dims["n_heads"] * head_dim, bias=False, quant_config=quant_config, prefix=f"{p}.attn.wq_b")
            block.wo_b = RowParallelLinear(dims["o_groups"] * dims["o_lora_rank"], hidden, bias=False, quant_config=quant_config, prefix=f"{p}.attn.wo_b")
            inter = dims["shared_intermediate"]
            block.gate_up = MergedColumnParallelLinear(hidden, [inter, inter], bias=False, quant_config=quant_config, prefix=f"{p}.ffn.shared_experts.gate_up")
            block.down = RowParallelLinear(inter, hidden, bias=False, quant_config=quant_config, prefix=f"{p}.ffn.shared_experts.down")
            self.layers[str(i)] = block

    def linears(self) -> Dict[Tuple[int, str], torch.nn.Module]:
        return {(int(i), name): getattr(block, name) for i, block in self.layers.items() for name in PARTS}

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> List[str]:
        """Route ``layers.<i>.<part>.<tensor>`` to the vLLM parameter's own weight_loader; returns the names loaded."""
        loaded = []
        for name, tensor in weights:
            layer_str, rest = name.split(".", 2)[1], name.split(".", 2)[2]
            part, _, tensor_name = rest.rpartition(".")
            if layer_str not in self.layers or part in SKIPPED:
                continue
            block = self.layers[layer_str]
            target = [(module, shard) for module, ckpt, shard in STACKED if ckpt == part]
            target += [(module, None) for module, ckpt in UNSTACKED if ckpt == part]
            if not target:
                raise ValueError(f"checkpoint tensor {name}: no vLLM layer for {part}")
            module, shard = target[0]
            param = getattr(getattr(block, module), tensor_name)
            if shard is None:
                param.weight_loader(param, tensor)
            else:
                param.weight_loader(param, tensor, shard)
            loaded.append(name)
        return loaded


def _quantize_linear(prefix: str, weight: torch.Tensor, input_amax: float, amax=None) -> Dict[str, torch.Tensor]:
    global_scale = (weight.float().abs().amax() if amax is None else amax) / GLOBAL_SCALE_DENOMINATOR
    q = nvfp4lib.quantize(weight, global_scale)
    return {f"{prefix}.weight": q.packed, f"{prefix}.weight_scale": q.block_scale, f"{prefix}.weight_scale_2": q.global_scale.reshape(()), f"{prefix}.input_scale": torch.tensor(input_amax / GLOBAL_SCALE_DENOMINATOR)}


def own_checkpoint_tensors(dims: dict, seed: int) -> Dict[str, torch.Tensor]:
    """Fallback when the committed synthetic checkpoint is absent: the same structure from nvfp4lib.quantize."""
    gen = torch.Generator().manual_seed(seed)
    h, q, d, inter = dims["hidden"], dims["q_lora_rank"], dims["head_dim"], dims["shared_intermediate"]
    shapes = {"attn.wq_a": (q, h), "attn.wkv": (d, h), "attn.wq_b": (dims["n_heads"] * d, q), "attn.wo_b": (h, dims["o_groups"] * dims["o_lora_rank"]), "ffn.shared_experts.w1": (inter, h), "ffn.shared_experts.w3": (inter, h), "ffn.shared_experts.w2": (h, inter)}
    tensors = {}
    for layer in range(dims["layers"]):
        weights = {name: (torch.randn(*shape, generator=gen) / shape[1] ** 0.5) for name, shape in shapes.items()}
        weights["attn.wkv"] *= WKV_AMAX_RATIOS[layer] * weights["attn.wq_a"].abs().amax() / weights["attn.wkv"].abs().amax()
        gate_up_amax = torch.maximum(weights["ffn.shared_experts.w1"].abs().amax(), weights["ffn.shared_experts.w3"].abs().amax())
        for name, weight in weights.items():
            amax = gate_up_amax if name.startswith("ffn.shared_experts.w") and name != "ffn.shared_experts.w2" else None
            tensors.update(_quantize_linear(f"layers.{layer}.{name}", weight.to(torch.bfloat16), 8.0, amax))
    return tensors


def write_model_dir(directory: str, seed: int = 0) -> str:
    """A model directory vLLM's ModelConfig accepts: the committed synthetic checkpoint's files (or our own
    tensors when it is absent), with ``producer.name = "modelopt"`` as real ModelOpt exports write it (vLLM
    ignores hf_quant_config.json otherwise). Returns the checkpoint source."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    source = os.path.normpath(COMMITTED_CHECKPOINT)
    if os.path.isfile(os.path.join(source, "hf_quant_config.json")):
        for path in glob.glob(os.path.join(source, "*.safetensors")) + glob.glob(os.path.join(source, "*.json")):
            shutil.copy(path, directory)
        origin = "data/checkpoints/tiny-dsv4-nvfp4 (nvfp4lib.synthetic)"
    else:
        save_file({k: v.contiguous() for k, v in own_checkpoint_tensors(TINY_DIMS, seed).items()}, os.path.join(directory, "model.safetensors"))
        quant = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ["lm_head"]}}
        with open(os.path.join(directory, "hf_quant_config.json"), "w") as f:
            json.dump(quant, f)
        config = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "hidden_size": TINY_DIMS["hidden"], "num_hidden_layers": TINY_DIMS["layers"], "torch_dtype": "bfloat16"}
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
        origin = "nvfp4lib.quantize (tests_vllm/tiny_model.py; the committed checkpoint was absent)"
    quant_path = os.path.join(directory, "hf_quant_config.json")
    with open(quant_path) as f:
        quant = json.load(f)
    original_producer = quant.get("producer", {}).get("name")
    quant["producer"] = {**quant.get("producer", {}), "name": "modelopt"}
    with open(quant_path, "w") as f:
        json.dump(quant, f, indent=2)
    return f"{origin}; producer.name {original_producer!r} -> 'modelopt'"


def build_block(vllm_config, quant_config, layer_ids: Iterable[int] = (0, 1)) -> TinyDSV4Block:
    """The block for the model directory of ``vllm_config``, built in the model dtype as vLLM's loader does."""
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_default_torch_dtype(vllm_config.model_config.dtype):
        return TinyDSV4Block(dims_of(vllm_config.model_config.model), quant_config, layer_ids)


def dims_of(directory: str) -> dict:
    """The block dimensions recorded by nvfp4lib.synthetic in config.json, else TINY_DIMS."""
    with open(os.path.join(directory, "config.json")) as f:
        return dict(json.load(f).get("synthetic", {}).get("dims", TINY_DIMS))


def read_checkpoint(directory: str) -> Dict[str, torch.Tensor]:
    """All tensors, read with vLLM's own safetensors iterator."""
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    return dict(safetensors_weights_iterator(files, use_tqdm_on_load=False))
