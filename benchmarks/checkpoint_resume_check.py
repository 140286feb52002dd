"""Save one training checkpoint and resume from it with the real trainer, on the device the machine has (issue 26 §1).

On a GPU torch keeps Adam's `step` on the CPU while the weights and moments are on the GPU: the finite check before
every save must work with both, which CPU tests cannot show. This runs explainer/train.py for 2 steps (a checkpoint
after each, Adam), then `--resume auto` to step 4, and writes a JSON record: the checkpoints written, the step
resumed from, the device of Adam's tensors in the checkpoint, the final step count and `ok`.

  python benchmarks/checkpoint_resume_check.py --device cuda --work /tmp/resume --out results/checkpoint_resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return proc


def check(device: str, work: Path) -> dict:
    import torch

    from explainer.models import build_classifier, freeze
    from explainer.models.model_files import save_model_file

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "WANDB_MODE": "disabled"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    shards = work / "shards"
    _run(["launch/make_shards.py", "synthetic", "--out", str(shards), "--num-classes", "4", "--image-size", "32",
          "--counts", "train=64,val=16,test=16", "--workers", "1", "--no-progress"], env)
    classes = json.loads((shards / "manifest.json").read_text())["classes"]
    classifier = save_model_file(work / "classifier.pt", freeze(build_classifier("tiny_cnn", 4)), kind="classifier",
                                 arch="tiny_cnn", num_classes=4, classes=classes, image_size=32)
    out = work / "run"
    common = ["explainer/train.py", "--config", "configs/synthetic.yaml", f"data.manifest={shards / 'manifest.json'}",
              "data.image_size=32", "data.batch_size=8", "data.num_workers=0", f"classifier.checkpoint={classifier}",
              "explainer.arch=tiny_unet", "optim.optimizer=adam", "train.checkpoint_every_steps=1",
              "train.val_every_steps=2", "train.val_max_batches=1", "tracking.wandb_mode=disabled",
              f"train.output_dir={out}"]
    start = time.perf_counter()
    _run([*common, "train.max_steps=2"], env)
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    resumed = _run([*common, "train.max_steps=4", "--resume", "auto"], env)
    found = re.search(r"resumed from \S+step_(\d{8}) \(step (\d+),", resumed.stdout + resumed.stderr)
    steps = json.loads((out / "summary.json").read_text())["steps"]
    optimizer = torch.load(out / "checkpoints" / "step_00000004" / "optimizer.bin", weights_only=True,
                           map_location="cpu")
    return {"device": device, "saved": saved, "resumed_from_step": int(found.group(2)) if found else None,
            "final_steps": steps, "adam_state_keys": sorted(optimizer["state"][0]),
            "seconds": round(time.perf_counter() - start, 1),
            "ok": saved == ["step_00000001", "step_00000002"] and found is not None and int(found.group(2)) == 2
            and steps == 4}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--work", required=True, help="shards and the run folder go here (removed by the caller)")
    parser.add_argument("--out", required=True, help="the JSON record")
    args = parser.parse_args(argv)
    try:
        record = check(args.device, Path(args.work))
    except Exception as exc:  # noqa: BLE001 - the record says what failed; the exit status says it failed
        record = {"device": args.device, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
