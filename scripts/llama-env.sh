# Sourced by scripts/setup and scripts/wheel-smoke: which llama.cpp build, and where it is kept.
LLAMA_VERSION=0.3.36
FLAVOR=portable-rpc
if [ "${SOVCTL_CUDA:-auto}" = 1 ] || { [ "${SOVCTL_CUDA:-auto}" = auto ] \
        && command -v nvcc >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }; then
    FLAVOR=cuda-rpc
fi
WHEELHOUSE=${SOVCTL_WHEELHOUSE:-$HOME/.cache/sovctl/wheels/llama-${LLAMA_VERSION}-${FLAVOR}}
