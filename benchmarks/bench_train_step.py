"""Images/s of the Explainer training step: ours vs the paper code's structure, same models and data, one run.

Modes (each = forward + loss + backward + Adam step on the Explainer):
  reference  fp32, two classifier passes, per-image Python loops in mask aggregation and the area bound
  ours_fp32  one classifier pass on [x*m; x*(1-m)], vectorised loss, fp32 (the structural gain alone)
  ours       the same under bf16 autocast (+ channels_last / torch.compile when asked): what train.py runs
On CUDA it also reports MFU (FLOPs of one step from torch.utils.flop_counter over the device's dense bf16 peak) and
peak memory per batch size.

  python benchmarks/bench_train_step.py --device cpu                       # small models, < 2 min on a CPU
  python benchmarks/bench_train_step.py --device cuda --channels-last      # paper models, 224 px, bs 16/32/64
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explainer.atomic import write_json_atomic
from explainer.config import LossConfig  # noqa: E402
from explainer.models import build_classifier, build_explainer, freeze  # noqa: E402
from explainer.step import explainer_forward_loss, reference_forward_loss  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets; first match wins.
BF16_PEAK_TFLOPS = [
    ("h200", 989.4),
    ("gh200", 989.4),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("h800", 989.4),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.05),
    ("l40", 181.05),
    ("l4", 121.0),
]

DEFAULTS = {
    "cpu": {"explainer": "deeplabv3_mobilenet_v3_large", "classifiers": "resnet18", "image_size": 64,
            "batch_sizes": "8", "warmup": 1, "iters": 1, "rounds": 3},
    "cuda": {"explainer": "deeplabv3_resnet50", "classifiers": "resnet50,vgg16", "image_size": 224,
             "batch_sizes": "16,32,64", "warmup": 5, "iters": 10, "rounds": 3},
}
MODES = ("reference", "ours_fp32", "ours")


def peak_tflops(device_name: str) -> float | None:
    name = device_name.lower()
    for key, value in BF16_PEAK_TFLOPS:
        if key in name:
            return value
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--explainer", help="explainer arch (default: per device)")
    parser.add_argument("--classifiers", help="comma-separated classifier archs (default: per device)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-sizes", help="comma-separated, e.g. 16,32,64")
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--iters", type=int, help="timed steps per round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds; the median is reported")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--precision", choices=["bf16", "fp16"], default="bf16", help="autocast dtype of 'ours'")
    parser.add_argument("--channels-last", action="store_true", help="channels_last models/images for 'ours'")
    parser.add_argument("--compile", action="store_true", help="torch.compile explainer and classifier for 'ours'")
    parser.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                        help="TF32 for the fp32 modes on CUDA (default: PyTorch's defaults, as the paper code ran)")
    parser.add_argument("--peak-tflops", type=float, help="override the device's dense bf16 peak for MFU")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads on CPU (default 1: steady numbers on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".bench/train_step.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.classifiers = [c for c in args.classifiers.split(",") if c]
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    return args


def make_batch(batch_size: int, num_classes: int, size: int, device: torch.device, seed: int):
    """Normalised-image-like noise and multi-hot labels with 1-3 classes per image (VOC averages ~1.5)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=gen)
    labels = torch.zeros(batch_size, num_classes)
    for i in range(batch_size):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        labels[i, torch.randperm(num_classes, generator=gen)[:k]] = 1.0
    return images.to(device), labels.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One mode's step over shared models; `step()` does forward, loss, backward and the Adam step."""

    def __init__(self, mode, explainer, classifier, images, labels, args, device):
        self.mode = mode
        self.cfg = LossConfig()
        self.images, self.labels = images, labels
        self.run_explainer, self.run_classifier = explainer, classifier
        self.channels_last = mode == "ours" and args.channels_last
        self.autocast = None
        if mode == "ours":
            dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
            self.autocast = lambda: torch.autocast(device.type, dtype=dtype)
            if self.channels_last:
                self.images = images.contiguous(memory_format=torch.channels_last)
        # each mode owns its optimiser (Adam state) so modes can be interleaved
        self.optimizer = torch.optim.Adam(explainer.parameters(), lr=1e-5)

    def prepare(self) -> None:
        """Put the shared models in this mode's memory format (outside the timed region)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for model in (self.run_explainer, self.run_classifier):
            model = getattr(model, "_orig_mod", model)
            if not _has_format(model, fmt):
                model.to(memory_format=fmt)

    def loss(self):
        if self.mode == "reference":
            return reference_forward_loss(self.run_explainer, self.run_classifier, self.images, self.labels, self.cfg)
        ctx = self.autocast() if self.autocast else None
        return explainer_forward_loss(self.run_explainer, self.run_classifier, self.images, self.labels, self.cfg, ctx)

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.loss()
        out.loss.backward()
        self.optimizer.step()
        return out.loss.detach()

    def release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()


def _has_format(model: torch.nn.Module, fmt: torch.memory_format) -> bool:
    """Whether the first 4-d weight already has `fmt` (switching formats copies every weight: do it only once)."""
    for param in model.parameters():
        if param.dim() == 4:
            return param.is_contiguous(memory_format=fmt)
    return True


def count_flops(runner: Runner) -> int:
    """FLOPs of one forward+backward (matmul/conv dominated) counted on the eager modules by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    runner.prepare()
    counter = FlopCounterMode(display=False)
    with counter:
        runner.optimizer.zero_grad(set_to_none=True)
        runner.loss().loss.backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def time_steps(runner: Runner, iters: int, device: torch.device) -> tuple[float, torch.Tensor]:
    runner.prepare()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        loss = runner.step()
    sync(device)
    return time.perf_counter() - start, loss


