#!/usr/bin/env bash
# One prepared run on a borrowed GPU machine (the workplace's `device` tool; 15 minutes in all).
#
# What it does, in order, within ~9.5 minutes of wall time:
#   1. installs what the machine lacks (SimpleITK, MONAI, nibabel) from .devrun/ and unpacks the
#      shared data to ../shared/data beside the checkout, where it sits on the development machine;
#   2. the deformable GPU benchmark of issue 18 (our pipeline only; peers need a CPU machine);
#   3. three trainings side by side on the one GPU, each with batch workers on the CPU cores:
#      the two midline diffusion models (issue 13) and the MRI + CT affine model (issue 16);
#      then the gpu-marked tests;
#   4. times an affine registration with the new model on the GPU and on the CPU;
#   5. packs the trained weights, histories and logs into $OUT (at most 8 files of 16 MiB).
#
# Prepared on the development machine (`.devrun/` is git-ignored and carried by the tool):
#   .devrun/sitk.tar.xz    SimpleITK 2.5.7 (cp311-abi3 manylinux wheel, unpacked, .so stripped, xz)
#   .devrun/pure.tar.xz    MONAI 1.6.1 and nibabel 5.4.2 (their wheels unpacked, xz)
#   .devrun/data.tar.xz    ../shared/data files the run reads (the .nii.gz ones stored as .nii)
#   .devrun/poses.json     the midline pose cache (keyed by resolved paths: it hits when the
#                          checkout sits at the same place on both machines, as it does there)
# and the tool carries bench/out/deformable_brain_affine.mat (the benchmark's shared ANTs affine:
# the GPU machine has no ANTs).
#
# Environment: PY (python, default python3), DEVICE (default cuda), TRAIN_MINUTES (default 3.5),
# DEADLINE_S (default 420: seconds after the start at which unfinished trainings are stopped),
# SKIP_SETUP=1 (packages and data are already there; used for a local rehearsal on the CPU).
set -u
START=$(date +%s)
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
TRAIN_MINUTES=${TRAIN_MINUTES:-3.5}
DEADLINE_S=${DEADLINE_S:-420}
OUT=${OUT:?set OUT to the folder that receives the results}
RUNS=${RUNS:-.devrun/runs}
DATA=../shared/data
SITE=.devrun/site
B=$DATA/brain
H=$DATA/headct
mkdir -p "$RUNS" "$OUT"
log() { echo "[$(($(date +%s) - START)) s] $*"; }

if [ "${SKIP_SETUP:-0}" != 1 ]; then
  log "setup"
  mkdir -p "$SITE" && tar -xJf .devrun/sitk.tar.xz -C "$SITE" && tar -xJf .devrun/pure.tar.xz -C "$SITE" || exit 1
  export PYTHONPATH=$(cd "$SITE" && pwd)${PYTHONPATH:+:$PYTHONPATH}
  mkdir -p "$DATA" && tar -xJf .devrun/data.tar.xz -C "$DATA" || exit 1
  # back to the names the pose cache and the commands use (voxels unchanged)
  find "$DATA" -name '*.nii' -print0 | xargs -0 -P 16 -n 1 gzip -1 -n
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, SimpleITK, monai; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'SimpleITK', SimpleITK.Version_VersionString(), 'monai', monai.__version__)" || exit 1
fi
export DIFFUSIONREG_SHARED_DATA=$DATA PYTHONUNBUFFERED=1

# 2. deformable on the GPU (issue 18): our pipeline end to end (read, register, write .nii), after
#    a warm-up registration per model that the benchmark excludes; bounded in time
log "deformable GPU benchmark"
timeout 120 $PY bench/deformable.py --device cuda --threads 16 --write-ext .nii --forward-only \
  --methods ours-default,ours-fast --lung-cases 054,056 --brain --brain-model brain-mri --run-name gpu \
  >"$RUNS/deformable_gpu.log" 2>&1
log "deformable benchmark rc=$?"
cp bench/out/deformable_gpu.md bench/out/deformable_gpu.json "$RUNS"/ 2>/dev/null

