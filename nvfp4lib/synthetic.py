"""A synthetic DeepSeek-V4-shaped NVFP4 checkpoint: attention projections and one shared expert per layer.

Tensor names follow the DeepSeek-V4 checkpoint (what vLLM's loader maps): per layer ``i``

=====================================  ===========================  ====================================
checkpoint linear                       [N, K] (DeepSeek-V4-Pro)     notes
=====================================  ===========================  ====================================
``layers.i.attn.wq_a``                  [1536, 7168]                 fused by the engine with wkv into
``layers.i.attn.wkv``                   [512, 7168]                  ``fused_wqa_wkv`` [2048, 7168]
``layers.i.attn.wq_b``                  [65536, 1536]                128 heads x 512
``layers.i.attn.wo_a``                  [16384, 4096]                16 groups of [1024, 4096]
``layers.i.attn.wo_b``                  [7168, 16384]
``layers.i.ffn.shared_experts.w1``      [3072, 7168]                 gate  (w1 and w3: ``gate_up``
``layers.i.ffn.shared_experts.w3``      [3072, 7168]                 up     [6144, 7168] when fused)
``layers.i.ffn.shared_experts.w2``      [7168, 3072]                 down
=====================================  ===========================  ====================================

wq_a and wkv are quantized *separately*, each from its own amax, so the fused weight carries two unequal
``weight_scale_2`` (their ratio is a parameter); w1 and w3 share one amax as ModelOpt does for fused
siblings, so their ``weight_scale_2`` are equal. ``wo_a`` is NVFP4, or FP8 per-tensor (then listed in
``exclude_modules``), per layer.

The bf16 weights are a deterministic function of (seed, layer, name), so :func:`synthetic_weight`
regenerates the originals of a written checkpoint to measure quantization error against.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Union

import torch

from .checkpoint import FP8Linear, NVFP4Linear, save_checkpoint
from .formats import E4M3_MAX, GLOBAL_SCALE_DENOMINATOR, quantize

WQ_A, WKV, WQ_B, WO_A, WO_B = "attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_a", "attn.wo_b"
GATE, UP, DOWN = "ffn.shared_experts.w1", "ffn.shared_experts.w3", "ffn.shared_experts.w2"
LINEARS = (WQ_A, WKV, WQ_B, WO_A, WO_B, GATE, UP, DOWN)


@dataclass(frozen=True)
class DSV4Dims:
    """The dimensions that shape DeepSeek-V4's attention projections and shared expert."""

    hidden: int = 7168
    q_lora_rank: int = 1536
    head_dim: int = 512  # also the KV latent width: wkv has head_dim outputs
    n_heads: int = 128
    o_groups: int = 16
    o_lora_rank: int = 1024
    shared_intermediate: int = 3072
    layers: int = 61

    def __post_init__(self):
        if (self.n_heads * self.head_dim) % self.o_groups:
            raise ValueError(f"n_heads * head_dim = {self.n_heads * self.head_dim} must divide into o_groups = {self.o_groups}")
        for name, value in (("hidden", self.hidden), ("q_lora_rank", self.q_lora_rank), ("o_lora_rank", self.o_lora_rank), ("shared_intermediate", self.shared_intermediate), ("group input", self.wo_a_group_k)):
            if value % 16:
                raise ValueError(f"{name} = {value} must be a multiple of 16 (the NVFP4 block)")

    @property
    def wo_a_group_k(self) -> int:
        """K of one wo_a group: the attention output of n_heads / o_groups heads."""
        return self.n_heads * self.head_dim // self.o_groups

    def shapes(self) -> Dict[str, tuple]:
        """(N, K) of each checkpoint linear, by its name within a layer."""
        return {
            WQ_A: (self.q_lora_rank, self.hidden),
            WKV: (self.head_dim, self.hidden),
            WQ_B: (self.n_heads * self.head_dim, self.q_lora_rank),
            WO_A: (self.o_groups * self.o_lora_rank, self.wo_a_group_k),
            WO_B: (self.hidden, self.o_groups * self.o_lora_rank),
            GATE: (self.shared_intermediate, self.hidden),
            UP: (self.shared_intermediate, self.hidden),
            DOWN: (self.hidden, self.shared_intermediate),
        }

    def layer_shapes(self, layer: int) -> Dict[str, tuple]:
        return {f"layers.{layer}.{name}": shape for name, shape in self.shapes().items()}

    def model_config(self) -> dict:
        """config.json keys (DeepSeek-V4 names)."""
        return {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "hidden_size": self.hidden,
            "q_lora_rank": self.q_lora_rank,
            "head_dim": self.head_dim,
            "num_attention_heads": self.n_heads,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "moe_intermediate_size": self.shared_intermediate,
            "n_shared_experts": 1,
            "num_hidden_layers": self.layers,
        }

    @classmethod
    def from_model_config(cls, config: dict) -> "DSV4Dims":
        return cls(
            hidden=config["hidden_size"],
            q_lora_rank=config["q_lora_rank"],
            head_dim=config["head_dim"],
            n_heads=config["num_attention_heads"],
            o_groups=config["o_groups"],
            o_lora_rank=config["o_lora_rank"],
            shared_intermediate=config["moe_intermediate_size"] * config.get("n_shared_experts", 1),
            layers=config["num_hidden_layers"],
        )


