#!/usr/bin/env bash
# ONE command for a GPU machine (torch + accelerate installed, no internet): the training step, the trainer end to
# end, peak memory and an evaluation timing, written as JSON under benchmarks/results/, with the speed aims (step
# speed-up, MFU, trainer overhead: benchmarks/gpu_check_summary.py) checked in summary.json. Meant to finish in under
# 8 minutes on one H100/H200-class CUDA GPU; stages run in order of importance, each within what is left of the
# budget (GPU_CHECK_BUDGET_S, default 450 s), so a slow stage costs only itself.
#
#   bash benchmarks/gpu_check.sh                      # CUDA, paper models at 224 px -> benchmarks/results/gpu_check_<date>/
#   bash benchmarks/gpu_check.sh --device cpu --smoke # tiny models, a minute on a CPU (tests/test_bench_train_step.py)
#   bash benchmarks/gpu_check.sh --out DIR            # results elsewhere
#
# Stages (CUDA): 0. checkpoint_resume: explainer/train.py (tiny models, Adam) saves a checkpoint and resumes from it on
# the GPU (Adam's step stays on the CPU there: benchmarks/checkpoint_resume_check.py); 1. bare step, eager: DeepLabV3-R50 explainer + ResNet-50 / VGG-16 classifiers, 224 px, batch
# 16/32/64, modes reference (fp32, the paper code's structure) / ours_fp32 / ours (bf16 autocast, channels_last),
# FLOPs, MFU and peak memory per row; 1b. the ours step at 20 and 1000 classes (ResNet-50, batch 32): step time and
# peak memory against the 20-class row (docs/results.md#many-classes); 2. explainer/train.py end to end on
# synthetic 224 px shards made on the fly, against the bare step with the same settings (batch 32); 3. Explainer vs
# Grad-CAM ms per image, all 20 classes; 4. the ours step compiled (torch.compile, static shapes) at batch 32;
# 5. summary.json.
#
# Dependencies: the GPU machine needs Python >= 3.11 with a CUDA build of torch, torchvision, accelerate, numpy,
# Pillow, matplotlib, PyYAML, tqdm, webdataset, braceexpand and captum. Without internet access, what it lacks travels
# as wheels in .gpu-wheels/ (git-ignored) and is installed from there with --no-index into .gpu-site/ (only when an
# import fails). On an image with Python 3.12, torch, torchvision, accelerate, Pillow, matplotlib, tqdm and PyYAML that
# is webdataset, braceexpand and captum, under 1 MiB; build the folder where pip can reach the index (`make
# gpu-wheels` runs exactly this):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .gpu-wheels webdataset==1.0.2 braceexpand==0.1.7 captum==0.9.0
#
# and carry .gpu-wheels with the checkout. Other images: add what `python3 -c "import torchvision, PIL, matplotlib,
# yaml, tqdm"` reports missing to that command (pinned as in requirements/constraints.txt).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEVICE=cuda
SMOKE=0
OUT=""
while (($#)); do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        -h | --help) sed -n '2,29p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
OUT="${OUT:-benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

say() { echo "[gpu_check $((SECONDS - START))s] $*" | tee -a "$LOG" >&2; }
left() { echo $((BUDGET_S - (SECONDS - START))); }

# Run one stage with what is left of the budget (at least `min` seconds, else it is skipped); its output goes to the
# log. A failed or timed-out stage is recorded, the next one runs.
stage() {
    local name=$1 min=$2
    shift 2
    local budget
    budget=$(left)
    if ((budget < min)); then
        say "SKIP $name: ${budget}s left of ${BUDGET_S}s, it needs ~${min}s"
        echo "$name: skipped (time budget)" >>"$OUT/stages.txt"
        return 0
    fi
    say "start $name (${budget}s left)"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$budget" "$@" >>"$LOG" 2>&1 || rc=$?
    say "end $name: exit $rc after $((SECONDS - t0))s"
    echo "$name: exit $rc, $((SECONDS - t0)) s" >>"$OUT/stages.txt"
}

# -- dependencies ------------------------------------------------------------------------------------------------------
IMPORTS="import torch, torchvision, accelerate, numpy, PIL, yaml, tqdm, webdataset, braceexpand, captum.attr"
if ! "$PY" -c "$IMPORTS" 2>/dev/null; then
    if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
        say "installing the carried wheels (.gpu-wheels -> .gpu-site)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .gpu-site \
            .gpu-wheels/*.whl >>"$LOG" 2>&1
        export PYTHONPATH="$ROOT/.gpu-site:$PYTHONPATH"
    fi
    if ! "$PY" -c "$IMPORTS" >>"$LOG" 2>&1; then
        say "missing Python packages (see $LOG): build .gpu-wheels with \`make gpu-wheels\` (header of this script)"
        exit 1
    fi
fi
if "$PY" - "$OUT/env.json" "$DEVICE" <<'PYEOF' >>"$LOG" 2>&1
import json, os, platform, sys, torch, accelerate
out, device = sys.argv[1], sys.argv[2]
info = {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cpus": os.cpu_count(),
        "device_type": device, "host": platform.node()}
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), memory_gib=p.total_memory / 2**30, sms=p.multi_processor_count)
json.dump(info, open(out, "w"), indent=1)
PYEOF
then :; else say "environment check failed: $(tail -n 3 "$LOG" | tr '\n' ' ')"; exit 1; fi
say "environment: $(tr -d '\n' <"$OUT/env.json")"