# 3. the trainings, side by side
common=(--device "$DEVICE" --max-minutes "$TRAIN_MINUTES" --checkpoint-minutes 2 --threads 1 --progress none)
for stage in normal all; do
  $PY -m diffusionreg train midline --stage diffusion-$stage --template-dir $H \
    --normal $H/cthead_unc_cadaver_256x256x113.nii.gz --val $H/ge_hispeed_head_tilt_dicom \
    --pose-cache .devrun/poses.json --output "$RUNS/diffusion-$stage" --steps 20000 --val-every 2500 \
    --data-workers 5 --name head-ct-eps-$stage "${common[@]}" >"$RUNS/diffusion-$stage.log" 2>&1 &
  eval "pid_$stage=$!"
done
$PY -m diffusionreg train affine \
  --data $B/vxm_test_scan_T1.nii.gz $B/oasis_A_norm.nii.gz $B/mni152_T1_1mm.nii.gz --modality mri --val $B/oasis_B_norm.nii.gz \
  --data $H/scct_head_template_2mm.nii.gz $H/cthead_unc_cadaver_256x256x113.nii.gz --modality ct \
  --val $H/scct_unsmooth_SS_0.01_1mm_HU.nii.gz --config compact --steps 5000 --val-every 1000 \
  --output "$RUNS/affine-mri-ct" --data-workers 5 --name brain-head-mri-ct "${common[@]}" >"$RUNS/affine.log" 2>&1 &
pid_affine=$!
log "trainings started: $pid_normal $pid_all $pid_affine"

while kill -0 $pid_normal $pid_all $pid_affine 2>/dev/null; do
  if [ $(($(date +%s) - START)) -ge "$DEADLINE_S" ]; then
    log "deadline: stopping the trainings that are still running"
    kill -TERM $pid_normal $pid_all $pid_affine 2>/dev/null
    sleep 3
    break
  fi
  sleep 5
done
for name in normal all affine; do
  eval "wait \$pid_$name"
  log "training $name rc=$?"
done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader

# the gpu-marked tests, after the trainings: on 2026-11-30 they ran beside them and their CPU
# halves took the cores the batch workers needed (named files: collecting every module would need
# the CPU machine's peers, antspyx and slicer-core)
gpu_tests=(Testing/test_fields.py Testing/test_training_batches.py Testing/test_gpu_training.py Testing/test_gpu_deformable.py)
timeout 150 $PY -m pytest -c Testing/pytest.ini -m gpu -q -rA -p no:cacheprovider "${gpu_tests[@]}" >"$RUNS/gpu_tests.log" 2>&1
log "gpu tests rc=$?"

# 5. time per affine registration with the new model (issue 16), the bundled sample pair, the CLI
#    end to end (start, read, register, write); the first CUDA run pays for the context start
best=$RUNS/affine-mri-ct/best
if [ -f "$best/model.safetensors" ] && [ $(($(date +%s) - START)) -lt 520 ]; then
  for run in cuda-1 cuda-2 cuda-3 cpu-1; do
    t0=$(date +%s%N)
    $PY -m diffusionreg affine --fixed Resources/Sample/sample_fixed.nii.gz --moving Resources/Sample/sample_moving.nii.gz \
      --model "$best" --modality mri --device "${run%-*}" --output-transform "$RUNS/affine_$run.h5" \
      --output-json "$RUNS/affine_$run.json" --progress none >"$RUNS/affine_$run.log" 2>&1
    rc=$?
    log "affine registration $run: rc=$rc, $((($(date +%s%N) - t0) / 1000000)) ms end to end"
  done
fi

# 6. results (weights: best/ and the last export; the optimiser checkpoints stay behind)
# (the affine's best and last weights together pass the 16 MiB a file may have: best/ alone)
pack() {
  local name=$1 dir=$2 extra=${3:-}
  [ -d "$dir" ] && tar -cf "$OUT/$name.tar" -C "$(dirname "$dir")" --exclude checkpoint.pt $extra "$(basename "$dir")"
}
pack midline_normal "$RUNS/diffusion-normal"
pack midline_all "$RUNS/diffusion-all"
pack affine "$RUNS/affine-mri-ct" --exclude=affine-mri-ct/model.safetensors
tar -cf "$OUT/logs.tar" -C "$RUNS" --exclude=./diffusion-normal --exclude=./diffusion-all --exclude=./affine-mri-ct . 2>/dev/null
ls -la "$OUT"
for f in "$RUNS"/*.log; do echo "== $f"; tail -n 4 "$f"; done
log "done"
