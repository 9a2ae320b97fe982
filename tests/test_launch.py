"""The split-K counter buffers (nvfp4lib/kernels/launch.py): which buffer a launch gets, on CPU; on a Hopper GPU,
split-K GEMMs on two streams at once and a CUDA graph replayed after the eager buffer was replaced."""
import gc
import weakref

import pytest
import torch

from nvfp4lib.kernels import launch
from tests.conftest import requires_cute, requires_hopper

CPU = torch.device("cpu")


@pytest.fixture
def clean_state(monkeypatch):
    """Empty buffer tables for one test (the module's are process-wide)."""
    monkeypatch.setattr(launch, "_eager", {})
    monkeypatch.setattr(launch, "_retired", [])
    monkeypatch.setattr(launch, "_captured", {})


def test_one_zeroed_buffer_per_stream_reused_until_too_small(clean_state):
    a = launch.split_counters(CPU, 100, stream=1)
    assert a.dtype == torch.int32 and a.numel() >= launch.MIN_COUNTER_SLOTS and not a.any()
    assert launch.split_counters(CPU, launch.MIN_COUNTER_SLOTS, stream=1) is a
    b = launch.split_counters(CPU, 100, stream=2)
    assert b is not a and b.data_ptr() != a.data_ptr()


def test_a_replaced_buffer_is_retired_not_freed(clean_state):
    old = launch.split_counters(CPU, 10, stream=1)
    alive = weakref.ref(old)
    new = launch.split_counters(CPU, old.numel() + 1, stream=1)
    assert new.numel() >= 2 * old.numel() and not new.any()
    del old
    gc.collect()
    assert alive() is not None  # kept for whatever captured its address
    assert launch.split_counters(CPU, 1, stream=1) is new


def test_a_capture_has_its_own_buffers_forgotten_once_it_ended(clean_state):
    eager = launch.split_counters(CPU, 10, stream=1)
    captured = launch.split_counters(CPU, 10, stream=1, capture=7)
    assert captured is not eager
    assert launch.split_counters(CPU, 10, stream=1, capture=7) is captured
    assert launch.split_counters(CPU, 10, stream=1, capture=8) is not captured  # another graph
    alive = weakref.ref(captured)
    assert launch.split_counters(CPU, 10, stream=2) is not eager  # an eager launch elsewhere ends nothing
    assert (CPU, 1, 7) in launch._captured
    assert launch.split_counters(CPU, 10, stream=1) is eager  # an eager launch on its stream: the capture ended
    del captured
    gc.collect()
    assert alive() is None and not launch._captured  # the graph's pool keeps the memory, not this module


def test_bad_slot_count_is_an_error(clean_state):
    with pytest.raises(ValueError, match="slots"):
        launch.split_counters(CPU, -1)


def _split_k_weight(n: int, k: int):
    from nvfp4lib.formats import quantize
    from nvfp4lib.ops.gemm import LAYOUT_SM90, prepare_weight

    p = prepare_weight(*(lambda q: (q.packed, q.block_scale, q.global_scale))(quantize(torch.randn(n, k, device="cuda") * 0.02)))
    assert p.layout == LAYOUT_SM90
    return p


@requires_hopper
@requires_cute
def test_split_k_gemms_on_two_streams_at_once(fresh_seed):
    """The decode kernel's grid split K (M = 40, ksplit=1) and the WGMMA kernel's two K splits (M = 256), each on two
    streams at once, many times without a sync: every result equal bit for bit to the same GEMM run alone."""
    from nvfp4lib.kernels.sm90.gemm_decode import run_decode
    from nvfp4lib.kernels.sm90.gemm_wgmma import run_wgmma

    p = _split_k_weight(6144, 7168)
    runs = {
        "decode": (torch.randn(40, 7168, device="cuda", dtype=torch.bfloat16),
                   lambda x, out: run_decode(x, p.weight, p.block_scale, p.alpha, p.n, out=out, ksplit=1, splits=4)),
        "wgmma": (torch.randn(256, 7168, device="cuda", dtype=torch.bfloat16),
                  lambda x, out: run_wgmma(x, p.weight, p.block_scale, p.alpha, p.n, out=out, tile_n=256, splits=2)),
    }
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for name, (x, run) in runs.items():
        alone = run(x, None)
        torch.cuda.synchronize()
        outs = [[torch.full_like(alone, float("nan")) for _ in range(20)] for _ in streams]
        for i in range(20):
            for s, o in zip(streams, outs):
                with torch.cuda.stream(s):
                    run(x, o[i])
        torch.cuda.synchronize()
        assert all(torch.equal(y, alone) for o in outs for y in o), name


@requires_hopper
@requires_cute
def test_graph_replays_after_the_eager_buffer_was_replaced(fresh_seed):
    """A graph of split-K GEMMs captured, then the eager buffer of the same stream replaced (a larger plan) and
    memory churned: replays still equal eager, bit for bit (the graph counts in its own buffer)."""
    from nvfp4lib.kernels.sm90.gemm_decode import run_decode

    p = _split_k_weight(2048, 7168)
    x = torch.randn(40, 7168, device="cuda", dtype=torch.bfloat16)

    def run():
        return run_decode(x, p.weight, p.block_scale, p.alpha, p.n, ksplit=1, splits=4)

    expected = run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
    launch.split_counters(x.device, 64 * launch.MIN_COUNTER_SLOTS)  # replaces this stream's eager buffer
    churn = [torch.full((1 << 14,), -1, dtype=torch.int32, device="cuda") for _ in range(64)]
    for _ in range(3):
        static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, expected)
    assert torch.equal(run(), expected)
    del churn


@requires_hopper
@requires_cute
def test_capture_id_is_none_eagerly_and_set_while_capturing():
    stream = torch.cuda.current_stream().cuda_stream
    assert launch.capture_id(stream) is None
    ids = []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids.append(launch.capture_id(torch.cuda.current_stream().cuda_stream))
        torch.zeros(1, device="cuda")
    assert isinstance(ids[0], int)
