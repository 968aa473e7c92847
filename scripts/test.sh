#!/usr/bin/env bash
# Set up and run the test suite (real images from ../shared/data, or $NASREID_DATA; torchreid model-zoo files
# from ../shared/weights, or $NASREID_WEIGHTS).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NASREID_DATA="${NASREID_DATA:-$(cd .. && pwd)/shared/data}"
export NASREID_WEIGHTS="${NASREID_WEIGHTS:-$(cd .. && pwd)/shared/weights}"
python -m pytest tests -q
