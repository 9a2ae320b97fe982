"""The vLLM plugin: ModelOpt NVFP4 linear layers on nvfp4lib's W4A16 GEMM, without patching vLLM.

How it hooks in (vLLM 0.33):

1. ``pyproject.toml`` declares the entry point ``vllm.general_plugins: nvfp4lib = nvfp4lib.integrations.vllm:register``.
   vLLM calls :func:`register` in every process (front end, engine core, each worker), possibly more
   than once; registering is idempotent.
2. :func:`register` registers the quantization config ``"nvfp4lib_modelopt_fp4"``, a subclass of vLLM's
   ``ModelOptNvFp4Config``. vLLM consults custom configs' ``override_quantization_method`` before the
   built-in ones, so a ModelOpt checkpoint with ``quant_algo`` NVFP4 or W4A16_NVFP4 picks ours (unless
   the user asked for another method with ``--quantization``, e.g. ``modelopt_fp4`` for the stock path).
3. The config hands every quantized ``LinearBase`` layer an ``Nvfp4libLinearMethod``; everything else
   (MoE experts, KV cache, excluded layers, the LM head) gets exactly what the stock config gives it.
4. The linear method
   - ``create_weights``: vLLM's own parameter classes (``ModelWeightParameter`` for ``weight`` uint8
     [N, K/2] and ``weight_scale`` e4m3 [N, K/16]; ``PerTensorScaleParameter`` for ``weight_scale_2`` and
     ``input_scale``, one fp32 per shard) with the layer's own weight loaders (v2);
   - ``process_weights_after_loading`` (:func:`process_loaded_linear`): checks every tensor was loaded,
     keeps each shard's ``weight_scale_2`` exactly as a per-output-column fp32 ``alpha`` (no max over
     shards) through :func:`nvfp4lib.ops.gemm.prepare_weight`, and drops the per-shard scalars;
   - ``apply`` (:func:`apply_linear`): ``nvfp4_linear`` -> ``torch.ops.nvfp4lib.gemm_w4a16``, a
     torch.library op with a fake implementation, so torch.compile traces it and CUDA graphs capture it.

Activations stay bf16 (weight-only W4A16; on Hopper there is no FP4 x FP4 MMA). ``input_scale`` is loaded
and validated where the checkpoint has one (NVFP4 W4A4 exports; W4A16_NVFP4 ones have none), but not used. Not handled here: ``MIXED_PRECISION`` checkpoints (left to vLLM's
``modelopt_mixed``), batched ``is_bmm`` layers (DeepSeek-V4 ``wo_a``: exclude them) and MoE experts.

Importing this module does not import vLLM. :func:`process_loaded_linear` and :func:`apply_linear` work on
any ``torch.nn.Module`` holding those parameters (the GPU graph check uses them without vLLM); the vLLM
classes are built on first use (``register`` or attribute access, which keeps them picklable by name).
"""
from __future__ import annotations

import functools
import types
from typing import Callable, Optional, Sequence

import torch

from ..formats import BLOCK_SIZE, check_global_scale
from ..ops.gemm import PreparedWeight, nvfp4_linear, prepare_weight

QUANTIZATION_NAME = "nvfp4lib_modelopt_fp4"
# ModelOpt quant_algo values whose linear layers this plugin takes over.
SUPPORTED_QUANT_ALGOS = ("NVFP4", "W4A16_NVFP4")
# Layer attributes holding the non-tensor fields of the PreparedWeight (the tensors are parameters).
PREPARED_META_ATTR = "nvfp4lib_prepared_meta"


