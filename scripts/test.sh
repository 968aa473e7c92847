#!/usr/bin/env bash
# Set up and run the test suite (real images from ../shared/data, or $NASREID_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NASREID_DATA="${NASREID_DATA:-$(cd .. && pwd)/shared/data}"
python -m pytest tests -q
