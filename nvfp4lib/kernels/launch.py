"""What every kernel launch takes from the host side: the current CUDA stream, the SM count, and the
zeroed counter buffers through which the CTAs of a split-K kernel meet. Torch only (no CuTeDSL import).

Counter buffers. A kernel that splits K counts the arrivals of a tile's splits in int32 slots and leaves
every slot zero when it exits, so a buffer, once zeroed, serves every later launch. Three rules keep that safe:

- one buffer per (device, stream): two split-K kernels running at the same time on different streams (a
  serving engine's shared expert beside its routed experts) would otherwise count into the same slots;
- an eager buffer is never freed. When a launch needs more slots, a larger buffer takes over and the old one is
  retired, not freed: code that kept its address (a CUDA graph captured before this module kept graphs apart,
  a kernel still running) must never see its memory handed to another tensor;
- a CUDA graph gets its own buffers, allocated while it is captured: their zeroing (a memset node, run at the
  start of every replay) is captured with them, so a replay never depends on what eager launches left behind
  and never shares slots with them. Such a buffer lives in the graph's memory pool like any other temporary of
  the capture, and is let go once the capture has ended.
"""
from __future__ import annotations

import threading

import torch

MIN_COUNTER_SLOTS = 4096  # 16 KB: most plans fit, so an eager buffer is rarely replaced

_lock = threading.Lock()
_eager: dict = {}  # (device, stream handle) -> int32 buffer
_retired: list = []  # eager buffers replaced by larger ones (kept alive, see the module docstring)
_captured: dict = {}  # (device, stream handle, capture id) -> int32 buffer of a graph being captured
_sm_counts: dict = {}


def current_stream():
    """The current torch CUDA stream as the ``CUstream`` a compiled CuTeDSL kernel takes."""
    import cuda.bindings.driver as cuda_driver

    return cuda_driver.CUstream(torch.cuda.current_stream().cuda_stream)


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    device = torch.device(device)
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]


def capture_id(stream_handle: int):
    """The id of the CUDA-graph capture running on a stream (a raw handle), or None when it is not capturing."""
    import cuda.bindings.runtime as cudart

    result = cudart.cudaStreamGetCaptureInfo(cudart.cudaStream_t(stream_handle))
    err, status, ident = result[0], result[1], result[2]  # more fields follow in newer cuda-python
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaStreamGetCaptureInfo failed: {err}")
    return int(ident) if status == cudart.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive else None


def _grown(buf, slots: int, device) -> torch.Tensor:
    size = max(slots, MIN_COUNTER_SLOTS, 2 * buf.numel() if buf is not None else 0)
    return torch.zeros(size, dtype=torch.int32, device=device)


def split_counters(device, slots: int, stream: int | None = None, capture=None) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``slots`` counters for a split-K launch on ``device`` and ``stream``
    (a raw stream handle; default: the device's current stream). ``capture``: the id of the CUDA-graph capture
    running on that stream, None if none (default: asked of CUDA on a CUDA device). See the module docstring for
    which buffer comes back."""
    if slots < 0:
        raise ValueError(f"slots must be >= 0, got {slots}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if stream is None:
        stream = torch.cuda.current_stream(device).cuda_stream if cuda else 0
    if capture is None and cuda:
        capture = capture_id(stream)
    with _lock:
        if capture is None:
            _forget_ended_captures(device, stream)
            key, table = (device, stream), _eager
        else:
            key, table = (device, stream, capture), _captured
        buf = table.get(key)
        if buf is None or buf.numel() < slots:
            if buf is not None and capture is None:
                _retired.append(buf)  # within a capture the old buffer stays the graph's, like any temporary
            buf = table[key] = _grown(buf, slots, device)
        return buf


def _forget_ended_captures(device, stream: int) -> None:
    """Let go of the buffers of captures that have ended (their graphs keep the memory through their pool): an eager
    launch on a stream means its capture is over; a CUDA stream is also asked."""
    for key in list(_captured):
        dev, s, ident = key
        if (dev, s) == (device, stream) or (dev.type == "cuda" and _capture_ended(s, ident)):
            del _captured[key]


def _capture_ended(stream: int, ident: int) -> bool:
    try:
        return capture_id(stream) != ident
    except RuntimeError:  # the stream is gone
        return True
