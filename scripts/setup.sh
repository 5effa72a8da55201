#!/usr/bin/env bash
# Set up saecli in ./.venv from nothing: CPU torch from local disk first (a bare `torch` would pull a
# multi-GB CUDA build), then the package with its test extra. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# SAELens + sparsify for the slow export tests (large: TransformerLens, plotly, ...): SAECLI_INTEROP=1
if [ "${SAECLI_INTEROP:-0}" = 1 ]; then python -m pip install -q -e ".[interop]"; fi
# the quality benchmark's peers (benchmarks/bench_quality.py); dictionary-learning without its pins
python -m pip install -q -e ".[bench]"
python -m pip install -q --no-deps "dictionary-learning>=0.1"
echo "saecli installed in $(pwd)/.venv ($(python -c 'import saecli; print(saecli.__version__)'))"