# ----------------------------------------------------------------------------------------------
# vLLM-free math: the post-load step and the forward, on any module with the ModelOpt parameters
# ----------------------------------------------------------------------------------------------
def _replace_parameter_plain(layer: torch.nn.Module, name: str, tensor: Optional[torch.Tensor]) -> None:
    """Swap ``layer.<name>`` for a frozen Parameter holding ``tensor`` (or remove it when None)."""
    if name in layer._parameters:
        del layer._parameters[name]
    if tensor is not None:
        layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def module_as_loaded(parts: Sequence, input_scales: Optional[Sequence] = None) -> torch.nn.Module:
    """A plain module holding a (fused) ModelOpt NVFP4 linear the way vLLM's weight loaders leave it.

    parts: one ``(packed uint8 [N_i, K/2], block_scale e4m3 [N_i, K/16], global_scale fp32 scalar)`` per
    shard, in shard order (an :class:`nvfp4lib.NVFP4Tensor` is one); input_scales: one fp32 scalar per
    shard, or None. The module gets ``weight`` [N, K/2] and ``weight_scale`` [N, K/16] (shards stacked
    along N), ``weight_scale_2`` fp32 [P] and, if given, ``input_scale`` fp32 [P]: the input of
    :func:`process_loaded_linear` (for checks without vLLM).
    """
    if not parts:
        raise ValueError("module_as_loaded needs at least one shard")
    if input_scales is not None and len(input_scales) != len(parts):
        raise ValueError(f"{len(input_scales)} input scales for {len(parts)} shards")
    module = torch.nn.Module()
    frozen = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
    module.weight = frozen(torch.cat([p[0] for p in parts]))
    module.weight_scale = frozen(torch.cat([p[1] for p in parts]))
    module.weight_scale_2 = frozen(torch.stack([torch.as_tensor(p[2]).reshape(()).float() for p in parts]).to(module.weight.device))
    if input_scales is not None:
        module.input_scale = frozen(torch.stack([torch.as_tensor(s).reshape(()).float() for s in input_scales]).to(module.weight.device))
    return module


def check_loaded_linear(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, input_scale: Optional[torch.Tensor], output_partition_sizes: Sequence[int], name: str = "layer") -> None:
    """ValueError unless a ModelOpt NVFP4 linear was fully and consistently loaded.

    weight: uint8 [N, K/2]; weight_scale: e4m3 [N, K/16] (created NaN-filled, so a block never loaded
    stays NaN); weight_scale_2 / input_scale: fp32 [P], one per shard; output_partition_sizes: the P shard
    row counts (sum N). ``input_scale`` is optional: W4A16_NVFP4 checkpoints have none (all NaN, as created);
    when present it must be valid for every shard (it is not used: activations stay bf16).
    """
    sizes = [int(s) for s in output_partition_sizes]
    if weight.shape[0] != sum(sizes):
        raise ValueError(f"{name}: weight has {weight.shape[0]} rows but the shards {sizes} sum to {sum(sizes)}")
    if torch.isnan(weight_scale.float()).any():
        raise ValueError(
            f"{name}: weight_scale still holds NaN after loading: some rows were never loaded (is this layer "
            "stored in BF16 in the checkpoint? add it to exclude_modules)"
        )
    if weight_scale_2.numel() != len(sizes):
        raise ValueError(f"{name}: {weight_scale_2.numel()} weight_scale_2 values for {len(sizes)} shards {sizes}")
    for i, value in enumerate(weight_scale_2.reshape(-1)):
        check_global_scale(value, f"{name}.weight_scale_2[shard {i}]")
    if input_scale is not None and not torch.isnan(input_scale).all():
        if input_scale.numel() != len(sizes):
            raise ValueError(f"{name}: {input_scale.numel()} input_scale values for {len(sizes)} shards {sizes}")
        for i, value in enumerate(input_scale.reshape(-1)):
            if torch.isnan(value):
                raise ValueError(f"{name}: input_scale of shard {i} was never loaded while other shards have one")
            check_global_scale(value, f"{name}.input_scale[shard {i}]")


