#!/usr/bin/env bash
# Runs every command of README.md, as written, on a fresh clone: `bash .ci/readme_commands.sh` (about 30 minutes on
# 2 CPU cores; not part of .ci/run). Where a README command needs what a CPU machine without internet lacks, the
# stand-in is said next to it:
#   - VOC-2007 / COCO-2014 / photos: small trees in the official layouts, built as the tests build them (tests/);
#   - ImageNet weights: randomly initialised state dicts at the configured local paths (weights/, the torch cache);
#   - paper-size runs: the same command with small-run overrides appended ($SMALL: 64 px, 2 steps);
#   - SLURM: the local controller (launch/local_slurm.sh, as root); partition `debug` and no GPUs instead of `gpu`;
#     the 24-run sweep is printed with --dry-run and a 2-run copy of it is submitted for real.
# The Testing section's commands are not repeated: `make test` and `.ci/run` are CI itself, and this is the script.
# Each command is echoed with a `[readme]` prefix; the first failure stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv
export PATH="$PWD/.venv/bin:$PATH" WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=2
DATA=$(mktemp -d /tmp/readme_data.XXXXXX)  # stands for /data
export TORCH_HOME="$DATA/torch"
trap 'echo "[readme] data and stand-ins kept in $DATA"' EXIT
SMALL=(data.image_size=64 data.batch_size=2 data.num_workers=0 data.shuffle_buffer=4 train.max_steps=2
       train.val_every_steps=2 train.mixed_precision=no train.channels_last=false train.sync_batchnorm=false)
count=0  # READMECMD_FROM=N reruns from the N-th command on (the earlier ones' outputs must be there)
run() {
    count=$((count + 1))
    if ((count < ${READMECMD_FROM:-1})); then echo "[readme] skipped ($count): $*"; return; fi
    echo "[readme] ($count) $*"; "$@"
}
t0=$SECONDS

# --- stand-ins ------------------------------------------------------------------------------------------------------
python - "$DATA" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, "tests")
from _data_helpers import make_coco_tree, make_voc_tree
from _imagenet_tree import make_imagenet_tree

data = Path(sys.argv[1])
make_voc_tree(data)
make_coco_tree(data / "coco")
make_imagenet_tree(data / "imagenet", "ilsvrc")  # 1000 wnids, 3 classes with images, every ILSVRC quirk
rng = np.random.default_rng(0)
def image(path, size=(48, 40), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
mine = data / "mine"
for i in range(1, 13):
    image(mine / "photos" / f"{i:03d}.jpg")
Image.fromarray((rng.random((40, 48)) > 0.5).astype(np.uint8) * 255).save(mine / "masks_001.png")
(mine / "masks").mkdir()
(mine / "masks_001.png").rename(mine / "masks" / "001.png")
rows = ["path,labels,mask,split", "photos/001.jpg,cat,masks/001.png,train", "photos/002.jpg,cat|dog,,test",
        'photos/003.jpg,"[""dog""]",,']
rows += [f"photos/{i:03d}.jpg,{'cat' if i % 2 else 'dog'},," + ("train" if i < 9 else "test" if i < 11 else "val")
         for i in range(4, 13)]
(mine / "labels.csv").write_text("\n".join(rows) + "\n")
for i in range(12):
    image(data / "pets" / ("cat" if i % 2 else "dog") / f"{i:03d}.{'png' if i % 3 == 0 else 'jpg'}")
photos = data / "photos"
for i in range(1, 9):
    image(photos / f"{i:03d}.jpg")
names = [f"class_{i:04d}" for i in range(1000)]
names[0], names[1] = "cat", "dog"
(photos / "classes.txt").write_text("\n".join(names) + "\n")
(photos / "labels.csv").write_text("path,labels\n" + "".join(f"{i:03d}.jpg,{'cat' if i % 2 else 'dog'}\n"
                                                             for i in range(1, 9)))
for name in ("more/a.jpg", "more/b.jpg", "one.png"):
    image(data / "explain" / name)
# ImageNet weights at the presets' local paths and in the torch cache (random: the shapes are what is checked)
Path("weights").mkdir(exist_ok=True)
torch.save(torchvision.models.vgg16().state_dict(), "weights/vgg16-397923af.pth")
torch.save(torchvision.models.resnet50().state_dict(), "weights/resnet50-0676ba61.pth")
torch.save(torchvision.models.resnet50().state_dict(), "weights/resnet50-11ad3fa6.pth")
cache = data / "torch" / "hub" / "checkpoints"
cache.mkdir(parents=True)
torch.save(torchvision.models.resnet50().state_dict(), cache / "resnet50-11ad3fa6.pth")
torch.save(torchvision.models.resnet18(num_classes=20).state_dict(), data / "my_resnet18.pt")
code = data / "code"
code.mkdir()
(code / "my_models.py").write_text(
    "import torchvision\n\n\ndef build(num_classes: int = 1000):\n"
    "    return torchvision.models.resnet18(num_classes=num_classes)\n")
torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), data / "state_dict.pt")
torch.jit.save(torch.jit.script(torchvision.models.resnet18(num_classes=20).eval()), data / "model.pt")
torch.save(torchvision.models.resnet18(num_classes=20).state_dict(), data / "w.pt")
EOF

