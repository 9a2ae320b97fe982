"""Fixtures for the tests against real vLLM 0.33.0 on CPU (run by ``make test-vllm`` in the venv that
``scripts/vllm_env.sh`` builds; never by ``make test``).

Session setup, as vLLM does it in a worker: plugins loaded through the ``vllm.general_plugins`` entry
point, a ModelConfig read from a model directory (so vLLM itself picks the quantization method from
hf_quant_config.json), a current VllmConfig, and a single-rank gloo process group with tensor and
pipeline parallel size 1.

Results that the notebook shows are collected in ``results`` and written at the end of the session to
``$NVFP4LIB_VLLM_RESULTS`` (default ``reports/vllm/test_vllm_results.json``).
"""
import datetime
import json
import os
import socket
import subprocess

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_model import dims_of, write_model_dir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_PATH = os.environ.get("NVFP4LIB_VLLM_RESULTS", os.path.join(REPO, "reports", "vllm", "test_vllm_results.json"))
_RESULTS = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("NVFP4LIB_COMMIT", "unknown")


@pytest.fixture(scope="session")
def results():
    """A dict the tests fill with measured numbers; written to RESULTS_PATH at session end."""
    return _RESULTS


def pytest_sessionfinish(session, exitstatus):
    if not _RESULTS:
        return
    import vllm

    payload = {
        "method": "make test-vllm: vLLM's real linear layers and weight loaders on CPU, outputs vs nvfp4lib's exact reference",
        "device": "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "pytest_exit_status": int(exitstatus),
        "results": _RESULTS,
    }
    os.makedirs(os.path.dirname(RESULTS_PATH), exist_ok=True)
    with open(RESULTS_PATH, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, results):
    directory = str(tmp_path_factory.mktemp("tiny-dsv4-nvfp4"))
    results["checkpoint_source"] = write_model_dir(directory)
    return directory


@pytest.fixture(scope="session")
def dims(model_dir):
    return dims_of(model_dir)


@pytest.fixture(scope="session")
def vllm_config(model_dir):
    """The current VllmConfig for the session (built after the general plugins were loaded)."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does first: runs our entry point
    model_config = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16")
    config = VllmConfig(model_config=model_config)
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{_free_port()}", local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
        yield config


@pytest.fixture(scope="session")
def checkpoint(model_dir):
    """name -> tensor, read with vLLM's safetensors iterator."""
    from tiny_model import read_checkpoint

    return read_checkpoint(model_dir)


@pytest.fixture
def fresh_seed(request):
    """A seed that differs per test and per run (recorded in the test report)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    return seed
