#!/usr/bin/env bash
# Install esmc-serve from this checkout into the active virtual environment, torch first.
#
#   tools/setup.sh [EXTRAS]        EXTRAS: comma-separated, default "server"
#   tools/setup.sh server          the service and the Python client
#   tools/setup.sh server,test,esm what the test suite needs
#   tools/setup.sh server,http,ray,otel,esm,plot   every optional feature
#
# torch 2.13.0 comes from the index that TORCH_INDEX names:
#   TORCH_INDEX=cpu      PyTorch's CPU index (https://download.pytorch.org/whl/cpu): a small
#                        CPU-only build
#   TORCH_INDEX=default  pip's configured index (PyPI: on Linux x86-64 a CUDA build of several GB)
#   TORCH_INDEX=URL      any other index, e.g. https://download.pytorch.org/whl/cu130
#   unset                "default" when the machine has an NVIDIA GPU (nvidia-smi runs), else "cpu"
# The choice is printed before anything is installed.
#
# The esm extra installs the official esm package with --no-deps: esm 3.2.1.post1 pins
# transformers<4.48.2 and would replace this project's transformers and torch; its runtime
# needs come from the extra itself.
#
# The test extra also installs what the test suite runs besides Python packages of its own:
#   faesm 0.1.1 (--no-deps: a peer of the forward benchmarks; its needs are already here),
#   buf (npm ci --prefix tools: the wire contract's compatibility check; needs npm),
#   promtool and prometheus (the alert rules' tests; Debian's package prometheus, installed
#   with apt-get when running as root, otherwise the script stops and names the command).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-server}"
if [[ ! "$extras" =~ ^[a-z,]+$ ]]; then
    echo "tools/setup.sh: extras are comma-separated names such as server,test,esm, not '$extras'" >&2
    exit 2
fi
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    echo "tools/setup.sh: activate a virtual environment first (python3 -m venv .venv && . .venv/bin/activate)" >&2
    exit 2
fi

choice="${TORCH_INDEX:-}"
reason="TORCH_INDEX=$choice"
if [[ -z "$choice" ]]; then
    if nvidia-smi >/dev/null 2>&1; then
        choice=default reason="an NVIDIA GPU answers nvidia-smi; TORCH_INDEX=cpu overrides"
    else
        choice=cpu reason="no NVIDIA GPU (nvidia-smi does not run); TORCH_INDEX=default overrides"
    fi
fi
case "$choice" in
    cpu) index=(--index-url https://download.pytorch.org/whl/cpu) ;;
    default) index=() ;;
    http://*|https://*|file://*) index=(--index-url "$choice") ;;
    *) echo "tools/setup.sh: TORCH_INDEX is cpu, default or an index URL, not '$choice'" >&2; exit 2 ;;
esac
echo "tools/setup.sh: torch 2.13.0 from ${index[1]:-the default index of pip} ($reason)" >&2

set -x
pip install torch==2.13.0 "${index[@]}"
pip install -e ".[$extras]"
if [[ ",$extras," == *,esm,* ]]; then
    pip install --no-deps esm==3.2.1.post1
fi
if [[ ",$extras," == *,test,* ]]; then
    pip install --no-deps faesm==0.1.1
    { set +x; } 2>/dev/null
    if ! command -v npm >/dev/null; then
        echo "tools/setup.sh: the tests need npm (for buf): install Node.js, e.g. apt-get install npm" >&2
        exit 2
    fi
    if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
            set -x
            apt-get update -q
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
        else
            echo "tools/setup.sh: the tests need promtool and prometheus: sudo apt-get install prometheus" >&2
            exit 2
        fi
    fi
    set -x
    npm ci --prefix tools --no-audit --no-fund
fi
