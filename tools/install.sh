#!/usr/bin/env bash
# Install convlens into ./.venv (or $VENV): PyTorch first, then the package.
#
# Without an NVIDIA GPU this takes PyTorch's CPU build, a few hundred MB, instead of the
# multi-GB CUDA build that a plain `pip install torch` pulls on Linux.
#   CONVLENS_TORCH=cpu|cuda|skip   force the choice (default: cuda if nvidia-smi works, else cpu)
#   TORCH_VERSION=2.13.0           the PyTorch release to install
#   EXTRAS=test                    optional extras of convlens to install as well
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=${EXTRAS:-}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

want=${CONVLENS_TORCH:-}
if [ -z "$want" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        want=cuda
    else
        want=cpu
    fi
fi

have=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
case "$want" in
    skip) ;;
    cpu)
        if [[ "$have" != "$TORCH_VERSION+cpu" && "$have" != "$TORCH_VERSION" ]]; then
            echo "installing PyTorch $TORCH_VERSION (CPU build)"
            # First what pip already reaches (its configured index, a mirror, local wheels in
            # PIP_FIND_LINKS): no retries against an index that may be unreachable. Only when
            # none of them has the +cpu build is PyTorch's CPU index added (the main index stays).
            if ! pip install -q --retries 0 "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
                pip install -q "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
            fi
        fi
        ;;
    cuda)
        if [[ -z "$have" || "$have" == *+cpu ]]; then
            echo "installing PyTorch $TORCH_VERSION (CUDA build)"
            pip install -q "torch==$TORCH_VERSION"
        fi
        ;;
    *) echo "CONVLENS_TORCH must be cpu, cuda or skip. Received: $want" >&2; exit 2 ;;
esac

spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
pip install -q -e "$spec"
"$VENV/bin/python" -c 'import torch, convlens; print(f"convlens {convlens.__version__} with torch {torch.__version__}")'
