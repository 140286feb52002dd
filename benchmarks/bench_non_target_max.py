"""How far loss.non_target_max=head is from exact (docs/method.md#head-resolution), and what each costs.

n, the non-target mask, is sigmoid of the max over the absent classes of the full-resolution logits. `exact` takes that
max on the upsampled logits (streamed over class slices); `head` upsamples the max of the head-resolution logits.
Bilinear upsampling is a convex combination of 4 head pixels, so head >= exact everywhere, with equality wherever one
class leads at all 4 of them. This script measures |n_head - n_exact| (in [0, 1], mask units), the share of pixels
where they differ, the loss terms of n (tv_n, area_n) and the total loss of one step, on three kinds of logits:

  random   i.i.d. N(0, 1) head logits: no spatial smoothness at all (the worst case)
  smooth   N(0, 1) logits at 1/4 of the head's resolution, upsampled to it (the blobs a trained head emits)
  untrained  a freshly built --explainer on noise images (the logits a run starts from)

  python benchmarks/bench_non_target_max.py --num-classes 20,1000 --image-size 224 --batch-size 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # _bench_result, also when imported by a test

from _bench_result import write_result  # noqa: E402

from explainer.config import LossConfig  # noqa: E402
from explainer.losses import area, split_classes, total_variation  # noqa: E402
from explainer.models import build_explainer  # noqa: E402


def labels_for(batch: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    """1 to 3 ground-truth classes per image, as bench_train_step.py draws them."""
    labels = torch.zeros(batch, classes)
    for i in range(batch):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        labels[i, torch.randperm(classes, generator=gen)[:k]] = 1.0
    return labels


def head_logits(kind: str, args: argparse.Namespace, classes: int, gen: torch.Generator) -> torch.Tensor:
    h = args.image_size // 8
    if kind == "random":
        return torch.randn(args.batch_size, classes, h, h, generator=gen)
    if kind == "smooth":
        coarse = torch.randn(args.batch_size, classes, max(2, h // 4), max(2, h // 4), generator=gen)
        return F.interpolate(coarse, size=(h, h), mode="bilinear", align_corners=False)
    torch.manual_seed(args.seed)
    net = build_explainer(args.explainer, classes).eval()
    with torch.no_grad():
        return net(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen)).logits


def compare(logits: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    splits = {}
    for mode in ("exact", "head"):
        start = time.perf_counter()
        splits[mode] = split_classes(logits, labels, logits=True, size=size, non_target=mode)
        out[f"{mode}_seconds"] = time.perf_counter() - start
    diff = splits["head"].n - splits["exact"].n
    out.update(min_diff=float(diff.min()), max_diff=float(diff.max()), mean_diff=float(diff.mean()),
               share_differing=float((diff.abs() > 1e-6).float().mean()))
    cfg = LossConfig()
    for mode, split in splits.items():
        out[f"tv_n_{mode}"] = float(total_variation(split.n).mean())
        out[f"area_n_{mode}"] = float(area(split.n).mean())
    # the part of the total loss n contributes (the rest of the step is the same numbers in both modes)
    out["loss_diff"] = cfg.lambda_tv * (out["tv_n_head"] - out["tv_n_exact"]) \
        + cfg.w_n * (out["area_n_head"] - out["area_n_exact"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", default="20,1000")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--explainer", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--kinds", default="random,smooth,untrained")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".bench/non_target_max.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for classes in [int(c) for c in args.num_classes.split(",")]:
        for kind in args.kinds.split(","):
            gen = torch.Generator().manual_seed(args.seed)
            labels = labels_for(args.batch_size, classes, gen)
            logits = head_logits(kind, args, classes, gen)
            row = {"num_classes": classes, "kind": kind, "head_shape": list(logits.shape[-2:]),
                   **compare(logits, labels, (args.image_size, args.image_size))}
            rows.append(row)
            print(f"C={classes:5d} {kind:9s} head {row['head_shape']}: n_head - n_exact in [{row['min_diff']:.1e}, "
                  f"{row['max_diff']:.3f}], mean {row['mean_diff']:.4f}, {100 * row['share_differing']:.1f}% of "
                  f"pixels; tv_n {row['tv_n_exact']:.4f} -> {row['tv_n_head']:.4f}, area_n {row['area_n_exact']:.4f}"
                  f" -> {row['area_n_head']:.4f}, loss {row['loss_diff']:+.4f}; forward {row['exact_seconds']:.3f} s"
                  f" vs {row['head_seconds']:.3f} s", flush=True)
    write_result(args.out, args, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
