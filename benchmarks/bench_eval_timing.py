"""Per-image time of the Explainer (one forward pass: the masks of all classes) against Grad-CAM (one backward pass
per class) on the same classifier, images and device, measured in one run: evaluate.py's timing convention (device
synchronised around each call, one untimed warm-up call each, fp32, autograd only where the method needs it), with
every class wanted, as in the paper's timing table.

  python benchmarks/bench_eval_timing.py --device cuda                      # DeepLabV3-R50 + VGG-16/ResNet-50, 224 px
  python benchmarks/bench_eval_timing.py --device cpu --explainer tiny_unet --classifiers tiny_cnn --image-size 32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # _bench_result, also when imported by a test

from _bench_result import provenance  # noqa: E402

from explainer.atomic import write_json_atomic  # noqa: E402
from explainer.config import EvalConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--explainer", default="deeplabv3_resnet50")
    parser.add_argument("--classifiers", default="vgg16,resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per method; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--out", default=".bench/eval_timing.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.classifiers = [c for c in args.classifiers.split(",") if c]
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(method, images: torch.Tensor, wanted: torch.Tensor, rounds: int, device: torch.device) -> list[float]:
    method(images[:1], wanted[:1])  # warm-up: cuDNN autotuning, allocator, lazy initialisation
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        with torch.set_grad_enabled(method.needs_grad):
            maps = method(images, wanted)
        sync(device)
        times.append(time.perf_counter() - start)
        assert maps.shape == (*wanted.shape, *images.shape[-2:]), maps.shape
    return times


def run(args: argparse.Namespace) -> dict:
    from explainer.baselines import build_baseline
    from explainer.evaluate import MaskNetwork
    from explainer.models import build_classifier, build_explainer, freeze

    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    wanted = torch.ones(args.batch_size, args.num_classes, dtype=torch.bool, device=device)  # every class
    explainer = MaskNetwork("explainer", build_explainer(args.explainer, args.num_classes).to(device))
    rows = []
    for arch in args.classifiers:
        classifier = freeze(build_classifier(arch, args.num_classes).to(device))
        methods = {"explainer": explainer, "gradcam": build_baseline("gradcam", classifier, EvalConfig())}
        row = {"classifier": arch, "explainer": args.explainer, "batch_size": args.batch_size,
               "image_size": args.image_size, "num_classes": args.num_classes}
        for name, method in methods.items():
            times = time_method(method, images, wanted, args.rounds, device)
            row[f"{name}_ms_per_image"] = 1000 * statistics.median(times) / args.batch_size
        row["gradcam_over_explainer"] = row["gradcam_ms_per_image"] / row["explainer_ms_per_image"]
        rows.append(row)
        print(f"{arch:<10} explainer {row['explainer_ms_per_image']:.2f} ms/image, Grad-CAM "
              f"{row['gradcam_ms_per_image']:.2f} ms/image ({args.num_classes} classes) -> "
              f"x{row['gradcam_over_explainer']:.1f}", flush=True)
        del classifier, methods
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": name, "torch": torch.__version__, **provenance(args), "results": rows}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
