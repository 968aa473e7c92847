#!/usr/bin/env bash
# Install nasreid and its dependencies into the active Python environment (a venv is recommended).
# torch/torchvision: the versions pinned here are the ones this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -e ".[test]"
