"""CuTeDSL plumbing shared by every kernel: importing cutlass for the right target, a compile cache,
and access to the generated PTX.

Two situations:
- A GPU host: leave ``CUTE_DSL_ARCH`` unset; CuTeDSL targets the card it finds.
- A machine without a GPU (CI): CuTeDSL must be told the target *before* ``import cutlass``,
  otherwise it silently targets sm_100a. :func:`import_cute` sets ``CUTE_DSL_ARCH=sm_90a`` then.
  Compile against fake tensors (``cute.runtime.make_fake_compact_tensor``), never ``from_dlpack`` of
  CUDA tensors. A compile may still pick another target per call: ``compile_kernel(..., arch="sm_100a")``.

``cute.compile`` always recompiles, so kernels are cached here by a key the caller builds from the
static configuration (kernel class, tile shapes, dtypes, problem-shape classes, arch).
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, Hashable

DEFAULT_CPU_ARCH = "sm_90a"


@functools.lru_cache(maxsize=None)
def cute_available() -> bool:
    """True when nvidia-cutlass-dsl can be imported (the ``cute`` extra is installed)."""
    try:
        import_cute()
    except Exception:  # ImportError, or a broken install: both mean "no CuTeDSL here"
        return False
    return True


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def import_cute():
    """Import ``cutlass`` and ``cutlass.cute``, pinning the target first on a machine with no GPU.

    Returns ``(cutlass, cute)``.
    """
    if "cutlass" not in __import__("sys").modules and not cuda_available():
        os.environ.setdefault("CUTE_DSL_ARCH", DEFAULT_CPU_ARCH)
    import cutlass
    import cutlass.cute as cute

    return cutlass, cute


def current_arch() -> str:
    """The arch a compile targets by default: ``CUTE_DSL_ARCH`` if set, else the GPU's (sm_XXa)."""
    arch = os.environ.get("CUTE_DSL_ARCH")
    if arch:
        return arch
    if cuda_available():
        import torch

        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}a"
    return DEFAULT_CPU_ARCH


_cache: dict[Hashable, Any] = {}


@functools.lru_cache(maxsize=None)
def _dump_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="nvfp4lib-cute-")
_lock = threading.Lock()


def compile_kernel(key: Hashable, jit_fn: Callable, *args, arch: str | None = None, keep_ptx: bool = False):
    """Compile ``jit_fn(*args)`` with ``cute.compile`` once per ``(key, arch, keep_ptx)`` and cache it.

    args: what ``cute.compile`` takes (fake tensors on a CPU machine, ``from_dlpack`` tensors or fake
    tensors on a GPU host; ``cute.runtime`` streams). arch: a target such as ``"sm_90a"`` or
    ``"sm_100a"``; None means :func:`current_arch`. keep_ptx: keep the PTX in ``compiled.artifacts.PTX``
    (tests assert on it).
    """
    _, cute = import_cute()
    arch = arch or current_arch()
    full_key = (key, arch, keep_ptx)
    with _lock:
        if full_key in _cache:
            return _cache[full_key]
    options = [cute.GPUArch(arch)]
    if keep_ptx:
        # the artifacts are also dumped as files: keep them out of the working directory
        options += [cute.KeepPTX, cute.KeepCUBIN, _dsl_option("DumpDir")(_dump_dir())]
    compiled = cute.compile[tuple(options)](jit_fn, *args)
    with _lock:
        _cache[full_key] = compiled
    return compiled


def ptx_of(compiled) -> str:
    """The PTX text of a kernel compiled with ``keep_ptx=True``."""
    ptx = compiled.artifacts.PTX
    if not ptx:
        raise RuntimeError("no PTX kept: compile with keep_ptx=True")
    return ptx


def _dsl_option(name: str):
    """A compile option that ``cutlass.cute`` does not re-export (DumpDir in 4.8)."""
    from cutlass.base_dsl import compiler

    return getattr(compiler, name)


def clear_cache() -> None:
    with _lock:
        _cache.clear()