def process_loaded_linear(layer: torch.nn.Module, output_partition_sizes: Sequence[int], replace_parameter: Callable = _replace_parameter_plain) -> PreparedWeight:
    """The post-load step: ModelOpt parameters of ``layer`` -> a :class:`PreparedWeight` stored on it.

    Reads ``layer.weight`` (uint8 [N, K/2]), ``layer.weight_scale`` (e4m3 [N, K/16]),
    ``layer.weight_scale_2`` (fp32 [P], one per shard) and, if present, ``layer.input_scale`` (fp32 [P]).
    Afterwards the layer holds ``weight`` and ``weight_scale`` as prepared for the kernels, ``alpha``
    (fp32 [N]: row n's own shard's ``weight_scale_2``, exact, no max over shards) and the non-tensor
    fields in ``layer.nvfp4lib_prepared_meta``; ``weight_scale_2`` and ``input_scale`` are removed.
    ``replace_parameter(layer, name, tensor_or_None)`` swaps parameters (vLLM passes its own, which keeps
    weight reloading working).
    """
    name = getattr(layer, "prefix", "") or type(layer).__name__
    input_scale = getattr(layer, "input_scale", None)
    check_loaded_linear(layer.weight, layer.weight_scale, layer.weight_scale_2, input_scale, output_partition_sizes, name)
    prepared = prepare_weight(layer.weight.data, layer.weight_scale.data, layer.weight_scale_2.data.reshape(-1), segment_sizes=output_partition_sizes)
    replace_parameter(layer, "weight", prepared.weight)
    replace_parameter(layer, "weight_scale", prepared.block_scale)
    replace_parameter(layer, "alpha", prepared.alpha)
    replace_parameter(layer, "weight_scale_2", None)
    if input_scale is not None:
        replace_parameter(layer, "input_scale", None)
    setattr(layer, PREPARED_META_ATTR, {"n": prepared.n, "k": prepared.k, "segment_sizes": prepared.segment_sizes, "layout": prepared.layout})
    return prepared


def prepared_from_layer(layer: torch.nn.Module) -> PreparedWeight:
    """The :class:`PreparedWeight` view of a layer processed by :func:`process_loaded_linear` (no copies)."""
    meta = getattr(layer, PREPARED_META_ATTR, None)
    if meta is None:
        raise ValueError(f"{type(layer).__name__} was not processed: call process_loaded_linear after loading its weights")
    return PreparedWeight(layer.weight, layer.weight_scale, layer.alpha, **meta)


