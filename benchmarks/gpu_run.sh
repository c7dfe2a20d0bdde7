#!/usr/bin/env bash
# The GPU checks as one prepared command, for a session lent a device machine (one call, < 10 min): the smoke
# suite of benchmarks/gpu_smoke.py (a locally built ~1B Llama, 4-bit QLoRA train + eval + save + resume,
# eval, generate, merge, GGUF export, DDP on 2+ GPUs) with issue 6's speed benchmark as its last step, and a
# pass/fail table at the end (exit 1 if a step failed). Nothing comes from the Hub.
#
#   here, once:   bash benchmarks/gpu_run.sh --fetch-wheels   # the packages the device image lacks -> .whl/ (~45 MB)
#   device:       run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
#   here, on CPU: bash benchmarks/gpu_run.sh --tiny           # the same steps on a tiny model (CPU dry run, ~6 min)
#
# Options after the first are gpu_smoke.py's: --tiny, --skip speed,ddp, --only speed (the speed benchmark
# alone, as this script ran before), --budget SECONDS (default 480), --device cpu|cuda.
#
# The device image has torch, transformers, peft, accelerate, tokenizers, safetensors, psutil, pyyaml and
# matplotlib, but not bitsandbytes, datasets, pydantic or gguf (/work/.library/device/KINDS.md). Their wheels,
# at the versions of constraints.txt (what CI runs), are installed into /tmp/site when the Python here cannot
# import them. Table, JSON, logs, versions and nvidia-smi go to $OUT; models and runs to /tmp/wronai-smoke.
set -euo pipefail
cd "$(dirname "$0")/.."

# packages the device image lacks (datasets' and pydantic's own dependencies included); versions: constraints.txt
WHEELS="bitsandbytes datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection gguf"

pin() {  # the name==version line of constraints.txt for a package (- and _ alike, any case)
    grep -iE "^${1//-/[-_]}==" constraints.txt | head -1
}

if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PYTHON=.venv/bin/python; fi
PYTHON="${PYTHON:-python3}"

if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    specs=()
    for pkg in $WHEELS; do
        spec="$(pin "$pkg")"
        [ -n "$spec" ] || { echo "constraints.txt pins no $pkg" >&2; exit 2; }
        specs+=("$spec")
    done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
    ls .whl
    du -sh .whl
    exit 0
fi

OUT="${OUT:-/tmp/wronai-gpu}"
mkdir -p "$OUT"
export OUT
if ! "$PYTHON" -c "import bitsandbytes, datasets, pydantic, gguf" 2>/dev/null; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    else
        echo "warning: $PYTHON lacks bitsandbytes/datasets/pydantic/gguf and no .whl/ was carried (--fetch-wheels here first)" >&2
    fi
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: no GPU listed"
exec "$PYTHON" benchmarks/gpu_smoke.py --out "$OUT" "$@"
