#!/usr/bin/env bash
# The device check (issue #36), unchanged on a fresh GPU machine, from the repository root:
#
#     bash benchmarks/device_check.sh [device_check.py options]      # e.g. --dry-run on a CPU machine
#
# 1. Makes the project importable without touching the machine's torch: packages missing here are
#    installed with --no-deps from wheels carried in .whl/ (a GPU machine here has no network; make the
#    folder with benchmarks/device_wheels.sh where pip works, and carry it); the project itself with
#    `pip install --no-deps --no-build-isolation -e .`, else from the source tree (PYTHONPATH). Never
#    pulls a torch build: nothing is installed with its dependencies.
# 2. Runs benchmarks/device_check.py: the tests marked cuda, short replays of six editors in float32 and
#    bfloat16, a kill-and-resume compared bitwise, one edit against a forward; prints one table and
#    writes it to $OUT/device_check.txt when $OUT is set (or --out FILE).
#
# Sized for at most ~8 minutes on one H100 with the default settings (each replay 2 steps).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}

missing() {  # the import names among "$@" that this Python cannot import
    "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

"$PY" -c "import torch" 2>/dev/null || { echo "device_check: $PY has no torch; set PYTHON" >&2; exit 2; }
NEEDED="polars pyarrow transformers safetensors tokenizers accelerate scipy numpy tqdm matplotlib pytest hypothesis"
# The project needs transformers >= 5.24 (its cache API); an older one counts as missing when a wheel is carried.
OLD_TF=$("$PY" -c "import transformers as t, sys; v=tuple(int(x) for x in t.__version__.split('.')[:2]); print('old' if v < (5, 24) else '')" 2>/dev/null || true)
LACK=$(missing $NEEDED)
if [ -n "$LACK" ] || [ -n "$OLD_TF" ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "device_check: installing carried wheels for: ${LACK:-} ${OLD_TF:+transformers (older than 5.24)}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lifelong-site .whl/*.whl \
            || { echo "device_check: installing .whl/ failed" >&2; exit 2; }
        export PYTHONPATH=/tmp/lifelong-site${PYTHONPATH:+:$PYTHONPATH}
    elif [ -n "$LACK" ]; then
        echo "device_check: missing $LACK and no .whl/ folder (run benchmarks/device_wheels.sh where pip works, carry .whl)" >&2
        exit 2
    else
        echo "device_check: transformers older than 5.24 and no wheel carried: going on, results may differ" >&2
    fi
fi
if ! "$PY" -c "import lifelong" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the tree itself wins over any other install
if [ -z "${OUT:-}" ]; then echo "device_check: \$OUT is not set: the table goes to stdout (and --out FILE if given)"; fi
exec "$PY" benchmarks/device_check.py "$@"
