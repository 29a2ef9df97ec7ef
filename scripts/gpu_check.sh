#!/usr/bin/env bash
# The GPU check (issue 22) in one call of about 8 minutes on one H100/H200 with 16 CPU cores:
#   1. env    the GPU, torch, CUDA and the commit                                   -> env.txt
#   2. task   scripts/benchmark_task.py: a generated VTAB-1k-shaped task (1,000 + 5,000 JPEGs),
#             householder, lora and adapter on ViT-B/16 (bf16), eager then compiled, 10 epochs;
#             per run start-up, compile, train, evaluation and total seconds and the 100-epoch
#             task projected                                         -> task.json, task.txt, task.log
#   3. steps  if time is left: scripts/benchmark.py's step time per method on CUDA (batch 64)
#                                                                              -> steps.json, steps.txt
#   summary.txt: each stage's exit status and seconds. Seven files at most, all under $OUT.
#
#   bash scripts/gpu_check.sh                  # from the repository root; OUT defaults to outputs/gpu_check
#   DRY_RUN=1 bash scripts/gpu_check.sh        # print the stages' commands, run nothing
#   TASK_ARGS="..." STEP_ARGS="..." bash scripts/gpu_check.sh   # other arguments for stages 2 and 3
#
# Packages: the GPU machine may lack hydra-core, omegaconf, antlr4 and submitit. Copy them (and
# timm at the version requirements.txt pins) from a machine with requirements.txt installed into
# .devpkgs/ here: it goes first on PYTHONPATH. Logging is off (logger=none; no wandb needed).
# Every stage has its own timeout, so one failure leaves the rest; BUDGET (seconds, default 480)
# bounds all three, and benchmark_task.py's --budget skips runs that no longer fit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
BUDGET=${BUDGET:-480}
PY=${PYTHON:-python3}
TASK_ARGS=${TASK_ARGS:-"--methods householder lora adapter --modes eager compiled --epochs 10 --eval-every 5 --test 5000 --timeout 170"}
STEP_ARGS=${STEP_ARGS:-"--device cuda --batch 64 --steps 20 --warmup 5 --methods linear full householder lora adapter rlrr kadaptation"}
export PYTHONPATH=$PWD/.devpkgs:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 WANDB_MODE=disabled
start=$SECONDS
failed=0
left() { echo $((BUDGET - (SECONDS - start))); }

# stage NAME TIMEOUT_S LOG COMMAND...: the command under `timeout`, its stdout and stderr into LOG
# (its last 400 lines), its exit status and seconds into summary.txt
stage() {
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  if [ -n "${DRY_RUN:-}" ]; then echo "[$name] timeout $limit $*"; return; fi
  if [ "$limit" -lt 20 ]; then echo "$name: skipped, ${limit}s of BUDGET left" | tee -a "$OUT/summary.txt"; return; fi
  echo "[gpu_check] $name (at most ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$log.full" 2>&1
  rc=$?
  tail -n 400 "$OUT/$log.full" >"$OUT/$log" && rm -f "$OUT/$log.full"
  echo "$name: exit $rc in $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || failed=1
}

if [ -z "${DRY_RUN:-}" ]; then
  mkdir -p "$OUT" && : >"$OUT/summary.txt"
  if ! $PY -c "import hydra, omegaconf, timm" 2>/dev/null; then
    echo "hydra-core, omegaconf or timm is missing for $PY: copy them into $PWD/.devpkgs/ (see this script's header)" \
      | tee "$OUT/summary.txt" >&2
    exit 2
  fi
fi

stage env 60 env.txt bash -c "date -u; git rev-parse HEAD; git status --short | head -5; echo cores \$(nproc --all); \
  nvidia-smi | head -15; $PY -c 'import torch, timm, hydra, omegaconf as o; print(\"torch\", torch.__version__, \
\"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), \"timm\", timm.__version__, \
\"hydra\", hydra.__version__, \"omegaconf\", o.__version__)'"

# benchmark_task.py stops starting runs 30 s before the stage's timeout, so its table is printed
task_limit=$(( $(left) > 180 ? $(left) - 60 : $(left) ))  # steps: the rest, 60 s or more
# shellcheck disable=SC2086
stage task "$task_limit" task.log $PY scripts/benchmark_task.py $TASK_ARGS --budget $((task_limit - 30)) \
  --json "$OUT/task.json"
if [ -z "${DRY_RUN:-}" ]; then  # the table as printed, without the per-run JSON lines
  grep -v '^{' "$OUT/task.log" | grep -A60 -m1 'startup_s' >"$OUT/task.txt"
fi

# shellcheck disable=SC2086
stage steps "$(( $(left) - 5 ))" steps.txt $PY scripts/benchmark.py $STEP_ARGS --out "$OUT/steps.json"
if [ -z "${DRY_RUN:-}" ]; then
  cat "$OUT/summary.txt" "$OUT/task.txt"
fi
exit $failed