def bench(runners: dict[str, Runner], warmup: int, iters: int, rounds: int, device: torch.device) -> dict:
    """Warm every mode up and (CUDA) measure its peak memory alone, other modes' Adam states released; then time
    the modes interleaved round by round and keep the median round, so background load hits every mode alike."""
    out: dict[str, dict] = {}
    for mode, runner in runners.items():
        out[mode] = {}
        try:
            runner.prepare()
            for _ in range(warmup):  # cudnn autotuning, torch.compile, Adam state
                runner.step()
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                runner.step()
                sync(device)
                out[mode]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.OutOfMemoryError:
            out[mode] = {"error": "out of memory"}
        if device.type == "cuda":
            runner.release()
            torch.cuda.empty_cache()
    live = [mode for mode in runners if "error" not in out[mode]]
    if device.type == "cuda":
        for mode in live:  # rebuild the Adam states outside the timed region
            runners[mode].prepare()
            runners[mode].step()
    times: dict[str, list[float]] = {mode: [] for mode in live}
    for _ in range(rounds):
        for mode in live:
            elapsed, loss = time_steps(runners[mode], iters, device)
            times[mode].append(elapsed)
            out[mode]["final_loss"] = float(loss)
    for mode in live:
        elapsed = statistics.median(times[mode])
        batch = runners[mode].images.shape[0]
        out[mode].update(step_ms=1000 * elapsed / iters, images_per_s=batch * iters / elapsed,
                         round_images_per_s=[round(batch * iters / t, 2) for t in times[mode]])
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        # fp32 rows: PyTorch's defaults (cuDNN convolutions may use TF32, matmuls do not) unless --tf32 says otherwise
        if args.tf32 != "default":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.benchmark = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    peak = args.peak_tflops or (peak_tflops(device_name) if device.type == "cuda" else None)

    results = []
    for classifier_arch in args.classifiers:
        explainer = build_explainer(args.explainer, args.num_classes).to(device).train()
        classifier = freeze(build_classifier(classifier_arch, args.num_classes).to(device))
        compiled: dict[str, torch.nn.Module] = {}
        for batch_size in args.batch_sizes:
            images, labels = make_batch(batch_size, args.num_classes, args.image_size, device, args.seed)
            runners: dict[str, Runner] = {}
            flops = None
            for mode in args.modes:
                runner = Runner(mode, explainer, classifier, images, labels, args, device)
                if flops is None:
                    # the arithmetic of one step is the same in every mode (two half passes = one full pass):
                    # count it once, eagerly, and use it for every mode's achieved FLOP/s and MFU
                    with contextlib.suppress(torch.OutOfMemoryError):
                        flops = count_flops(runner)
                if mode == "ours" and args.compile:
                    if not compiled:
                        compiled["e"], compiled["c"] = torch.compile(explainer), torch.compile(classifier)
                    runner.run_explainer, runner.run_classifier = compiled["e"], compiled["c"]
                runners[mode] = runner
            measured = bench(runners, args.warmup, args.iters, args.rounds, device)
            for mode in args.modes:
                row = {"classifier": classifier_arch, "explainer": args.explainer, "batch_size": batch_size,
                       "image_size": args.image_size, "mode": mode, **measured[mode]}
                if "images_per_s" in row and flops:
                    row["flops_per_step"] = flops
                    row["achieved_tflops"] = flops * row["images_per_s"] / batch_size / 1e12
                    if peak:
                        row["mfu"] = row["achieved_tflops"] / peak
                results.append(row)
                print(format_row(row), flush=True)
            del runners
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del explainer, classifier, compiled

    speedups = []
    for row in results:
        if row["mode"] == "reference" or "images_per_s" not in row:
            continue
        ref = next((r for r in results if r["mode"] == "reference" and r["classifier"] == row["classifier"]
                    and r["batch_size"] == row["batch_size"] and "images_per_s" in r), None)
        if ref:
            speedups.append({"classifier": row["classifier"], "batch_size": row["batch_size"], "mode": row["mode"],
                             "speedup_vs_reference": row["images_per_s"] / ref["images_per_s"]})
    return {
        "device": device_name,
        "device_type": device.type,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: v for k, v in vars(args).items()},
        "results": results,
        "speedups": speedups,
    }


HEADER = (f"{'classifier':<12} {'bs':>4} {'mode':<10} {'img/s':>9} {'step ms':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'mem GiB':>8}")


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['classifier']:<12} {row['batch_size']:>4} {row['mode']:<10} {row['error']}"
    mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
    mem = f"{row['peak_mem_gib']:.2f}" if "peak_mem_gib" in row else "-"
    return (f"{row['classifier']:<12} {row['batch_size']:>4} {row['mode']:<10} {row['images_per_s']:>9.1f} "
            f"{row['step_ms']:>9.1f} {row['achieved_tflops']:>8.3f} {mfu:>6} {mem:>8}")


def write_json(report: dict, path: str) -> None:
    write_json_atomic(path, report)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"device={args.device} explainer={args.explainer} classifiers={args.classifiers} size={args.image_size} "
          f"batch_sizes={args.batch_sizes} precision(ours)={args.precision} channels_last={args.channels_last} "
          f"compile={args.compile}")
    print(HEADER)
    report = run(args)
    print("\nspeed-up vs reference:")
    for s in report["speedups"]:
        print(f"  {s['classifier']:<12} bs {s['batch_size']:>3} {s['mode']:<10} x{s['speedup_vs_reference']:.2f}")
    write_json(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
