#!/usr/bin/env bash
# One GPU session's measurements in one command (see scripts/gpu_kit.py for the carried files):
#   1. conditioning cost on CUDA: on-line teacher vs cached teacher logits, each with and without
#      bf16 autocast (benchmarks/bench_conditioning.py), peak GPU memory;
#   2. merge() wall time and peak GPU memory of every method on CLIP ViT-B/32-shaped task vectors;
#   3. an experiment at GPU scale (longer sources, the paper's 500 conditioning steps and 0.05
#      coefficient grid): EXPERIMENT=text-zeroshot (default; the paper's frozen-head set-up, where the
#      low-confidence claim reproduced on CPU) or text-confident (trained heads).
# Each part has its own time limit and writes under $OUT as it finishes, so a part that runs out of
# time costs only itself. Run from the repository root, e.g. with the device tool:
#   python scripts/gpu_kit.py   # here, once
#   run(command="bash scripts/gpu_run.sh", carry=[".device"], timeout_s=600)
# Locally (CPU, a quick check of the plumbing): OUT=/tmp/out DEVICE=cpu SMOKE=1 bash scripts/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
DEVICE=${DEVICE:-cuda}
KIT=${KIT:-$PWD/.device}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} DISTAC_DATA=$KIT/data PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
mkdir -p "$OUT/benchmarks" "$OUT/results"
# distac's default low-confidence student temperature (4); the CPU pages' configs pin the 2 they were made with
TS_ARGS=(--set condition_per_scenario.low_confidence.student_temperature=4)
if [[ ${SMOKE:-0} == 1 ]]; then
  COND_ARGS=(--steps 4 --batch-size 16 --unlabeled 64) MERGE_ARGS=(--tasks 2 --methods task_arithmetic ties --wudi-iters 2)
  EXP_ARGS=(--set finetune.steps=4 --set condition.steps=2 --set limits.train=64 --set limits.test=32
            --set "studies={}" "${TS_ARGS[@]}")
  LIMITS=(120 120 300)
else
  COND_ARGS=(--steps 100 --batch-size 128 --unlabeled 4096)
  MERGE_ARGS=(--tasks 8)
  EXP_ARGS=(--set finetune.steps=1000 --set condition.steps=500 --set limits.train=2000 --set limits.validation=200
            --set limits.test=500 --set grid=null "${TS_ARGS[@]}")
  LIMITS=(100 170 250)
fi
START=$SECONDS
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"; } \
  | tee "$OUT/machine.txt"

echo "== 1. conditioning cost ($DEVICE)"
timeout "${LIMITS[0]}" "$PY" benchmarks/bench_conditioning.py --device "$DEVICE" --backbone "$KIT/minilm" \
  --data-root "$KIT/data" "${COND_ARGS[@]}" --output "$OUT/benchmarks/conditioning_{device}" 2>&1 \
  | tee "$OUT/benchmarks/conditioning.log"

echo "== 2. merge cost ($DEVICE), after $((SECONDS - START)) s"
timeout "${LIMITS[1]}" "$PY" benchmarks/bench_merging.py --device "$DEVICE" "${MERGE_ARGS[@]}" \
  --out-dir "$OUT/benchmarks" 2>&1 | tee "$OUT/benchmarks/merging.log"

EXPERIMENT=${EXPERIMENT:-text-zeroshot}
echo "== 3. $EXPERIMENT at GPU scale, after $((SECONDS - START)) s"
RUN_DIR=${RUN_DIR:-/tmp/distac-runs/$EXPERIMENT}
deadline=$((SECONDS + LIMITS[2]))
for part in "--scenario original --study none" "--scenario low_confidence --study none" ""; do
  left=$((deadline - SECONDS))
  ((left > 10)) || { echo "out of time before: experiment $part"; break; }
  # shellcheck disable=SC2086  # $part is a list of options
  timeout "$left" "$PY" -m distac.cli experiment "$EXPERIMENT" --run-dir "$RUN_DIR" --set "backbone=$KIT/minilm" \
    "${EXP_ARGS[@]}" $part --results-dir "$OUT/results/$EXPERIMENT-$DEVICE" 2>&1 \
    | tee -a "$OUT/results/$EXPERIMENT.log"
done
echo "== done in $((SECONDS - START)) s"
