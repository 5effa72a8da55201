#!/usr/bin/env bash
# Regenerate the shell completion scripts in completions/ (they call back into `saecli`, so they stay
# right as commands and options change).
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
from pathlib import Path

from typer._completion_shared import get_completion_script

for shell in ("bash", "zsh", "fish"):
    script = get_completion_script(prog_name="saecli", complete_var="_SAECLI_COMPLETE", shell=shell)
    Path(f"completions/saecli.{shell}").write_text(script)
    print(f"completions/saecli.{shell}")
PY