DEEPSEEK_V4_PRO = DSV4Dims()
# The committed checkpoint (data/checkpoints/tiny-dsv4-nvfp4): same structure, 16 wo_a groups, ~0.65 MB.
TINY = DSV4Dims(hidden=256, q_lora_rank=128, head_dim=64, n_heads=16, o_groups=16, o_lora_rank=32, shared_intermediate=256, layers=2)
TINY_CHECKPOINT = "data/checkpoints/tiny-dsv4-nvfp4"  # relative to the repository root


def repository_path(relative: str) -> str:
    """An absolute path inside the repository (this package's parent directory), whatever the cwd."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), relative)


def _generator(seed: int, layer: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{layer}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def synthetic_weight(dims: DSV4Dims, layer: int, name: str, seed: int = 0, wkv_amax_ratio: float = 1.0) -> torch.Tensor:
    """The bf16 original [N, K] of linear ``name`` (e.g. "attn.wq_b") in ``layer``: deterministic.

    Gaussian with std 1/sqrt(K) plus a few larger outlier columns (activation-channel outliers show up in
    trained weights too); ``wkv`` is rescaled so that amax(wkv) = wkv_amax_ratio * amax(wq_a) exactly
    (in fp32, then rounded to bf16), which makes its weight_scale_2 that many times larger.
    """
    n, k = dims.shapes()[name]
    gen = _generator(seed, layer, name)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    outliers = torch.randint(0, k, (max(1, k // 256),), generator=gen)
    weight[:, outliers] *= 4.0
    if name == WKV:
        reference_amax = synthetic_weight(dims, layer, WQ_A, seed).float().abs().amax()
        weight = weight * (wkv_amax_ratio * reference_amax / weight.abs().amax())
    return weight.to(torch.bfloat16)


def synthetic_input_amax(layer: int, name: str, seed: int = 0) -> float:
    """The calibration activation amax of a linear's input, in [2, 32) (siblings reading the same
    input, wq_a / wkv and w1 / w3, get the same one)."""
    shared_input = {WKV: WQ_A, UP: GATE}.get(name, name)
    gen = _generator(seed, layer, "input_amax/" + shared_input)
    return float(2.0 * 16.0 ** torch.rand((), generator=gen))


def quantize_nvfp4_linear(prefix: str, weight: torch.Tensor, input_amax: float, amax: Optional[torch.Tensor] = None) -> NVFP4Linear:
    """ModelOpt-style NVFP4 of a [N, K] weight: weight_scale_2 = amax / 2688 (amax of ``weight`` unless
    given, e.g. the common amax of fused siblings), input_scale = input_amax / 2688."""
    global_scale = (weight.float().abs().amax() if amax is None else amax.float()) / GLOBAL_SCALE_DENOMINATOR
    packed, block_scale, global_scale = quantize(weight, global_scale)
    return NVFP4Linear(prefix, packed, block_scale, global_scale, torch.tensor(input_amax / GLOBAL_SCALE_DENOMINATOR))


def quantize_fp8_linear(prefix: str, weight: torch.Tensor, input_amax: float) -> FP8Linear:
    """ModelOpt-style FP8 per-tensor: weight_scale = amax / 448, weight = E4M3(w / weight_scale)."""
    weight_scale = weight.float().abs().amax() / E4M3_MAX
    fp8 = torch.clamp(weight.float() / weight_scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return FP8Linear(prefix, fp8, weight_scale.reshape(()), torch.tensor(input_amax / E4M3_MAX))


def layer_linears(dims: DSV4Dims, layer: int, seed: int = 0, wkv_amax_ratio: float = 3.0, wo_a_format: str = "nvfp4") -> Dict[str, Union[NVFP4Linear, FP8Linear]]:
    """All quantized linears of one layer, by full prefix (``layers.<layer>.attn.wq_a`` ...)."""
    if wo_a_format not in ("nvfp4", "fp8"):
        raise ValueError(f"wo_a_format must be 'nvfp4' or 'fp8', got {wo_a_format!r}")
    weights = {name: synthetic_weight(dims, layer, name, seed, wkv_amax_ratio) for name in LINEARS}
    gate_up_amax = torch.maximum(weights[GATE].float().abs().amax(), weights[UP].float().abs().amax())
    out = {}
    for name, weight in weights.items():
        prefix = f"layers.{layer}.{name}"
        input_amax = synthetic_input_amax(layer, name, seed)
        if name == WO_A and wo_a_format == "fp8":
            out[prefix] = quantize_fp8_linear(prefix, weight, input_amax)
        else:
            out[prefix] = quantize_nvfp4_linear(prefix, weight, input_amax, gate_up_amax if name in (GATE, UP) else None)
    return out


def _per_layer(value, layers: int, name: str) -> list:
    if isinstance(value, (str, int, float)):
        return [value] * layers
    value = list(value)
    if len(value) != layers:
        raise ValueError(f"{name}: {len(value)} values for {layers} layers")
    return value


DEFAULT_WKV_AMAX_RATIOS = (3.0, 40.0)  # even layers, odd layers
DEFAULT_WO_A_FORMATS = ("nvfp4", "fp8")


def generate_checkpoint(directory: str, dims: DSV4Dims = TINY, seed: int = 0, wkv_amax_ratios: Union[None, float, Sequence[float]] = None, wo_a_formats: Union[None, str, Sequence[str]] = None, max_shard_bytes: Optional[int] = None) -> str:
    """Write a synthetic DeepSeek-V4-shaped NVFP4 checkpoint to ``directory`` and return it (any
    safetensors files already there are replaced).

    wkv_amax_ratios: amax(wkv) / amax(wq_a) per layer, or one number for all layers, hence the ratio of
    their weight_scale_2; default 3 on even layers, 40 on odd ones. wo_a_formats: "nvfp4" or "fp8" per
    layer, or one string for all; default NVFP4 on even layers, FP8 on odd ones.
    """
    if wkv_amax_ratios is None:
        wkv_amax_ratios = [DEFAULT_WKV_AMAX_RATIOS[layer % 2] for layer in range(dims.layers)]
    if wo_a_formats is None:
        wo_a_formats = [DEFAULT_WO_A_FORMATS[layer % 2] for layer in range(dims.layers)]
    ratios = _per_layer(wkv_amax_ratios, dims.layers, "wkv_amax_ratios")
    formats = _per_layer(wo_a_formats, dims.layers, "wo_a_formats")
    tensors, excluded, fp8_layers = {}, ["lm_head"], {}
    for layer in range(dims.layers):
        for prefix, linear in layer_linears(dims, layer, seed, ratios[layer], formats[layer]).items():
            tensors.update(linear.tensors())
            if isinstance(linear, FP8Linear):
                excluded.append(prefix)
                fp8_layers[prefix] = {"quant_algo": "FP8"}
    config = dims.model_config()
    config["synthetic"] = {"generator": "nvfp4lib.synthetic", "seed": seed, "wkv_amax_ratios": ratios, "wo_a_formats": formats, "dims": asdict(dims)}
    extra = {"quantized_layers": fp8_layers} if fp8_layers else None
    return save_checkpoint(directory, tensors, exclude_modules=excluded, model_config=config, quant_extra=extra, max_shard_bytes=max_shard_bytes)


def main(argv=None) -> int:
    """``python -m nvfp4lib.synthetic [directory]``: (re)write the committed tiny checkpoint."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nvfp4lib.synthetic", description="Write the tiny synthetic DeepSeek-V4 NVFP4 checkpoint.")
    parser.add_argument("directory", nargs="?", default=TINY_CHECKPOINT, help=f"output directory (default: {TINY_CHECKPOINT})")
    directory = parser.parse_args(argv).directory
    generate_checkpoint(directory)
    print(f"wrote {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
