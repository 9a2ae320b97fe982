"""ModelOpt NVFP4 checkpoint I/O: round trips, lazy loading, every validation error, the synthetic generator."""
import json
import os

import pytest
import torch

import nvfp4lib.checkpoint as checkpoint_module
from nvfp4lib.checkpoint import (
    INDEX_FILE,
    QUANT_CONFIG_FILE,
    SINGLE_FILE,
    Checkpoint,
    CheckpointError,
    NVFP4Linear,
    save_checkpoint,
)
from nvfp4lib.formats import quantize
from nvfp4lib.synthetic import (
    TINY,
    TINY_CHECKPOINT,
    WKV,
    WO_A,
    WQ_A,
    DSV4Dims,
    generate_checkpoint,
    quantize_fp8_linear,
    synthetic_weight,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "layers.0.attn.wq_b"


def random_linear(prefix=PREFIX, n=48, k=64) -> NVFP4Linear:
    weight = torch.randn(n, k, dtype=torch.bfloat16) * (0.1 + torch.rand(()))
    packed, block_scale, global_scale = quantize(weight)
    return NVFP4Linear(prefix, packed, block_scale, global_scale, torch.tensor(float(torch.rand(())) + 0.01))


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_shard_bytes", [None, 2000])
def test_round_trip_is_bit_exact(tmp_path, fresh_seed, max_shard_bytes):
    linears = [random_linear(f"layers.{i}.attn.wq_b") for i in range(3)]
    fp8 = quantize_fp8_linear("layers.0.attn.wo_a", torch.randn(32, 64, dtype=torch.bfloat16), input_amax=3.0)
    tensors = {name: t for linear in linears + [fp8] for name, t in linear.tensors().items()}
    tensors["layers.0.norm.weight"] = torch.randn(64, dtype=torch.bfloat16)
    save_checkpoint(str(tmp_path), tensors, exclude_modules=["layers.*.attn.wo_a"], model_config={"hidden_size": 64}, max_shard_bytes=max_shard_bytes)

    files = sorted(os.listdir(tmp_path))
    if max_shard_bytes is None:
        assert SINGLE_FILE in files and INDEX_FILE not in files
    else:
        assert INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 1
    quant = json.load(open(tmp_path / QUANT_CONFIG_FILE))["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16 and quant["exclude_modules"] == ["layers.*.attn.wo_a"]

    ckpt = Checkpoint(str(tmp_path))
    assert ckpt.keys() == sorted(tensors)
    assert ckpt.model_config == {"hidden_size": 64}
    for name, tensor in tensors.items():
        assert ckpt.shape(name) == tuple(tensor.shape) and ckpt.dtype(name) == tensor.dtype
        assert_bit_equal(ckpt.tensor(name), tensor)
    for linear in linears:
        loaded = ckpt.nvfp4_linear(linear.prefix, shape=(linear.n, linear.k))
        assert torch.equal(loaded.dequantize(torch.float32), linear.dequantize(torch.float32))
    assert ckpt.linear_format("layers.0.attn.wo_a") == "fp8" and ckpt.is_excluded("layers.0.attn.wo_a")
    assert torch.equal(ckpt.fp8_linear("layers.0.attn.wo_a").dequantize(torch.float32), fp8.dequantize(torch.float32))
    assert ckpt.linear_format("layers.0.norm") == "bf16"
    assert all(row["status"] == "ok" for row in ckpt.audit())


def test_loading_one_tensor_reads_only_that_tensor(tmp_path, fresh_seed, monkeypatch):
    tensors = {name: t for i in range(4) for name, t in random_linear(f"layers.{i}.attn.wq_b").tensors().items()}
    save_checkpoint(str(tmp_path), tensors, max_shard_bytes=3000)

    def refuse(*args, **kwargs):
        raise AssertionError("a whole-file load was used")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    read = []
    real_safe_open = checkpoint_module.safe_open

    class RecordingHandle:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, name):
            return self.handle.get_slice(name)  # header metadata: dtype and shape only

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(checkpoint_module, "safe_open", lambda *a, **k: RecordingHandle(real_safe_open(*a, **k)))
    ckpt = Checkpoint(str(tmp_path))
    assert read == [], "opening a checkpoint must read headers only"
    ckpt.shape("layers.2.attn.wq_b.weight")
    assert read == []
    weight = ckpt.tensor("layers.2.attn.wq_b.weight")
    assert read == ["layers.2.attn.wq_b.weight"]
    assert torch.equal(weight, tensors["layers.2.attn.wq_b.weight"])
    read.clear()
    ckpt.nvfp4_linear("layers.1.attn.wq_b")
    assert sorted(read) == sorted(f"layers.1.attn.wq_b.{p}" for p in ("input_scale", "weight", "weight_scale", "weight_scale_2"))


# ----------------------------------------------------------------------------------------------
# Validation: every error names the tensor
# ----------------------------------------------------------------------------------------------
def _set_block_byte(value):
    def corrupt(tensors):
        raw = tensors[f"{PREFIX}.weight_scale"].view(torch.uint8).clone()
        raw[3, 1] = value
        tensors[f"{PREFIX}.weight_scale"] = raw.view(torch.float8_e4m3fn)

    return corrupt


def _set(part, value):
    def corrupt(tensors):
        tensors[f"{PREFIX}.{part}"] = value

    return corrupt


def _drop(part):
    def corrupt(tensors):
        del tensors[f"{PREFIX}.{part}"]

    return corrupt


def _retype(part, dtype):
    def corrupt(tensors):
        tensors[f"{PREFIX}.{part}"] = tensors[f"{PREFIX}.{part}"].view(torch.uint8).to(dtype) if part != "weight_scale_2" else tensors[f"{PREFIX}.{part}"].to(dtype)

    return corrupt


def _reshape(part, shape):
    def corrupt(tensors):
        tensors[f"{PREFIX}.{part}"] = torch.zeros(shape, dtype=tensors[f"{PREFIX}.{part}"].dtype) if part == "weight" else tensors[f"{PREFIX}.{part}"].float().reshape(-1)[: int(torch.tensor(shape).prod())].reshape(shape).to(tensors[f"{PREFIX}.{part}"].dtype)

    return corrupt


CORRUPTIONS = {
    "missing weight": (_drop("weight"), "weight", "missing"),
    "missing weight_scale": (_drop("weight_scale"), "weight_scale", "missing"),
    "missing weight_scale_2": (_drop("weight_scale_2"), "weight_scale_2", "missing"),
    "missing input_scale": (_drop("input_scale"), "input_scale", "missing"),
    "weight wrong dtype": (_retype("weight", torch.int8), "weight", "wrong dtype"),
    "weight_scale wrong dtype": (_set("weight_scale", torch.rand(48, 4) + 0.5), "weight_scale", "wrong dtype"),
    "weight_scale_2 wrong dtype": (_retype("weight_scale_2", torch.bfloat16), "weight_scale_2", "wrong dtype"),
    "input_scale wrong dtype": (_set("input_scale", torch.tensor(0.5, dtype=torch.float64)), "input_scale", "wrong dtype"),
    "weight wrong shape (3-D)": (_reshape("weight", (2, 24, 32)), "weight", "wrong shape"),
    "weight_scale wrong shape": (_reshape("weight_scale", (48, 2)), "weight_scale", "wrong shape"),
    "weight_scale_2 wrong shape": (_set("weight_scale_2", torch.tensor([0.5, 0.5])), "weight_scale_2", "wrong shape"),
    "weight_scale_2 NaN": (_set("weight_scale_2", torch.tensor(float("nan"))), "weight_scale_2", "NaN"),
    "weight_scale_2 Inf": (_set("weight_scale_2", torch.tensor(float("inf"))), "weight_scale_2", "Inf"),
    "weight_scale_2 zero": (_set("weight_scale_2", torch.tensor(0.0)), "weight_scale_2", "zero"),
    "weight_scale_2 negative": (_set("weight_scale_2", torch.tensor(-0.25)), "weight_scale_2", "negative"),
    "input_scale NaN": (_set("input_scale", torch.tensor(float("nan"))), "input_scale", "NaN"),
    "input_scale Inf": (_set("input_scale", torch.tensor(float("-inf"))), "input_scale", "Inf"),
    "input_scale zero": (_set("input_scale", torch.tensor(0.0)), "input_scale", "zero"),
    "input_scale negative": (_set("input_scale", torch.tensor(-1.0)), "input_scale", "negative"),
    "weight_scale NaN byte 0x7f": (_set_block_byte(0x7F), "weight_scale", "NaN bytes"),
    "weight_scale NaN byte 0xff": (_set_block_byte(0xFF), "weight_scale", "NaN bytes"),
    "weight_scale zero block scale": (_set_block_byte(0x00), "weight_scale", "zero block scales"),
    "weight_scale negative block scale": (_set_block_byte(0xB8), "weight_scale", "negative block scales"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_every_validation_error_names_the_tensor(tmp_path, fresh_seed, case):
    corrupt, part, words = CORRUPTIONS[case]
    good = random_linear()
    other = random_linear("layers.0.attn.wo_b")
    tensors = {**good.tensors(), **other.tensors()}
    corrupt(tensors)
    expected_start = f"{PREFIX}.{part}:"

    with pytest.raises(CheckpointError) as saved:
        save_checkpoint(str(tmp_path / "refused"), tensors)
    assert str(saved.value).startswith(expected_start) and words in str(saved.value)
    assert not (tmp_path / "refused" / SINGLE_FILE).exists(), "nothing is written when validation fails"

    save_checkpoint(str(tmp_path / "corrupt"), tensors, validate=False)
    ckpt = Checkpoint(str(tmp_path / "corrupt"))
    with pytest.raises(CheckpointError) as loaded:
        ckpt.nvfp4_linear(PREFIX, shape=(48, 64))
    assert str(loaded.value).startswith(expected_start), str(loaded.value)
    assert words in str(loaded.value)
    rows = {row["name"]: row for row in ckpt.audit()}
    assert rows[PREFIX]["status"] == str(loaded.value)
    assert rows["layers.0.attn.wo_b"]["status"] == "ok", "one bad linear does not taint the others"


def test_error_message_counts_and_locates_bad_block_scales(fresh_seed):
    linear = random_linear()
    raw = linear.weight_scale.view(torch.uint8).clone()
    raw[5, 2] = raw[7, 0] = 0x7F
    tensors = {**linear.tensors(), f"{PREFIX}.weight_scale": raw.view(torch.float8_e4m3fn)}
    with pytest.raises(CheckpointError, match=r"weight_scale: 2 NaN bytes .* of 192, first at \[row, block\] \[5, 2\]"):
        checkpoint_module.validate_nvfp4_linear(PREFIX, tensors)


def test_expected_shape_mismatch_names_the_weight(fresh_seed):
    linear = random_linear()
    with pytest.raises(CheckpointError, match=rf"^{PREFIX}.weight: wrong shape \(48, 32\), expected \[48, 64\] for a 48 x 128 linear"):
        checkpoint_module.validate_nvfp4_linear(PREFIX, linear.tensors(), shape=(48, 128))


def test_fp8_linear_validation(fresh_seed):
    fp8 = quantize_fp8_linear("layers.0.attn.wo_a", torch.randn(32, 64, dtype=torch.bfloat16), input_amax=3.0)
    raw = fp8.weight.view(torch.uint8).clone()
    raw[1, 1] = 0xFF
    with pytest.raises(CheckpointError, match=r"^layers.0.attn.wo_a.weight: 1 NaN bytes"):
        checkpoint_module.validate_fp8_linear(fp8.prefix, {**fp8.tensors(), "layers.0.attn.wo_a.weight": raw.view(torch.float8_e4m3fn)})
    with pytest.raises(CheckpointError, match=r"^layers.0.attn.wo_a.weight_scale: is zero"):
        checkpoint_module.validate_fp8_linear(fp8.prefix, {**fp8.tensors(), "layers.0.attn.wo_a.weight_scale": torch.tensor(0.0)})
    with pytest.raises(CheckpointError, match=r"^layers.0.attn.wo_a.weight: wrong dtype"):
        checkpoint_module.validate_fp8_linear(fp8.prefix, {**fp8.tensors(), "layers.0.attn.wo_a.weight": fp8.weight.float()})


def test_weight_only_export_needs_no_input_scale(tmp_path, fresh_seed):
    tensors = random_linear().tensors()
    del tensors[f"{PREFIX}.input_scale"]
    with pytest.raises(CheckpointError, match=f"^{PREFIX}.input_scale: missing"):
        save_checkpoint(str(tmp_path / "w4a4"), tensors)
    save_checkpoint(str(tmp_path / "w4a16"), tensors, quant_algo="W4A16_NVFP4")
    ckpt = Checkpoint(str(tmp_path / "w4a16"))
    assert ckpt.quant_algo == "W4A16_NVFP4"
    assert ckpt.nvfp4_linear(PREFIX).input_scale is None
    assert all(row["status"] == "ok" for row in ckpt.audit())
    bad = {**random_linear().tensors(), f"{PREFIX}.input_scale": torch.tensor(float("nan"))}
    with pytest.raises(CheckpointError, match=f"^{PREFIX}.input_scale: is NaN"):
        save_checkpoint(str(tmp_path / "w4a16bad"), bad, quant_algo="W4A16_NVFP4")


def test_checkpoint_level_errors(tmp_path, fresh_seed):
    with pytest.raises(CheckpointError, match="hf_quant_config.json: missing"):
        Checkpoint(str(tmp_path))
    save_checkpoint(str(tmp_path), random_linear().tensors())
    config_path = tmp_path / QUANT_CONFIG_FILE
    config = json.load(open(config_path))
    for key, value, message in (("quant_algo", "FP8", "quant_algo is 'FP8', expected one of"), ("group_size", 32, "group_size is 32")):
        broken = json.loads(json.dumps(config))
        broken["quantization"][key] = value
        json.dump(broken, open(config_path, "w"))
        with pytest.raises(CheckpointError, match=message):
            Checkpoint(str(tmp_path))
    json.dump(config, open(config_path, "w"))
    ckpt = Checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="^layers.9.attn.wq_b.weight: missing"):
        ckpt.tensor("layers.9.attn.wq_b.weight")
    nvfp4_in_excluded = {**random_linear().tensors()}
    with pytest.raises(CheckpointError, match="in exclude_modules"):
        save_checkpoint(str(tmp_path / "x"), nvfp4_in_excluded, exclude_modules=[PREFIX])


# ----------------------------------------------------------------------------------------------
# The synthetic generator and the committed tiny checkpoint
# ----------------------------------------------------------------------------------------------
def test_committed_tiny_checkpoint_is_small_valid_and_dual_scaled():
    directory = os.path.join(REPO, TINY_CHECKPOINT)
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    assert total < 2 * 1024 * 1024
    ckpt = Checkpoint(directory)
    dims = DSV4Dims.from_model_config(ckpt.model_config)
    assert dims == TINY and dims.o_groups == 16
    shapes = {prefix: shape for layer in range(dims.layers) for prefix, shape in dims.layer_shapes(layer).items()}
    rows = ckpt.audit(shapes)
    assert len(rows) == 8 * dims.layers and all(row["status"] == "ok" for row in rows), rows
    for layer, ratio in enumerate(ckpt.model_config["synthetic"]["wkv_amax_ratios"]):
        wq_a = ckpt.nvfp4_linear(f"layers.{layer}.{WQ_A}")
        wkv = ckpt.nvfp4_linear(f"layers.{layer}.{WKV}")
        measured = float(wkv.weight_scale_2 / wq_a.weight_scale_2)
        assert measured == pytest.approx(ratio, rel=2**-7), "the ratio holds up to the bf16 rounding of wkv"
        assert float(wkv.input_scale) == float(wq_a.input_scale), "wq_a and wkv read the same input"
        w1 = ckpt.nvfp4_linear(f"layers.{layer}.ffn.shared_experts.w1")
        w3 = ckpt.nvfp4_linear(f"layers.{layer}.ffn.shared_experts.w3")
        assert float(w1.weight_scale_2) == float(w3.weight_scale_2), "fused siblings share one amax (ModelOpt)"
    assert ckpt.linear_format(f"layers.1.{WO_A}") == "fp8" and ckpt.is_excluded(f"layers.1.{WO_A}")
    assert ckpt.linear_format(f"layers.0.{WO_A}") == "nvfp4"


def test_generator_reproduces_the_committed_checkpoint(tmp_path):
    generate_checkpoint(str(tmp_path))
    committed, fresh = Checkpoint(os.path.join(REPO, TINY_CHECKPOINT)), Checkpoint(str(tmp_path))
    assert committed.keys() == fresh.keys()
    for name in committed.keys():
        assert_bit_equal(committed.tensor(name), fresh.tensor(name))


def test_synthetic_weights_survive_quantization():
    """The decoded NVFP4 weight is the original up to NVFP4's quantization error: E2M1 with a per-16 E4M3
    scale has a relative RMS error of about 9.5% on these Gaussian weights (measured 0.094-0.095)."""
    ckpt = Checkpoint(os.path.join(REPO, TINY_CHECKPOINT))
    for name in ("attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_b"):
        original = synthetic_weight(TINY, 0, name, seed=0, wkv_amax_ratio=3.0).float()
        decoded = ckpt.nvfp4_linear(f"layers.0.{name}").dequantize(torch.float32)
        error = float((decoded - original).norm() / original.norm())
        assert 0.085 < error < 0.105, (name, error)
    original = synthetic_weight(TINY, 1, WO_A, seed=0).float()
    decoded = ckpt.fp8_linear(f"layers.1.{WO_A}").dequantize(torch.float32)
    assert float((decoded - original).norm() / original.norm()) < 0.03, "E4M3 has 3 mantissa bits: <= 2**-4 per element"


def test_generator_layers_shards_and_dims(tmp_path):
    dims = DSV4Dims(hidden=64, q_lora_rank=32, head_dim=16, n_heads=4, o_groups=4, o_lora_rank=16, shared_intermediate=32, layers=3)
    generate_checkpoint(str(tmp_path), dims, seed=7, max_shard_bytes=20_000)
    ckpt = Checkpoint(str(tmp_path))
    assert os.path.exists(tmp_path / INDEX_FILE)
    assert DSV4Dims.from_model_config(ckpt.model_config) == dims
    assert [ckpt.linear_format(f"layers.{i}.{WO_A}") for i in range(3)] == ["nvfp4", "fp8", "nvfp4"]
    shapes = {prefix: shape for layer in range(3) for prefix, shape in dims.layer_shapes(layer).items()}
    assert all(row["status"] == "ok" for row in ckpt.audit(shapes))


def test_dims_validation():
    with pytest.raises(ValueError, match="o_groups"):
        DSV4Dims(n_heads=3, head_dim=5, o_groups=16)
    with pytest.raises(ValueError, match="hidden = 100 must be a multiple of 16"):
        DSV4Dims(hidden=100)
    with pytest.raises(ValueError, match="wkv_amax_ratios: 3 values for 2 layers"):
        generate_checkpoint("/nonexistent", wkv_amax_ratios=(1.0, 2.0, 3.0))