def apply_linear(layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The forward of a processed layer: ``x[..., K]`` bf16 -> bf16 ``[..., N]`` via ``torch.ops.nvfp4lib.gemm_w4a16``."""
    return nvfp4_linear(x, prepared_from_layer(layer), bias)


# ----------------------------------------------------------------------------------------------
# The vLLM classes (built on first use: importing this module must not import vLLM)
# ----------------------------------------------------------------------------------------------
@functools.cache
def _vllm_classes() -> types.SimpleNamespace:
    from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, register_weight_loader_v2_supported_method
    from vllm.model_executor.layers.quantization.modelopt import ModelOptLinearMethod, ModelOptNvFp4Config
    from vllm.model_executor.parameter import ModelWeightParameter, PerTensorScaleParameter
    from vllm.model_executor.utils import replace_parameter

    @register_weight_loader_v2_supported_method
    class Nvfp4libLinearMethod(LinearMethodBase):
        """ModelOpt NVFP4 weights, bf16 activations, nvfp4lib's GEMM (see the module docstring)."""

        def __init__(self, quant_config: "Nvfp4libModelOptConfig"):
            self.quant_config = quant_config

        def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list, input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
            del input_size, output_size
            if params_dtype != torch.bfloat16:
                raise ValueError(f"{layer.prefix or type(layer).__name__}: nvfp4lib's W4A16 GEMM takes bf16 activations; run the model with dtype=bfloat16 (got {params_dtype})")
            group_size = getattr(self.quant_config, "group_size", BLOCK_SIZE)
            if group_size != BLOCK_SIZE:
                raise ValueError(f"NVFP4 block size must be {BLOCK_SIZE}, the checkpoint says group_size={group_size}")
            if input_size_per_partition % BLOCK_SIZE:
                raise ValueError(f"{layer.prefix}: input size per partition {input_size_per_partition} is not a multiple of {BLOCK_SIZE}")
            weight_loader = extra_weight_attrs.get("weight_loader")
            n, k = sum(output_partition_sizes), input_size_per_partition
            layer.logical_widths = list(output_partition_sizes)
            layer.input_size_per_partition = k
            layer.output_size_per_partition = n
            layer.nvfp4lib_output_partition_sizes = tuple(int(s) for s in output_partition_sizes)
            layer.register_parameter("weight", ModelWeightParameter(data=torch.empty(n, k // 2, dtype=torch.uint8), input_dim=1, output_dim=0, weight_loader=weight_loader))
            # NaN-filled, so rows the checkpoint never provided are caught after loading.
            scale = torch.full((n, k // BLOCK_SIZE), float("nan"), dtype=torch.float32).to(torch.float8_e4m3fn)
            layer.register_parameter("weight_scale", ModelWeightParameter(data=scale, input_dim=1, output_dim=0, weight_loader=weight_loader))
            for name in ("weight_scale_2", "input_scale"):
                # One fp32 per shard; NaN until loaded.
                per_shard = torch.full((len(output_partition_sizes),), float("nan"), dtype=torch.float32)
                layer.register_parameter(name, PerTensorScaleParameter(data=per_shard, weight_loader=weight_loader))

        def process_weights_after_loading(self, layer) -> None:
            if getattr(layer, "is_bmm", False) or getattr(layer, "_retain_weight_for_gather", False):
                raise ValueError(f"{layer.prefix}: batched (is_bmm) or gathered linear layers are not supported by nvfp4lib; add the layer to exclude_modules")
            process_loaded_linear(layer, layer.nvfp4lib_output_partition_sizes, replace_parameter=replace_parameter)

        def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
            return apply_linear(layer, x, bias)

    class Nvfp4libModelOptConfig(ModelOptNvFp4Config):
        """vLLM's ModelOpt NVFP4 config with nvfp4lib's linear method; all else as stock."""

        def get_name(self) -> str:
            return QUANTIZATION_NAME

        def get_supported_act_dtypes(self) -> list:
            return [torch.bfloat16]

        @classmethod
        def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> Optional[str]:
            if user_quant not in (None, QUANTIZATION_NAME):
                return None  # the user asked for another method (e.g. modelopt_fp4): respect it
            algo = cls._extract_modelopt_quant_algo(hf_quant_cfg)
            return QUANTIZATION_NAME if algo in SUPPORTED_QUANT_ALGOS else None

        def get_quant_method(self, layer, prefix: str):
            stock = super().get_quant_method(layer, prefix)
            # Only where the stock config would quantize a linear layer with its ModelOpt NVFP4 method;
            # excluded layers, the LM head, MoE and KV cache keep the stock method.
            if isinstance(layer, LinearBase) and isinstance(stock, ModelOptLinearMethod):
                return Nvfp4libLinearMethod(self)
            return stock

    for cls in (Nvfp4libLinearMethod, Nvfp4libModelOptConfig):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # picklable as module attributes
    return types.SimpleNamespace(linear_method=Nvfp4libLinearMethod, config=Nvfp4libModelOptConfig)


def __getattr__(name: str):
    if name == "Nvfp4libLinearMethod":
        return _vllm_classes().linear_method
    if name == "Nvfp4libModelOptConfig":
        return _vllm_classes().config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the ``nvfp4lib_modelopt_fp4`` quantization config.

    Idempotent: the classes are built once per process, and registering the same class under the same
    name again leaves vLLM's registries unchanged (the name is listed once).
    """
    from vllm.model_executor.layers.quantization import register_quantization_config

    register_quantization_config(QUANTIZATION_NAME)(_vllm_classes().config)
