#!/usr/bin/env bash
# Regenerate docs/config.md (every experiment key with its default) and docs/experiment.schema.json
# (the JSON Schema `saecli schema` prints) from the config classes in saecli/config/.
# tests/test_docs.py fails when the committed files differ from what this writes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'PY'
from pathlib import Path

from saecli.config.schema import generated_docs

for path, text in generated_docs().items():
    Path(path).write_text(text)
    print(path)
PY