# --- quick start ----------------------------------------------------------------------------------------------------
run make demo

# --- your data ------------------------------------------------------------------------------------------------------
run explainer make-shards voc --root "$DATA/VOCdevkit/VOC2007" --out shards/voc2007
run explainer make-shards coco --root "$DATA/coco" --out shards/coco2014 --seg-subset 1000
run explainer make-shards synthetic --out shards/synthetic --num-classes 6 --image-size 64
run explainer make-shards folder --root "$DATA/mine" --labels "$DATA/mine/labels.csv" --out shards/mine
run explainer make-shards folder --root "$DATA/pets" --out shards/pets --split-fractions train=0.8,val=0.1,test=0.1
run explainer make-shards imagenet --root "$DATA/imagenet" --out shards/imagenet
# (no SLURM here: the job array's script is printed, the parts run as local jobs)
run explainer submit --make-shards "imagenet --root $DATA/imagenet --out shards/imagenet" --parts 8 --partition cpu \
    --dry-run
run explainer submit --make-shards "imagenet --root $DATA/imagenet --out shards/imagenet_parts" --parts 2 \
    --cluster local
# torchrun --nproc_per_node 8 on a CPU machine: one process
run explainer train --config configs/imagenet_resnet50.yaml "${SMALL[@]}"

# --- train (the classifier, then the Explainer), with the small-run overrides -----------------------------------------
run explainer train-classifier --config configs/classifier/voc_vgg16.yaml "${SMALL[@]}"
run explainer train --config configs/voc_vgg16.yaml "${SMALL[@]}"
run explainer train --config configs/voc_vgg16.yaml loss.kind=rtis train.output_dir=runs/rtis_voc_vgg16 "${SMALL[@]}"
run explainer train-classifier --config configs/classifier/coco_resnet.yaml "${SMALL[@]}"
run explainer train --config configs/coco_resnet.yaml optim.lr=2e-5 loss.lambda_e=3 train.output_dir=runs/x "${SMALL[@]}"
run explainer train --config configs/coco_resnet.yaml --resume auto "${SMALL[@]}" train.output_dir=runs/x \
    train.max_steps=4
run torchrun --nproc_per_node 2 explainer/train.py --config configs/voc_vgg16.yaml "${SMALL[@]}" \
    train.output_dir=runs/torchrun data.batch_size=4  # global 4: 2 per process (BatchNorm; sync_batchnorm is off)

# --- your classifier: each source in the README, on the VOC shards (20 classes) ----------------------------------------
voc=(--config configs/voc_vgg16.yaml "${SMALL[@]}")
run explainer make-shards folder --root "$DATA/photos" --labels "$DATA/photos/labels.csv" \
    --classes-file "$DATA/photos/classes.txt" --out shards/mine1000  # 1000 classes, for the ImageNet weights
run explainer train "${voc[@]}" classifier.torchvision=resnet18 classifier.checkpoint="$DATA/my_resnet18.pt" \
    train.output_dir=runs/source_torchvision
run explainer train "${voc[@]}" classifier.torchvision=resnet50 classifier.torchvision_weights=IMAGENET1K_V2 \
    classifier.checkpoint=null data.manifest=shards/mine1000/manifest.json loss.classification=ce \
    train.output_dir=runs/source_imagenet
PYTHONPATH="$DATA/code" run explainer train "${voc[@]}" classifier.factory=my_models:build \
    classifier.factory_kwargs="{num_classes: 20}" classifier.checkpoint="$DATA/w.pt" train.output_dir=runs/source_factory
