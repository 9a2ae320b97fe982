#!/usr/bin/env bash
# Build (or reuse) the virtual environment for `make test-vllm`: vLLM 0.33.0 from PyPI with the torch it
# pins, plus this repository installed editable without dependencies. It lives OUTSIDE the clone (vLLM
# and its torch are ~10 GB), so a second run, or a fresh clone on the same machine, reuses it in seconds.
#
# Usage: scripts/vllm_env.sh            -> prints the venv's python path (the only line on stdout)
#   VLLM_VENV   where the venv lives   (default ${XDG_CACHE_HOME:-$HOME/.cache}/nvfp4-workbook/vllm-0.33.0)
#   PYTHON      interpreter for the venv (default python3, 3.10 or newer)
#
# The venv is rebuilt only if its stamp is missing or names another vLLM version; the editable install
# of this repository is redone (seconds) when the clone or its pyproject.toml changed, so clones can share one venv.
set -euo pipefail
VLLM_VERSION=0.33.0
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nvfp4-workbook/vllm-$VLLM_VERSION}
python=${PYTHON:-python3}
stamp="$venv/.nvfp4-vllm-stamp"
# Run a command quietly; on failure show its output and stop.
quiet() { local log; log=$("$@" 2>&1) || { printf '%s\n' "$log" >&2; echo "vllm_env: failed: $*" >&2; exit 1; }; }

if [ ! -f "$stamp" ] || [ "$(head -n1 "$stamp")" != "vllm==$VLLM_VERSION" ]; then
  echo "vllm_env: building $venv (vllm==$VLLM_VERSION, about 10 GB; minutes on first run)" >&2
  [ -x "$venv/bin/python" ] || { mkdir -p "$(dirname "$venv")" && "$python" -m venv "$venv"; }
  quiet "$venv/bin/python" -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
  # vLLM pins its own torch; on a CPU machine its CUDA wheel imports fine and VLLM_TARGET_DEVICE=cpu
  # keeps vLLM off the GPU code paths.
  quiet "$venv/bin/python" -m pip install -q "vllm==$VLLM_VERSION" pytest
  "$venv/bin/python" -c "import vllm, torch; assert vllm.__version__ == '$VLLM_VERSION', vllm.__version__" >&2
  printf 'vllm==%s\n' "$VLLM_VERSION" > "$stamp"
fi

# The editable install registers the entry point vllm.general_plugins -> nvfp4lib.integrations.vllm:register
# (read from pyproject.toml at install time: redone when the clone or its pyproject.toml changed).
install_id="$repo $(sha256sum "$repo/pyproject.toml" | cut -c1-16)"
if [ "$(sed -n 2p "$stamp")" != "$install_id" ] || ! (cd / && "$venv/bin/python" -c "import nvfp4lib") >/dev/null 2>&1; then
  quiet "$venv/bin/python" -m pip install -q --no-deps -e "$repo"
  printf 'vllm==%s\n%s\n' "$VLLM_VERSION" "$install_id" > "$stamp"
fi
echo "$venv/bin/python"
