#!/usr/bin/env bash
# Issue 6's GPU checks as one prepared command, for a session lent a device machine (one call, < 10 min).
#
#   here, once:   bash benchmarks/gpu_run.sh --fetch-wheels   # the packages the device image lacks -> .whl/ (~45 MB)
#   device:       run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
#
# The device image has torch, transformers, peft, accelerate, tokenizers, safetensors, psutil, pyyaml and
# matplotlib, but not bitsandbytes, datasets or pydantic (/work/.library/device/KINDS.md). The run installs
# the carried wheels into /tmp/site, runs `benchmarks/train_speed.py --device cuda` (classic in bf16 mixed
# precision with bf16 4-bit compute, as GPU QLoRA scripts run; wronai with its GPU plan) and writes the
# table, its JSON, the versions and nvidia-smi to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    for pkg in bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 \
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$pkg"
    done
    du -sh .whl
    exit 0
fi

OUT="${OUT:-/tmp/wronai-gpu}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 - <<'EOF' | tee "$OUT/versions.txt"
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "pydantic"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"))
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
timeout 480 python3 benchmarks/train_speed.py --device cuda --rows 1200 --hidden 384 --layers 6 --repeat 2 \
    --variants classic,wronai --out /tmp/wronai-bench 2>&1 | tee "$OUT/train_speed.log"
cp /tmp/wronai-bench/results.json "$OUT/train_speed.json"