run explainer train "${voc[@]}" classifier.torchscript="$DATA/model.pt" classifier.checkpoint=null \
    classifier.mean=[0.5,0.5,0.5] classifier.std=[0.5,0.5,0.5] train.output_dir=runs/source_torchscript

# --- evaluate, explain ------------------------------------------------------------------------------------------------
run explainer evaluate --config configs/voc_vgg16.yaml --checkpoint runs/explainer_voc_vgg16/explainer.pt \
    --methods explainer,gradcam,rise,ep,rtis --rtis-checkpoint runs/rtis_voc_vgg16/explainer.pt --max-images 2 \
    data.image_size=64 data.num_workers=0 eval.ep_iterations=20 eval.rise_masks=200  # EP: 800 steps per class on CPU
run torchrun --nproc_per_node 2 -m explainer.evaluate --config configs/voc_vgg16.yaml \
    --checkpoint runs/explainer_voc_vgg16/explainer.pt --methods explainer,gradcam --max-images 4 \
    data.image_size=64 data.num_workers=0
run explainer explain --checkpoint runs/demo/explainer/explainer.pt "$DATA/photos/" "$DATA"/explain/more/*.jpg \
    "$DATA/explain/one.png" --out "$DATA/explained/"
run explainer explain --checkpoint runs/demo/explainer/explainer.pt "$DATA/explain/one.png" \
    --out "$DATA/explained_ts/" --export torchscript

# --- a 1000-class classifier of your own (the README's four steps) ------------------------------------------------
PYTHONPATH="$DATA/code" run explainer train --config configs/voc_resnet50.yaml \
    data.manifest=shards/mine1000/manifest.json data.resize=center_crop loss.classification=ce \
    classifier.factory=my_models:build classifier.factory_kwargs="{num_classes: 1000}" \
    classifier.checkpoint="$DATA/state_dict.pt" classifier.mean=[0.5,0.5,0.5] classifier.std=[0.5,0.5,0.5] \
    train.output_dir=runs/mine "${SMALL[@]}"
PYTHONPATH="$DATA/code" run explainer evaluate --config runs/mine/config.yaml \
    --checkpoint runs/mine/explainer.pt --max-images 500 data.num_workers=0
PYTHONPATH="$DATA/code" run explainer explain --checkpoint runs/mine/explainer.pt "$DATA/photos/" \
    --out "$DATA/explained_mine/"

# --- SLURM and sweeps -----------------------------------------------------------------------------------------------
export NCCL_SOCKET_IFNAME=eth0 NCCL_IB_DISABLE=1
run explainer submit --config configs/coco_resnet.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 720 --dry-run
run explainer submit --config configs/synthetic.yaml --cluster local --tasks-per-node 2 "${SMALL[@]}" \
    train.output_dir=runs/local_submit
run explainer submit --sweep configs/sweeps/lambdas.yaml --gpus-per-node 1 --partition gpu --time 720 \
    --array-parallelism 8 data.manifest=shards/coco2014/manifest.json \
    classifier.checkpoint=runs/classifier_coco_resnet/classifier.pt --dry-run
if [[ $(id -u) == 0 ]]; then
    started=0
    sinfo >/dev/null 2>&1 || { bash launch/local_slurm.sh start; started=1; }
    sed -e 's/^num_samples: .*/num_samples: 2/' -e "s#^base_config: .*#base_config: $PWD/configs/voc_resnet50.yaml#" \
        configs/sweeps/lambdas.yaml >"$DATA/lambdas2.yaml"
    run explainer submit --sweep "$DATA/lambdas2.yaml" --partition debug --time 20 --array-parallelism 2 \
        data.manifest=shards/coco2014/manifest.json classifier.checkpoint=runs/classifier_coco_resnet/classifier.pt \
        "${SMALL[@]}" tracking.wandb_mode=offline >"$DATA/sweep.out"
    cat "$DATA/sweep.out"; out=$(<"$DATA/sweep.out")
    job=$(grep -o 'job array [0-9]*' <<<"$out" | grep -o '[0-9]*')
    while squeue -h -j "$job" 2>/dev/null | grep -q .; do sleep 5; done
    sweep_dir=$(grep -o 'runs/sweeps/[^ ]*/sweep.json' <<<"$out" | head -1 | xargs dirname)
    run explainer sweep-report "$sweep_dir"
    ((started == 0)) || bash launch/local_slurm.sh stop
fi
echo "[readme] every README command ran in $((SECONDS - t0)) s"
