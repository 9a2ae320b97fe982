"""ModelOpt NVFP4 checkpoints: read and write safetensors with ``hf_quant_config.json``, validate every linear.

A checkpoint is a directory::

    hf_quant_config.json           {"producer": {...}, "quantization": {"quant_algo": "NVFP4",
                                    "group_size": 16, "kv_cache_quant_algo": null, "exclude_modules": [...]}}
    config.json                    the model's dimensions (optional here; written by the synthetic generator)
    model.safetensors              one file, or shards model-0000i-of-0000n.safetensors
    model.safetensors.index.json   with shards: {"metadata": {...}, "weight_map": {tensor name: shard file}}

Per NVFP4 linear ``<prefix>`` (ModelOpt names; N output features, K input features):

- ``<prefix>.weight``          uint8 ``[N, K/2]``, two E2M1 codes per byte, element 2i in the low nibble
- ``<prefix>.weight_scale``    float8_e4m3fn ``[N, K/16]``, row-major (not swizzled)
- ``<prefix>.weight_scale_2``  fp32 scalar, the weight's global decode multiplier (amax / 2688)
- ``<prefix>.input_scale``     fp32 scalar, the activation's global decode multiplier (unused by W4A16);
  required when quant_algo is "NVFP4" (W4A4 exports), optional for "W4A16_NVFP4" (weight-only exports)

A linear kept in FP8 (listed in ``exclude_modules``; the ModelOpt FP8 per-tensor format) has
``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` fp32 scalar (amax / 448) and optionally
``input_scale`` fp32 scalar. A bf16 linear has only ``weight``.

Loading is lazy: :class:`Checkpoint` opens shards with safetensors' ``safe_open`` (a memory map) and
reads exactly the tensors asked for; shapes and dtypes come from the header without reading data.
Every validation error is a :class:`CheckpointError` (a ``ValueError``) whose message starts with the
full name of the offending tensor.
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .formats import BLOCK_SIZE, dequantize

QUANT_CONFIG_FILE = "hf_quant_config.json"
MODEL_CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANT_ALGO = "NVFP4"  # W4A4 export: every linear carries an input_scale
QUANT_ALGO_W4A16 = "W4A16_NVFP4"  # weight-only export: no input_scale (validated when present)
QUANT_ALGOS = (QUANT_ALGO, QUANT_ALGO_W4A16)
GROUP_SIZE = BLOCK_SIZE

FORMAT_NVFP4 = "nvfp4"
FORMAT_FP8 = "fp8"
FORMAT_BF16 = "bf16"

# safetensors header dtype names -> torch dtypes (the ones a ModelOpt NVFP4 checkpoint uses)
_SAFETENSORS_DTYPES = {
    "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
}


class CheckpointError(ValueError):
    """A checkpoint tensor or file is missing, malformed or holds invalid values; the message names it."""


# ----------------------------------------------------------------------------------------------
# One linear, validated
# ----------------------------------------------------------------------------------------------
@dataclass
class NVFP4Linear:
    """The four tensors of one ModelOpt NVFP4 linear, validated (see :func:`validate_nvfp4_linear`).

    weight: uint8 [N, K/2]; weight_scale: float8_e4m3fn [N, K/16] (row-major);
    weight_scale_2: fp32 [] decode multiplier; input_scale: fp32 [] or None.
    """

    prefix: str
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_scale_2: torch.Tensor
    input_scale: Optional[torch.Tensor] = None

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[1] * 2

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """[N, K] in ``dtype``: e2m1 * weight_scale * weight_scale_2."""
        return dequantize(self.weight, self.weight_scale, self.weight_scale_2, dtype)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The checkpoint tensors by full name (``<prefix>.weight`` ...)."""
        out = {
            f"{self.prefix}.weight": self.weight,
            f"{self.prefix}.weight_scale": self.weight_scale,
            f"{self.prefix}.weight_scale_2": self.weight_scale_2.reshape(()).float(),
        }
        if self.input_scale is not None:
            out[f"{self.prefix}.input_scale"] = self.input_scale.reshape(()).float()
        return out


@dataclass
class FP8Linear:
    """A linear in the ModelOpt FP8 per-tensor format.

    weight: float8_e4m3fn [N, K]; weight_scale: fp32 [] (decode multiplier, amax / 448);
    input_scale: fp32 [] (static activation decode multiplier) or None.
    """

    prefix: str
    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: Optional[torch.Tensor] = None

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """[N, K] in ``dtype``: weight * weight_scale (computed in fp32)."""
        return (self.weight.float() * self.weight_scale.float()).to(dtype)

    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {f"{self.prefix}.weight": self.weight, f"{self.prefix}.weight_scale": self.weight_scale.reshape(()).float()}
        if self.input_scale is not None:
            out[f"{self.prefix}.input_scale"] = self.input_scale.reshape(()).float()
        return out


