#!/usr/bin/env bash
# Create (or update) the project's virtual environment; safe to run again.
# Usage: scripts/setup_env.sh VENV_DIR
# Without a GPU it installs a CPU build of torch, never the multi-GB CUDA wheels:
#   - from PyTorch's CPU index when that is reachable;
#   - else torch==$CPU_TORCH_VERSION through pip's configured sources (on machines that keep a local
#     CPU wheel, PIP_FIND_LINKS, that is what pip takes), and it stops if a CUDA build came anyway.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
CPU_TORCH_VERSION=${CPU_TORCH_VERSION:-2.13.0}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade "pip>=23" "setuptools>=64" wheel 2>&1 | grep -v "^WARNING: Location" || true

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  if has_gpu; then
    "${pip[@]}" install -q torch
  elif curl -sfI --max-time 5 https://download.pytorch.org/whl/cpu/ >/dev/null 2>&1; then
    "${pip[@]}" install -q torch --index-url https://download.pytorch.org/whl/cpu
  else
    "${pip[@]}" install -q "torch==$CPU_TORCH_VERSION" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  if ! has_gpu && [ "$("$venv/bin/python" -c 'import torch; print(torch.version.cuda)')" != "None" ]; then
    echo "setup: a CUDA build of torch was installed on a machine without a GPU; install a CPU build by hand" >&2
    exit 1
  fi
fi
"${pip[@]}" install -q -e ".[cute,notebooks,test]" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import nvfp4lib, torch, torchao, papermill; print('setup: ok, torch', torch.__version__)"