# -- what to run ---------------------------------------------------------------------------------------------------------
if ((SMOKE)); then
    MODELS=(--explainer tiny_unet --classifiers tiny_cnn --image-size 32 --num-classes 4)
    STEP=(--batch-sizes 2,4 --warmup 1 --iters 1 --rounds 1 --peak-tflops 1 --peak-tflops-fp32 0.5)
    E2E=(--batch-sizes 4 --e2e-steps 8 --e2e-log-every 2 --e2e-workers 1)
    EVAL=(--explainer tiny_unet --classifiers tiny_cnn --image-size 32 --num-classes 4 --batch-size 2 --rounds 1)
    COMPILE=(--batch-sizes 4 --compile-backend eager)  # dynamo's tracing without code generation: the plumbing only
    CLASSES=(--classifiers tiny_cnn --num-classes 4,40 --batch-sizes 4)
    MIN_STEP=5 MIN_E2E=5 MIN_EVAL=5 MIN_COMPILE=5 MIN_CLASSES=5 MIN_RESUME=5
else
    MODELS=(--explainer deeplabv3_resnet50 --classifiers resnet50,vgg16 --image-size 224 --num-classes 20)
    STEP=(--batch-sizes 16,32,64 --warmup 5 --iters 10 --rounds 3)
    E2E=(--batch-sizes 32 --e2e-steps 60 --e2e-log-every 10)
    EVAL=(--explainer deeplabv3_resnet50 --classifiers vgg16,resnet50 --image-size 224 --num-classes 20 --batch-size 16
          --rounds 3)
    COMPILE=(--batch-sizes 32 --warmup 3 --iters 10 --rounds 3)
    # head-resolution class maps, n from the upsampled head max (docs/method.md#head-resolution)
    CLASSES=(--classifiers resnet50 --num-classes 20,1000 --batch-sizes 32 --non-target-max head
             --warmup 3 --iters 5 --rounds 3)
    MIN_STEP=60 MIN_E2E=60 MIN_EVAL=20 MIN_COMPILE=120 MIN_CLASSES=40 MIN_RESUME=30
fi
BENCH=("$PY" benchmarks/bench_train_step.py --device "$DEVICE" --channels-last "${MODELS[@]}")
E2E_WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_e2e.XXXXXX")"  # shards, checkpoints: large, not results
trap 'rm -rf "$E2E_WORK"' EXIT

stage checkpoint_resume "$MIN_RESUME" "$PY" benchmarks/checkpoint_resume_check.py --device "$DEVICE" \
    --work "$E2E_WORK/resume" --out "$OUT/checkpoint_resume.json"
stage step_eager "$MIN_STEP" "${BENCH[@]}" "${STEP[@]}" --out "$OUT/step_eager.json"
stage step_classes "$MIN_CLASSES" "${BENCH[@]}" "${STEP[@]}" "${CLASSES[@]}" --modes ours --out "$OUT/step_classes.json"
stage e2e "$MIN_E2E" "${BENCH[@]}" "${STEP[@]}" "${E2E[@]}" --modes ours --e2e --e2e-dir "$E2E_WORK" \
    --out "$OUT/e2e.json"
stage eval_timing "$MIN_EVAL" "$PY" benchmarks/bench_eval_timing.py --device "$DEVICE" "${EVAL[@]}" \
    --out "$OUT/eval_timing.json"
stage step_compiled "$MIN_COMPILE" "${BENCH[@]}" "${STEP[@]}" "${COMPILE[@]}" --modes ours --compile \
    --out "$OUT/step_compiled.json"

"$PY" benchmarks/gpu_check_summary.py "$OUT" | tee -a "$LOG"
say "done in $((SECONDS - START))s: $OUT"
