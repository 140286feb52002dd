"""`make demo`: the whole method on the embedded synthetic dataset, on a CPU, with no downloads.

synthetic scenes -> WebDataset shards -> classifier -> Explainer -> evaluation against Grad-CAM and RISE
-> report + figures. Each stage runs the real command a user would type (printed before it runs), so the demo is
also a tour of the CLI. Stages resume: re-running continues from finished stages' checkpoints.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], log: Path) -> None:
    printable = " ".join(shlex.quote(a) for a in args)
    print(f"\n$ {printable}", flush=True)
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        proc = subprocess.run(args, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    print(f"  ({time.perf_counter() - start:.0f} s, log: {log})", flush=True)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        sys.exit(f"demo stage failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(tail))


def quality_checks(results: dict[str, Any]) -> list[tuple[bool, str]]:
    """The claims the demo must show (issue 4), as (passed, sentence) pairs, from evaluate's results.json."""
    checks = []
    f1 = results["classification"]["clean"]["f1"]
    checks.append((f1 >= 0.9, f"classifier F1 on the test split {f1:.3f} >= 0.9"))
    seg = results["segmentation"]
    ours = seg["explainer"]
    for base in ("gradcam", "rise"):
        if base in seg:
            checks.append((ours["iou"] > seg[base]["iou"],
                           f"explainer soft IoU {ours['iou']:.3f} > {base} {seg[base]['iou']:.3f}"))
            checks.append((ours["mae"] < seg[base]["mae"],
                           f"explainer MAE {ours['mae']:.3f} < {base} {seg[base]['mae']:.3f}"))
    table = results.get("class_specific", {}).get("explainer")
    if table:
        diag, off, worst = table["mean_diagonal"], table["mean_off_diagonal"], table["max_off_diagonal"]
        checks.append((diag > 3 * off, f"class-specific masking: mean diagonal {diag:.3f} > 3 x mean off-diagonal "
                                       f"{off:.3f} (worst off-diagonal {worst:.3f})"))
    return checks


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from explainer.cli_args import HelpFormatter

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder of the demo")
    parser.add_argument("--shards", default="shards/synthetic", help="where the synthetic shards go")
    parser.add_argument("--counts", default="train=600,val=150,test=150", help="synthetic split sizes")
    parser.add_argument("--classifier-epochs", type=int, default=6)
    parser.add_argument("--explainer-epochs", type=int, default=20)
    parser.add_argument("--eval-images", type=int, default=150)
    parser.add_argument("--fresh", action="store_true", help="retrain instead of resuming finished stages")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a claim of the demo does not hold")
    args = parser.parse_args(argv)

    py = sys.executable
    out, shards = Path(args.out), Path(args.shards)
    manifest = shards / "manifest.json"
    resume = [] if args.fresh else ["--resume", "auto"]
    started = time.perf_counter()

    print("== 1/4 synthetic scenes -> VOC layout -> WebDataset shards")
    _run([py, "launch/make_shards.py", "synthetic", "--out", str(shards), "--counts", args.counts,
          "--image-size", "64", "--num-classes", "6", "--seed", "0", "--resume", "--no-progress"],
         out / "logs" / "make_shards.log")
    print(json.dumps({k: v["total"] for k, v in json.loads(manifest.read_text())["splits"].items()}))

    print("\n== 2/4 the classifier to explain (Explanandum)")
    _run([py, "explainer/train_classifier.py", "--config", "configs/classifier/synthetic.yaml", *resume,
          f"data.manifest={manifest}", f"train.output_dir={out / 'classifier'}",
          f"train.epochs={args.classifier_epochs}"], out / "logs" / "classifier.log")
    classifier_summary = json.loads((out / "classifier" / "summary.json").read_text())
    print(f"  best val F1 {classifier_summary['best']['f1']:.3f} at step {classifier_summary['best_step']}")

    print("\n== 3/4 the Explainer")
    _run([py, "explainer/train.py", "--config", "configs/synthetic.yaml", *resume, f"data.manifest={manifest}",
          f"classifier.checkpoint={out / 'classifier' / 'classifier.pt'}", f"train.output_dir={out / 'explainer'}",
          f"train.epochs={args.explainer_epochs}"], out / "logs" / "explainer.log")
    explainer_summary = json.loads((out / "explainer" / "summary.json").read_text())
    best = explainer_summary["best"] or {}
    iou = best.get("mask_iou", float("nan"))
    print(f"  best val loss {explainer_summary['best_val_loss']:.4f}, mask IoU {iou:.3f}")

    print("\n== 4/4 evaluation: Explainer vs Grad-CAM vs RISE on the test split")
    _run([py, "-m", "explainer.evaluate", "--config", "configs/synthetic.yaml", f"data.manifest={manifest}",
          f"classifier.checkpoint={out / 'classifier' / 'classifier.pt'}",
          "--checkpoint", str(out / "explainer" / "explainer.pt"), "--methods", "explainer,gradcam,rise",
          "--max-images", str(args.eval_images), "--out", str(out / "eval"), "--no-progress"],
         out / "logs" / "evaluate.log")
    results = json.loads((out / "eval" / "results.json").read_text())
    print((out / "eval" / "report.md").read_text())

    checks = quality_checks(results)
    print("== what the demo shows")
    for passed, sentence in checks:
        print(f"  [{'ok' if passed else 'FAILED'}] {sentence}")
    print(f"\nrun folder: {out}  (figures: {out / 'eval'}, W&B offline runs: {out}/*/wandb)")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 1 if args.strict and not all(p for p, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
