#!/usr/bin/env bash
# GPU check: each script a few dozen steps on CUDA with its defaults (compile on, bf16 autocast, or
# fp16 with a loss scaler on GPUs without bf16), then one table: warm-up (compile) time, graphs
# compiled, graphs compiled after warm-up (must be 0), ms/step, GFLOP/s, MFU, peak memory.
#
#     bash tests/gpu_check.sh [OUT_DIR]        # about 10 minutes; logs in OUT_DIR/*.log
#     DEVICE=cpu STEPS=6 bash tests/gpu_check.sh  # a dry run of this script on the CPU (eager)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/nanoworld_gpu_check}
DEVICE=${DEVICE:-cuda}
N=${STEPS:-60}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
fi
export TORCH_LOGS=recompiles  # each recompilation and its reason, in the logs
COMMON="--device $DEVICE --log-every 10 --no-resume --eval-every 1000 --sample-every 1000"
COMMON="$COMMON --ckpt-every 1000"
DATA="--train-clips 256 --eval-clips 16"  # a small pool: data generation is not what is checked

step() {  # name, command...
  local name=$1
  shift
  echo "== $name: $*"
  if ! "$@" >"$OUT/$name.log" 2>&1; then
    echo "   failed: tail of $OUT/$name.log"
    tail -n 20 "$OUT/$name.log"
  fi
}

step vqvae python train_vqvae.py --steps $N $COMMON $DATA --out-dir "$OUT/vqvae"
step world_model python train_world_model.py --steps $N $COMMON $DATA --out-dir "$OUT/world_model"
step river python train_river.py --steps $N $COMMON $DATA --vqvae "$OUT/vqvae" \
  --out-dir "$OUT/river"
step self_forcing python train_self_forcing.py --teacher-steps $N --ode-steps $((N / 2)) \
  --steps $((N / 2)) $COMMON $DATA --out-dir "$OUT/self_forcing"
step probe python train_probe.py --steps $N --log-every 10 --device $DEVICE \
  --out "$OUT/probe/probe.pt"

python - "$OUT" <<'PY'
import json, os, sys

out = sys.argv[1]
cols = ("warmup_s", "graphs_compiled", "graphs_after_warmup", "train_ms_per_step",
        "train_gflop_per_s", "mfu", "peak_memory_gb")
print(f"{'run':<26}" + "".join(f"{c:>20}" for c in cols))
for name in ("vqvae", "world_model", "river", "self_forcing", "probe"):
    path = os.path.join(out, name, "metrics.json")
    if not os.path.isfile(path):
        print(f"{name:<26}no metrics.json (see {name}.log)")
        continue
    perf = json.load(open(path))["perf"]
    rows = perf.get("stages", {name: perf})
    for stage, p in rows.items():
        cells = [p.get(c) for c in cols]
        text = "".join(f"{c:>20.4g}" if isinstance(c, (int, float)) else f"{'-':>20}" for c in cells)
        print(f"{stage if stage != name else name:<26}" + text)
    recompiles = open(os.path.join(out, name + ".log")).read().count("Recompiling")
    print(f"{'':<26}TORCH_LOGS recompilation lines in {name}.log: {recompiles}")
print("device:", json.load(open(os.path.join(out, "vqvae", "metrics.json")))["perf"].get("device"))
PY