def _require(tensors: Mapping[str, Optional[torch.Tensor]], name: str) -> torch.Tensor:
    tensor = tensors.get(name)
    if tensor is None:
        raise CheckpointError(f"{name}: missing from the checkpoint")
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    return tensor


def _check_dtype(tensor: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if tensor.dtype != dtype:
        raise CheckpointError(f"{name}: wrong dtype {tensor.dtype}, expected {dtype}")


def check_scalar_scale(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Validate a per-tensor scale (fp32, one element, finite, > 0); return it as an fp32 0-dim tensor."""
    _check_dtype(tensor, name, torch.float32)
    if tensor.numel() != 1 or tensor.dim() > 1:
        raise CheckpointError(f"{name}: wrong shape {tuple(tensor.shape)}, expected a scalar ([] or [1])")
    value = float(tensor.reshape(()))
    if value != value:
        raise CheckpointError(f"{name}: is NaN")
    if value in (float("inf"), float("-inf")):
        raise CheckpointError(f"{name}: is {value} (Inf)")
    if value == 0:
        raise CheckpointError(f"{name}: is zero: a zero decode multiplier turns every value into 0")
    if value < 0:
        raise CheckpointError(f"{name}: is negative ({value}): a decode multiplier must be positive")
    return tensor.reshape(()).float()


def _first_index(mask: torch.Tensor) -> tuple:
    return tuple(int(i) for i in mask.nonzero()[0])


def check_e4m3_block_scales(block_scale: torch.Tensor, name: str) -> None:
    """ValueError for NaN bytes (0x7f / 0xff), negative or zero E4M3 block scales, with a count and the
    first [row, block] index.

    E4M3fn has no Inf. Neither ModelOpt (1.0 for an all-zero block) nor torchao (2**-6) writes a zero
    block scale, so a zero means a corrupt or foreign file; a negative one flips its block's signs.
    """
    raw = block_scale.view(torch.uint8)
    magnitude = raw & 0x7F
    problems = (
        (magnitude == 0x7F, "NaN bytes (0x7f/0xff)"),
        ((raw & 0x80).bool() & (magnitude != 0) & (magnitude != 0x7F), "negative block scales"),
        (magnitude == 0, "zero block scales"),
    )
    for mask, what in problems:
        count = int(mask.sum())
        if count:
            raise CheckpointError(f"{name}: {count} {what} of {raw.numel()}, first at [row, block] {list(_first_index(mask))}")


def validate_nvfp4_linear(prefix: str, tensors: Mapping[str, Optional[torch.Tensor]], shape: Optional[Sequence[int]] = None, require_input_scale: bool = True) -> NVFP4Linear:
    """Check one NVFP4 linear's tensors (keys are full names ``<prefix>.weight`` ...) and return it.

    shape: the expected (N, K) of the linear, when known from the model config.
    Raises :class:`CheckpointError` naming the tensor: missing, wrong dtype, wrong shape, NaN / Inf /
    zero / negative ``weight_scale_2`` or ``input_scale``, NaN bytes, zero or negative block scales.
    """
    names = {part: f"{prefix}.{part}" for part in ("weight", "weight_scale", "weight_scale_2", "input_scale")}
    weight = _require(tensors, names["weight"])
    block_scale = _require(tensors, names["weight_scale"])
    weight_scale_2 = _require(tensors, names["weight_scale_2"])
    input_scale = tensors.get(names["input_scale"])
    if input_scale is None and require_input_scale:
        _require(tensors, names["input_scale"])

    _check_dtype(weight, names["weight"], torch.uint8)
    if weight.dim() != 2 or weight.shape[1] % (BLOCK_SIZE // 2):
        raise CheckpointError(f"{names['weight']}: wrong shape {tuple(weight.shape)}, expected [N, K/2] with K a multiple of {BLOCK_SIZE}")
    n, k = weight.shape[0], weight.shape[1] * 2
    if shape is not None and (n, k) != tuple(shape):
        raise CheckpointError(f"{names['weight']}: wrong shape {tuple(weight.shape)}, expected [{shape[0]}, {shape[1] // 2}] for a {shape[0]} x {shape[1]} linear")
    _check_dtype(block_scale, names["weight_scale"], torch.float8_e4m3fn)
    if tuple(block_scale.shape) != (n, k // BLOCK_SIZE):
        raise CheckpointError(f"{names['weight_scale']}: wrong shape {tuple(block_scale.shape)}, expected [{n}, {k // BLOCK_SIZE}] (one scale per {BLOCK_SIZE} elements, row-major)")
    weight_scale_2 = check_scalar_scale(weight_scale_2, names["weight_scale_2"])
    if input_scale is not None:
        input_scale = check_scalar_scale(input_scale, names["input_scale"])
    check_e4m3_block_scales(block_scale, names["weight_scale"])
    return NVFP4Linear(prefix, weight, block_scale, weight_scale_2, input_scale)


def validate_fp8_linear(prefix: str, tensors: Mapping[str, Optional[torch.Tensor]], shape: Optional[Sequence[int]] = None) -> FP8Linear:
    """Check one FP8 per-tensor linear (weight e4m3 [N, K], weight_scale fp32 [], optional input_scale)."""
    weight = _require(tensors, f"{prefix}.weight")
    weight_scale = _require(tensors, f"{prefix}.weight_scale")
    input_scale = tensors.get(f"{prefix}.input_scale")
    _check_dtype(weight, f"{prefix}.weight", torch.float8_e4m3fn)
    if weight.dim() != 2 or (shape is not None and tuple(weight.shape) != tuple(shape)):
        expected = f"[{shape[0]}, {shape[1]}]" if shape is not None else "[N, K]"
        raise CheckpointError(f"{prefix}.weight: wrong shape {tuple(weight.shape)}, expected {expected}")
    nan_bytes = (weight.view(torch.uint8) & 0x7F) == 0x7F
    if bool(nan_bytes.any()):
        raise CheckpointError(f"{prefix}.weight: {int(nan_bytes.sum())} NaN bytes (0x7f/0xff), first at {list(_first_index(nan_bytes))}")
    weight_scale = check_scalar_scale(weight_scale, f"{prefix}.weight_scale")
    if input_scale is not None:
        input_scale = check_scalar_scale(input_scale, f"{prefix}.input_scale")
    return FP8Linear(prefix, weight, weight_scale, input_scale)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def quant_config(exclude_modules: Iterable[str] = (), extra: Optional[dict] = None, producer: Optional[dict] = None, quant_algo: str = QUANT_ALGO) -> dict:
    """The ``hf_quant_config.json`` content for an NVFP4 checkpoint (``extra`` merges into "quantization").

    The producer is named "modelopt" by default: vLLM 0.33 reads ``hf_quant_config.json`` as a ModelOpt
    config only under that name, and would otherwise load the checkpoint as unquantized.
    """
    from . import __version__

    if quant_algo not in QUANT_ALGOS:
        raise ValueError(f"quant_algo must be one of {QUANT_ALGOS}, got {quant_algo!r}")
    quantization = {"quant_algo": quant_algo, "kv_cache_quant_algo": None, "group_size": GROUP_SIZE, "exclude_modules": sorted(exclude_modules)}
    quantization.update(extra or {})
    return {"producer": producer or {"name": "modelopt", "writer": f"nvfp4lib {__version__}"}, "quantization": quantization}


def save_checkpoint(directory: str, tensors: Mapping[str, torch.Tensor], exclude_modules: Iterable[str] = (), model_config: Optional[dict] = None, quant_extra: Optional[dict] = None, max_shard_bytes: Optional[int] = None, validate: bool = True, quant_algo: str = QUANT_ALGO) -> str:
    """Write ``tensors`` (full name -> tensor) as a ModelOpt NVFP4 checkpoint directory; returns it.
    Safetensors files and an index already in ``directory`` are removed first (other files are kept).

    exclude_modules: module names (fnmatch patterns) not quantized to NVFP4 (FP8 or bf16 linears).
    model_config: written to ``config.json`` when given. max_shard_bytes: split into shards with an
    index file once the data exceeds it (one ``model.safetensors`` otherwise). validate: check every
    NVFP4 / FP8 linear first (tests that need a corrupt file pass False). quant_algo: "NVFP4" (every
    NVFP4 linear needs an input_scale) or "W4A16_NVFP4" (weight-only: input_scale optional).
    """
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    config = quant_config(exclude_modules, quant_extra, quant_algo=quant_algo)
    if validate:
        _validate_all(tensors, exclude_modules, require_input_scale=quant_algo == QUANT_ALGO)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, QUANT_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    if model_config is not None:
        with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
            json.dump(model_config, f, indent=2)
    for stale in [n for n in os.listdir(directory) if n.endswith(".safetensors") or n == INDEX_FILE]:
        os.remove(os.path.join(directory, stale))

    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata=metadata)
        return directory
    weight_map = {}
    for index, shard in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file_name), metadata=metadata)
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return directory


_LINEAR_PARTS = (".weight_scale_2", ".weight_scale", ".input_scale", ".weight")


def _linear_prefixes(names: Iterable[str]) -> List[str]:
    """Every prefix with a ``.weight`` or with a scale whose ``.weight`` is missing (an orphan), sorted."""
    prefixes = set()
    for name in names:
        for part in _LINEAR_PARTS:
            if name.endswith(part):
                prefixes.add(name[: -len(part)])
                break
    return sorted(prefixes)


def _is_excluded(prefix: str, exclude_modules: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(prefix, pattern) for pattern in exclude_modules)


def _validate_all(tensors: Mapping[str, torch.Tensor], exclude_modules: Iterable[str], require_input_scale: bool = True) -> None:
    for prefix in _linear_prefixes(tensors):
        if f"{prefix}.weight" not in tensors:
            raise CheckpointError(f"{prefix}.weight: missing from the checkpoint (its scales are there)")
        dtype = tensors[f"{prefix}.weight"].dtype
        if dtype == torch.uint8 or f"{prefix}.weight_scale_2" in tensors:
            if _is_excluded(prefix, exclude_modules):
                raise CheckpointError(f"{prefix}.weight: packed NVFP4 (uint8) but the module is in exclude_modules")
            validate_nvfp4_linear(prefix, tensors, require_input_scale=require_input_scale)
        elif dtype == torch.float8_e4m3fn:
            validate_fp8_linear(prefix, tensors)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
class Checkpoint:
    """A ModelOpt NVFP4 checkpoint directory, read lazily.

    ``tensor(name)`` reads one tensor through ``safe_open`` (memory-mapped: the rest of the file is not
    read); ``shape(name)`` / ``dtype(name)`` read only the header. ``nvfp4_linear(prefix)`` /
    ``fp8_linear(prefix)`` read and validate one linear; ``audit()`` validates all of them.
    """

    def __init__(self, directory: str):
        self.directory = directory
        config_path = os.path.join(directory, QUANT_CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{config_path}: missing (a ModelOpt checkpoint needs {QUANT_CONFIG_FILE})")
        with open(config_path) as f:
            self.quant_config = json.load(f)
        quantization = self.quant_config.get("quantization")
        if not isinstance(quantization, dict):
            raise CheckpointError(f"{config_path}: no 'quantization' section")
        self.quant_algo = quantization.get("quant_algo")
        if self.quant_algo not in QUANT_ALGOS:
            raise CheckpointError(f"{config_path}: quant_algo is {self.quant_algo!r}, expected one of {QUANT_ALGOS}")
        if quantization.get("group_size", GROUP_SIZE) != GROUP_SIZE:
            raise CheckpointError(f"{config_path}: group_size is {quantization.get('group_size')}, NVFP4 needs {GROUP_SIZE}")
        self.exclude_modules: List[str] = list(quantization.get("exclude_modules") or [])
        model_config_path = os.path.join(directory, MODEL_CONFIG_FILE)
        self.model_config: Optional[dict] = None
        if os.path.isfile(model_config_path):
            with open(model_config_path) as f:
                self.model_config = json.load(f)
        self._file_of: Dict[str, str] = {}
        self._header: Dict[str, tuple] = {}
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE}")
        for file_name in files:
            path = os.path.join(directory, file_name)
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    self._file_of[name] = path
                    self._header[name] = (piece.get_dtype(), tuple(piece.get_shape()))

    # -- names and metadata (header only) --
    def keys(self) -> List[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple:
        return self._header[self._known(name)][1]

    def dtype(self, name: str):
        """The torch dtype recorded in the header (the safetensors name string if torch has no match)."""
        raw = self._header[self._known(name)][0]
        return _SAFETENSORS_DTYPES.get(raw, raw)

    def nbytes(self) -> int:
        return sum(os.path.getsize(p) for p in set(self._file_of.values()))

    def linear_prefixes(self) -> List[str]:
        """Every ``<prefix>`` with a ``<prefix>.weight`` (or with scales but no weight), sorted; 1-D
        weights (norms) are not linears."""
        return [p for p in _linear_prefixes(self._file_of) if len(self._header.get(f"{p}.weight", ("", (0, 0)))[1]) != 1]

    def is_excluded(self, prefix: str) -> bool:
        return _is_excluded(prefix, self.exclude_modules)

    def linear_format(self, prefix: str) -> str:
        """"nvfp4" (a ``weight_scale_2`` or a uint8 weight), "fp8" (float8_e4m3fn weight, no
        weight_scale_2) or "bf16", from the header only (validation then checks the dtypes)."""
        if f"{prefix}.weight_scale_2" in self._file_of:
            return FORMAT_NVFP4
        if f"{prefix}.weight" not in self._file_of:
            return FORMAT_FP8
        dtype = self.dtype(f"{prefix}.weight")
        if dtype == torch.uint8:
            return FORMAT_NVFP4
        if dtype == torch.float8_e4m3fn:
            return FORMAT_FP8
        return FORMAT_BF16

    def _known(self, name: str) -> str:
        if name not in self._file_of:
            raise CheckpointError(f"{name}: missing from the checkpoint")
        return name

    # -- data (reads only what is asked for) --
    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read through safe_open (no other tensor's data is read)."""
        with safe_open(self._file_of[self._known(name)], framework="pt") as handle:
            return handle.get_tensor(name)

    def _maybe(self, name: str) -> Optional[torch.Tensor]:
        return self.tensor(name) if name in self._file_of else None

    def nvfp4_linear(self, prefix: str, shape: Optional[Sequence[int]] = None, require_input_scale: Optional[bool] = None) -> NVFP4Linear:
        """Read and validate ``<prefix>.{weight, weight_scale, weight_scale_2, input_scale}``; input_scale is
        required unless the checkpoint is W4A16_NVFP4 (or require_input_scale=False)."""
        if require_input_scale is None:
            require_input_scale = self.quant_algo == QUANT_ALGO
        if self.is_excluded(prefix):
            raise CheckpointError(f"{prefix}.weight: the module is in exclude_modules, not an NVFP4 linear")
        parts = ("weight", "weight_scale", "weight_scale_2", "input_scale")
        return validate_nvfp4_linear(prefix, {f"{prefix}.{p}": self._maybe(f"{prefix}.{p}") for p in parts}, shape, require_input_scale)

    def fp8_linear(self, prefix: str, shape: Optional[Sequence[int]] = None) -> FP8Linear:
        parts = ("weight", "weight_scale", "input_scale")
        return validate_fp8_linear(prefix, {f"{prefix}.{p}": self._maybe(f"{prefix}.{p}") for p in parts}, shape)

    def linear(self, prefix: str, shape: Optional[Sequence[int]] = None):
        """The validated linear in whatever format the checkpoint stores (NVFP4Linear, FP8Linear, or a bf16 tensor)."""
        fmt = self.linear_format(prefix)
        if fmt == FORMAT_NVFP4:
            return self.nvfp4_linear(prefix, shape)
        if fmt == FORMAT_FP8:
            return self.fp8_linear(prefix, shape)
        return self.tensor(f"{prefix}.weight")

    def audit(self, shapes: Optional[Mapping[str, Sequence[int]]] = None) -> List[dict]:
        """Validate every linear; one row per linear (never raises for a bad tensor: the row says why).

        Row keys: name, format, excluded, n, k, weight_scale_2, input_scale, block_scale_min,
        block_scale_max, status ("ok" or the CheckpointError message). shapes: expected (N, K) by prefix.
        """
        rows = []
        for prefix in self.linear_prefixes():
            fmt = self.linear_format(prefix)
            row = {"name": prefix, "format": fmt, "excluded": self.is_excluded(prefix), "n": None, "k": None, "weight_scale_2": None, "input_scale": None, "block_scale_min": None, "block_scale_max": None, "status": "ok"}
            try:
                expected = None if shapes is None else shapes.get(prefix)
                if fmt == FORMAT_NVFP4:
                    linear = self.nvfp4_linear(prefix, expected)
                    block = linear.weight_scale.float()
                    row.update(weight_scale_2=float(linear.weight_scale_2), block_scale_min=float(block.min()), block_scale_max=float(block.max()))
                elif fmt == FORMAT_FP8:
                    linear = self.fp8_linear(prefix, expected)
                    row.update(weight_scale_2=float(linear.weight_scale))
                    if not row["excluded"]:
                        raise CheckpointError(f"{prefix}.weight: FP8 weight but the module is not in exclude_modules")
                else:
                    linear = None
                    row["n"], row["k"] = self.shape(f"{prefix}.weight")
                if linear is not None:
                    row.update(n=linear.n, k=linear.k)
                    if linear.input_scale is not None:
                        row["input_scale"] = float(linear.input_scale)
            except CheckpointError as error:
                row["status"] = str(error)
            rows.append(row)
        return rows
