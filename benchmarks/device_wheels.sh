#!/usr/bin/env bash
# Where pip works (this machine), before a GPU session: fetch into .whl/ the wheels that the GPU image
# lacks or holds too old (/work/.library/device/KINDS.md: its python3 is 3.12 with torch, tokenizers,
# safetensors, accelerate, pyarrow, scipy, pytest, hypothesis, but no polars, and transformers 5.17
# where this project needs >= 5.24), and the default model's tokenizer files into .whl/tokenizer/
# when it is cached here. Then a device call carries .whl:
#
#     bash benchmarks/device_wheels.sh
#     run(command="bash benchmarks/device_check.sh --tokenizer .whl/tokenizer", carry=[".whl"], timeout_s=540)
#
# Sizes (2026-12): polars 1.33.1 (one wheel, 38 MiB; polars 2.x needs a 51 MiB runtime wheel beside it,
# too much for the 64 MiB a call carries), transformers 5.24.0 (13 MiB), tokenizer 3.4 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>"$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "polars==1.33.1" "transformers==5.24.0"
CACHE=${LIFELONG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lifelong}/models/smollm2-135m
if [ -f "$CACHE/tokenizer.json" ]; then
    mkdir -p .whl/tokenizer
    cp "$CACHE"/tokenizer.json "$CACHE"/tokenizer_config.json .whl/tokenizer/
    [ -f "$CACHE/chat_template.jinja" ] && cp "$CACHE/chat_template.jinja" .whl/tokenizer/
fi
du -sh .whl
