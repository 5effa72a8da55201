#!/usr/bin/env bash
# Regenerate the shell completion scripts in completions/ (they call back into `saecli`, which completes
# commands, options and `--set` key paths, so they stay right as commands and keys change).
# tests/test_docs.py fails when the committed scripts differ from what this writes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'PY'
from pathlib import Path

from saecli.commands import completion_scripts

for path, script in completion_scripts().items():
    Path(path).write_text(script)
    print(path)
PY
