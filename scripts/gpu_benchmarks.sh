#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on one CUDA machine, in about 10 minutes (the install aside):
#   scripts/gpu_benchmarks.sh [OUT_DIR]          (default OUT_DIR: outputs/gpu_benchmarks/<date>_<time>)
# 1. installs the repo into the current Python unless it imports already: pip install -c constraints.txt -e .
#    (PYTHON=/path/to/python to choose the interpreter; XA_SKIP_INSTALL=1 never installs);
# 2. runs the full-shape benchmarks (real architectures, random weights): SUN at 512 px in fp16,
#    X-Adapter SD1.5 512 px -> SDXL 1024 px in bf16, A4A on SDXL at 1024 px in bf16, each with its levers
#    (XA_GPU_COMPILE=1 adds torch.compile: minutes of compilation per model);
# 3. with two GPUs or more: two X-Adapter training steps on 2 GPUs, trainer=ddp and trainer=fsdp;
# 4. prints one JSON object as its last line: every benchmark's own last line, the machine and the seconds.
# Each step has its own time limit inside XA_GPU_BUDGET_S (600); a step that fails or runs out is reported in the
# JSON and the rest go on.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-outputs/gpu_benchmarks/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$OUT"
START=$(date +%s)

if [ "${XA_SKIP_INSTALL:-0}" != 1 ] && ! "$PYTHON" -c "import xa_lightning, torch" 2>/dev/null; then
    echo "installing xa-lightning into $("$PYTHON" -c 'import sys; print(sys.prefix)')" >&2
    "$PYTHON" -m pip install -q -c constraints.txt -e . || { echo "pip install failed" >&2; exit 1; }
fi
BIN=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
    echo "no CUDA device visible to $PYTHON (torch.cuda.device_count() == 0); this script measures GPUs" >&2
    exit 1
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled

BUDGET_S=${XA_GPU_BUDGET_S:-600}  # all steps together, installation excluded

# step NAME LIMIT_S COMMAND...: run it with at most LIMIT_S (and what is left of BUDGET_S); its output goes to
# $OUT/NAME.log, its exit status to $OUT/NAME.status (124: out of time)
step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 20 ]; then echo 124 >"$OUT/$name.status"; echo "skipped: out of time" >"$OUT/$name.log"; return; fi
    echo "[$(( $(date +%s) - START )) s] $name (at most $limit s): $*" >&2
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo $? >"$OUT/$name.status"
    tail -n 1 "$OUT/$name.log" | cut -c 1-300 >&2
}

LEVERS=bf16,sdpa,channels_last,gradient_checkpointing
if [ "${XA_GPU_COMPILE:-0}" = 1 ]; then LEVERS=$LEVERS,compile; fi

step sun 120 "$BIN/xa-bench" sun --runs full_shape@cuda --resolution 512 --repeats 3
step x-adapter 180 "$BIN/xa-bench" x-adapter --flavour full_shape --steps 3 --levers "$LEVERS"
step a4a 150 "$BIN/xa-bench" a4a --flavour full_shape --resolution 1024 --repeats 2 --levers "$LEVERS"
if [ "$GPUS" -ge 2 ]; then
    # two optimizer steps of X-Adapter (SD1.5 512 px -> SDXL 1024 px, full shape, bf16 frozen models) on 2 GPUs:
    # data parallel, then with the frozen models sharded (demo data upscaled; no evaluation)
    for strategy in ddp fsdp; do
        step "$strategy" 120 "$BIN/xa-train" experiment=demo/x_adapter trainer="$strategy" trainer.devices=2 \
            trainer.precision=32-true trainer.max_steps=2 eval.at_end=false logger=none \
            backbone@method.base_backbone=sd15_full_shape backbone@method.upgraded_backbone=sdxl_full_shape \
            method.base_backbone.dtype=bf16 method.upgraded_backbone.dtype=bf16 \
            data.resolution=512 'data.extra_resolutions=[1024]' "hydra.run.dir=$OUT/$strategy-run"
    done
fi

"$PYTHON" - "$OUT" "$START" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path

out, start = Path(sys.argv[1]), float(sys.argv[2])
results = {}
for status in sorted(out.glob("*.status")):
    name, code = status.stem, int(status.read_text())
    lines = [line for line in (out / f"{name}.log").read_text(errors="replace").splitlines() if line.startswith("{")]
    try:
        results[name] = json.loads(lines[-1]) if code == 0 and lines else {"error": f"exit status {code}"}
    except json.JSONDecodeError:
        results[name] = {"error": f"exit status {code}; last line is not JSON"}
    if code == 124:
        results[name] = {"error": "ran out of its time limit"}
import shutil

import torch

query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
gpus = subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines() if shutil.which(query[0]) else []
print(json.dumps({
    "benchmark": "gpu",
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device",
    "gpus": gpus,
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    "seconds": round(time.time() - start),
    "failed": sorted(name for name, result in results.items() if "error" in result),
    "logs": str(out),
    "results": results,
}))
EOF
