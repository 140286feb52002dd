"""Images/s of the Explainer training step: ours vs the paper code's structure, same models and data, one run.

Modes (each = forward + loss + backward + Adam step on the Explainer):
  reference  fp32, two classifier passes, per-image Python loops in mask aggregation and the area bound
  ours_fp32  one classifier pass on [x*m; x*(1-m)], vectorised loss, fp32 (the structural gain alone)
  ours       the same under bf16 autocast (+ channels_last / torch.compile when asked): what train.py runs
On CUDA it also reports MFU (each mode's FLOPs per step from torch.utils.flop_counter over the device's dense peak
for the mode's precision: bf16/fp16 tensor cores for 'ours', TF32 for the fp32 modes when cuDNN may use it (PyTorch's
default; these models are convolution-bound), plain fp32 otherwise) and peak memory per batch size.

--e2e adds the end-to-end comparison: explainer/train.py's real loop (shard loader and its workers, uint8 batches
normalised on the device, the DDP wrapper when several processes run it, logging, the final validation and
checkpoint) on synthetic shards made at the benchmark's image size, against the bare 'ours' step with the same models,
batch size, precision, memory format and compile setting, measured in the same run. Trainer images/s: its logged
windows after the first (start-up, cuDNN autotuning, compilation).

  python benchmarks/bench_train_step.py --device cpu                       # small models, < 2 min on a CPU
  python benchmarks/bench_train_step.py --device cuda --channels-last      # paper models, 224 px, bs 16/32/64
  python benchmarks/bench_train_step.py --device cuda --channels-last --e2e --batch-sizes 32 --modes ours

--num-classes 20,100,1000 sweeps the class count (models rebuilt per count, in the order given) and reports each row's
step time and peak memory as ratios against the first count's row of the same mode and batch size
(docs/results.md#many-classes). Peak memory: the CUDA allocator's peak, or on CPU the process's peak resident set size
(VmHWM, reset before each mode's measured step, after returning freed heap memory to the OS).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # _bench_result, also when imported by a test

from _bench_result import provenance  # noqa: E402

from explainer.atomic import write_json_atomic  # noqa: E402
from explainer.config import LossConfig  # noqa: E402
from explainer.models import build_classifier, build_explainer, freeze  # noqa: E402
from explainer.step import explainer_forward_loss, reference_forward_loss  # noqa: E402

# Dense (no sparsity) peaks in TFLOP/s from NVIDIA's data sheets: bf16/fp16 tensor cores, TF32 tensor cores, plain
# fp32. First match wins.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("gh200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("h200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("h100 pcie", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("h100 nvl", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("h100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("h800", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("a100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("a800", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("l40s", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("l40", {"bf16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    ("l4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
]

DEFAULTS = {
    "cpu": {"explainer": "deeplabv3_mobilenet_v3_large", "classifiers": "resnet18", "image_size": 64,
            "batch_sizes": "8", "warmup": 1, "iters": 1, "rounds": 3, "e2e_steps": 12, "e2e_log_every": 4},
    "cuda": {"explainer": "deeplabv3_resnet50", "classifiers": "resnet50,vgg16", "image_size": 224,
             "batch_sizes": "16,32,64", "warmup": 5, "iters": 10, "rounds": 3, "e2e_steps": 60, "e2e_log_every": 10},
}
MODES = ("reference", "ours_fp32", "ours")
# Opt-in: 'ours' with the class-specific term (loss.w_class_specific=1, docs/method.md#class-specific-term), whose
# third block of the classifier call is what the synthetic preset pays per step.
EXTRA_MODES = ("ours_class_specific",)
OURS_MODES = ("ours", "ours_class_specific")


def peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """Dense peak of `device_name` for 'bf16' (also fp16), 'tf32' or 'fp32'; None for an unknown device."""
    name = device_name.lower()
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[precision]
    return None


def mode_precision(mode: str, args: argparse.Namespace) -> str:
    """The arithmetic a mode's convolutions run in (what its MFU is measured against)."""
    if mode in OURS_MODES:
        return "bf16"  # fp16 has the same tensor-core peak
    if args.device == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "fp32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--explainer", help="explainer arch (default: per device)")
    parser.add_argument("--classifiers", help="comma-separated classifier archs (default: per device)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-sizes", help="comma-separated, e.g. 16,32,64")
    parser.add_argument("--num-classes", default="20",
                        help="comma-separated class counts, e.g. 20,100,1000 (ratios against the first)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--iters", type=int, help="timed steps per round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds; the median is reported")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {MODES + EXTRA_MODES}")
    parser.add_argument("--precision", choices=["bf16", "fp16"], default="bf16", help="autocast dtype of 'ours'")
    parser.add_argument("--non-target-max", choices=["exact", "head"], default=LossConfig.non_target_max,
                        help="loss.non_target_max of the 'ours' modes (docs/method.md#head-resolution)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last models/images for 'ours'")
    parser.add_argument("--compile", action="store_true", help="torch.compile explainer and classifier for 'ours'")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (eager: dynamo's tracing only, for smoke tests)")
    parser.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                        help="TF32 for the fp32 modes on CUDA (default: PyTorch's defaults, as the paper code ran)")
    parser.add_argument("--peak-tflops", type=float, help="override the device's dense bf16 peak for MFU")
    parser.add_argument("--peak-tflops-fp32", type=float,
                        help="override the dense peak the fp32 modes are measured against (TF32 or fp32)")
    parser.add_argument("--e2e", action="store_true",
                        help="also time explainer/train.py's loop on synthetic shards against the bare 'ours' step")
    parser.add_argument("--e2e-steps", type=int, help="trainer optimiser steps (default: per device)")
    parser.add_argument("--e2e-log-every", type=int, help="trainer logging window in steps (default: per device)")
    parser.add_argument("--e2e-workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)),
                        help="trainer data.num_workers")
    parser.add_argument("--e2e-dir", default=".bench/e2e", help="synthetic shards and trainer runs go here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads on CPU (default 1: steady numbers on a shared machine)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, one more step per row under torch.profiler: its N costliest ops")
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
    try:
        args.num_classes = [int(c) for c in str(args.num_classes).split(",") if c]
    except ValueError:
        parser.error(f"--num-classes: comma-separated integers, got {args.num_classes!r}")
    if not args.num_classes or min(args.num_classes) < 1:
        parser.error(f"--num-classes: at least one class count, each >= 1, got {args.num_classes}")
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES + EXTRA_MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES + EXTRA_MODES}")
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
        self.cfg = LossConfig(w_class_specific=1.0 if mode == "ours_class_specific" else 0.0,
                              non_target_max=args.non_target_max)
        self.images, self.labels = images, labels
        self.run_explainer, self.run_classifier = explainer, classifier
        self.channels_last = mode in OURS_MODES and args.channels_last
        self.autocast = None
        if mode in OURS_MODES:
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


def reset_cpu_peak() -> bool:
    """Start a new CPU peak-memory window: free heap memory goes back to the OS (glibc malloc_trim), then the
    process's peak RSS is reset to its current RSS (Linux clear_refs 5). False where either is unavailable."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return False
    return True


def cpu_peak_gib() -> float | None:
    """Peak resident set size of this process since the last reset_cpu_peak() (VmHWM), in GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def bench(runners: dict[str, Runner], warmup: int, iters: int, rounds: int, device: torch.device) -> dict:
    """Warm every mode up and measure its peak memory alone (CUDA: other modes' Adam states released; CPU: the
    process's peak RSS during one step); then time the modes interleaved round by round and keep the median round,
    so background load hits every mode alike."""
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
            elif reset_cpu_peak():
                runner.step()
                peak = cpu_peak_gib()
                if peak is not None:
                    out[mode]["peak_mem_gib"] = peak
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


def profile_step(runner: Runner, top: int, device: torch.device) -> list[dict]:
    """The `top` ops of one step by self time (CPU time; CUDA time on a GPU), printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runner.prepare()
    with profile(activities=activities) as prof:
        runner.step()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)[:top]
    rows = [{"op": e.key, "calls": e.count, "self_ms": getattr(e, attr) / 1000} for e in events]
    print(f"  profile of one {runner.mode} step ({attr}):")
    for r in rows:
        print(f"    {r['self_ms']:>9.1f} ms  {r['calls']:>4}x  {r['op']}")
    return rows


def compile_fresh(module: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """A new static-shape compilation: reusing one compiled module across batch sizes makes dynamo recompile with
    dynamic shapes (slower kernels) after the second size, so each batch size starts from a reset."""
    torch._dynamo.reset()
    return torch.compile(module, dynamic=False, backend=backend)


def measure_step_rows(args: argparse.Namespace, device: torch.device, classifier_arch: str, batch_size: int,
                      modes: list[str], num_classes: int, explainer: torch.nn.Module,
                      classifier: torch.nn.Module, peaks: dict[str, float | None],
                      compile_classifier: bool = True) -> list[dict]:
    """One row per mode at one batch size: images/s, step time, this mode's FLOPs per step, MFU, peak memory.
    With --compile, 'ours' runs compiled modules (the classifier too unless compile_classifier is False, as in
    the trainer, whose train.compile compiles the explainer only)."""
    images, labels = make_batch(batch_size, num_classes, args.image_size, device, args.seed)
    runners: dict[str, Runner] = {}
    flops: dict[str, int | None] = {}
    for mode in modes:
        runner = Runner(mode, explainer, classifier, images, labels, args, device)
        flops[mode] = None
        try:  # each mode's own arithmetic, counted eagerly (before compilation)
            flops[mode] = count_flops(runner)
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if mode in OURS_MODES and args.compile:
            backend = args.compile_backend
            runner.run_explainer = compile_fresh(explainer, backend)
            runner.run_classifier = compile_fresh(classifier, backend) if compile_classifier else classifier
        runners[mode] = runner
    measured = bench(runners, args.warmup, args.iters, args.rounds, device)
    if args.profile:
        for mode, runner in runners.items():
            if "error" not in measured[mode]:
                measured[mode]["profile"] = profile_step(runner, args.profile, device)
    rows = []
    for mode in modes:
        precision = mode_precision(mode, args)
        row = {"classifier": classifier_arch, "explainer": args.explainer, "batch_size": batch_size,
               "image_size": args.image_size, "num_classes": num_classes, "mode": mode, "precision": precision,
               "channels_last": runners[mode].channels_last,
               "compiled": ("explainer+classifier" if compile_classifier else "explainer")
               if mode in OURS_MODES and args.compile else "no",
               **measured[mode]}
        if flops[mode]:
            row["flops_per_step"] = flops[mode]
            if "images_per_s" in row:
                row["achieved_tflops"] = flops[mode] * row["images_per_s"] / batch_size / 1e12
                peak = peaks.get(precision)
                if peak:
                    row["peak_tflops"] = peak
                    row["mfu"] = row["achieved_tflops"] / peak
        rows.append(row)
    del runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


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
    peaks: dict[str, float | None] = {p: peak_tflops(device_name, p) if device.type == "cuda" else None
                                      for p in ("bf16", "tf32", "fp32")}
    if args.peak_tflops:
        peaks["bf16"] = args.peak_tflops
    if args.peak_tflops_fp32:
        peaks["tf32"] = peaks["fp32"] = args.peak_tflops_fp32

    results: list[dict] = []
    report = {
        "device": device_name,
        "device_type": device.type,
        "peak_tflops": peaks,
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        **provenance(args),
        "results": results,
        "speedups": [],
        "partial": True,
    }

    def save_progress() -> None:
        """Rows so far, so that a run stopped by a time budget still leaves what it measured."""
        report["speedups"] = speedups(results)
        if args.out:
            write_json(report, args.out)

    if device.type == "cpu":
        report["peak_memory"] = "process peak RSS (VmHWM) during one step, GiB"
    for classifier_arch in args.classifiers:
        for num_classes in args.num_classes:
            explainer = build_explainer(args.explainer, num_classes).to(device).train()
            classifier = freeze(build_classifier(classifier_arch, num_classes).to(device))
            for batch_size in args.batch_sizes:
                for row in measure_step_rows(args, device, classifier_arch, batch_size, args.modes, num_classes,
                                             explainer, classifier, peaks):
                    results.append(row)
                    print(format_row(row), flush=True)
                save_progress()
            del explainer, classifier
    if args.e2e:
        report["e2e"] = []
        run_e2e(args, device, peaks, report["e2e"], save_progress)
    report["speedups"] = speedups(results)
    report["class_ratios"] = class_ratios(results, args.num_classes[0])
    report["partial"] = False
    return report


def class_ratios(results: list[dict], base: int) -> list[dict]:
    """Each row's step time and peak memory over those of the `base`-class row with the same classifier, batch size
    and mode (same run): how the cost grows with the class count."""
    out = []
    for row in results:
        ref = next((r for r in results if r["num_classes"] == base and "step_ms" in r and
                    all(r[k] == row[k] for k in ("classifier", "batch_size", "mode", "compiled"))), None)
        if ref is None or "step_ms" not in row:
            continue
        ratio = {"classifier": row["classifier"], "batch_size": row["batch_size"], "mode": row["mode"],
                 "num_classes": row["num_classes"], "base_classes": base, "step_ms": row["step_ms"],
                 "time_ratio": row["step_ms"] / ref["step_ms"]}
        if "peak_mem_gib" in row and "peak_mem_gib" in ref:
            ratio.update(peak_mem_gib=row["peak_mem_gib"], mem_ratio=row["peak_mem_gib"] / ref["peak_mem_gib"])
        out.append(ratio)
    return out


def speedups(results: list[dict]) -> list[dict]:
    out = []
    for row in results:
        if row["mode"] == "reference" or "images_per_s" not in row:
            continue
        ref = next((r for r in results if r["mode"] == "reference" and r["classifier"] == row["classifier"]
                    and r["batch_size"] == row["batch_size"] and r["num_classes"] == row["num_classes"]
                    and "images_per_s" in r), None)
        if ref:
            out.append({"classifier": row["classifier"], "batch_size": row["batch_size"], "mode": row["mode"],
                        "num_classes": row["num_classes"], "compiled": row.get("compiled", "no"),
                        "speedup_vs_reference": row["images_per_s"] / ref["images_per_s"]})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# End to end: explainer/train.py on synthetic shards vs the bare step
# ----------------------------------------------------------------------------------------------------------------------

E2E_CLASSES = 12  # the synthetic generator's maximum


def make_e2e_shards(args: argparse.Namespace, batch_size: int) -> Path:
    """Synthetic shards at the benchmark's image size with enough training images for every step of the run."""
    out = Path(args.e2e_dir) / f"shards_{args.image_size}px_{batch_size}x{args.e2e_steps}"
    manifest = out / "manifest.json"
    if not manifest.is_file():
        counts = f"train={batch_size * (args.e2e_steps + 1)},val={2 * batch_size},test={batch_size}"
        subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "synthetic", "--out", str(out),
                        "--image-size", str(args.image_size), "--num-classes", str(E2E_CLASSES), "--counts", counts,
                        "--workers", str(args.e2e_workers), "--no-progress"], check=True, env=_child_env())
    return manifest


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def trainer_throughput(metrics: Path, batch_size: int, skip_windows: int = 1) -> dict:
    """Images/s of the trainer's logged windows after the first `skip_windows` (whole-window time, so logging,
    loader stalls and host syncs count), and its peak memory."""
    train = [json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "train"' in line]
    windows, prev = [], 0
    for record in train:
        images = (record["step"] - prev) * batch_size
        windows.append((images, images / record["images_per_s"]))
        prev = record["step"]
    timed = windows[skip_windows:]
    if not timed:
        raise RuntimeError(f"{metrics}: {len(windows)} logged window(s), none after the first {skip_windows}")
    images, seconds = sum(i for i, _ in timed), sum(t for _, t in timed)
    return {"trainer_images_per_s": images / seconds, "trainer_windows": len(timed),
            "trainer_window_images_per_s": [round(i / t, 2) for i, t in timed],
            "trainer_peak_mem_gib": max(r.get("memory_mb", 0.0) for r in train) / 1024}


def run_e2e(args: argparse.Namespace, device: torch.device, peaks: dict[str, float | None], rows: list[dict],
            save_progress: Callable[[], None]) -> None:
    """Appends one row per classifier and batch size to `rows`."""
    from explainer.models import save_model_file

    for classifier_arch in args.classifiers:
        for batch_size in args.batch_sizes:
            manifest = make_e2e_shards(args, batch_size)
            work = Path(args.e2e_dir) / f"{classifier_arch}_bs{batch_size}{'_compiled' if args.compile else ''}"
            classifier = freeze(build_classifier(classifier_arch, E2E_CLASSES))
            classes = json.loads(manifest.read_text())["classes"]
            ckpt = save_model_file(work / "classifier.pt", classifier, kind="classifier", arch=classifier_arch,
                                   num_classes=E2E_CLASSES, classes=classes, image_size=args.image_size)
            # the bare step with the same models, classes and settings, in this process
            explainer = build_explainer(args.explainer, E2E_CLASSES).to(device).train()
            bare = measure_step_rows(args, device, classifier_arch, batch_size, ["ours"], E2E_CLASSES, explainer,
                                     classifier.to(device), peaks, compile_classifier=False)[0]
            del explainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
            out = work / "run"
            overrides = [
                f"data.manifest={manifest}", f"data.image_size={args.image_size}", f"data.batch_size={batch_size}",
                f"data.num_workers={args.e2e_workers}", "data.shuffle_buffer=64",
                f"classifier.arch={classifier_arch}", f"classifier.checkpoint={ckpt}",
                f"explainer.arch={args.explainer}",
                f"train.mixed_precision={args.precision}", f"train.channels_last={str(args.channels_last).lower()}",
                f"train.compile={str(args.compile).lower()}", f"train.max_steps={args.e2e_steps}",
                f"train.log_every_steps={args.e2e_log_every}", f"train.val_every_steps={args.e2e_steps}",
                f"train.checkpoint_every_steps={args.e2e_steps}", "train.val_max_batches=2",
                "train.image_log_every_steps=0", f"train.output_dir={out}", "train.resume=null",
                "tracking.wandb_mode=disabled", f"train.seed={args.seed}",
            ]
            if out.exists():
                import shutil

                shutil.rmtree(out)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, str(ROOT / "explainer" / "train.py"), "--config",
                                   str(ROOT / "configs" / "voc_vgg16.yaml"), *overrides],
                                  env=_child_env(), capture_output=True, text=True)
            wall = time.perf_counter() - start
            row = {"classifier": classifier_arch, "explainer": args.explainer, "batch_size": batch_size,
                   "image_size": args.image_size, "num_classes": E2E_CLASSES, "precision": args.precision,
                   "channels_last": args.channels_last, "compiled": args.compile, "steps": args.e2e_steps,
                   "num_workers": args.e2e_workers, "trainer_wall_s": wall,
                   "bare_images_per_s": bare.get("images_per_s"), "bare_peak_mem_gib": bare.get("peak_mem_gib")}
            if proc.returncode != 0:
                row["error"] = f"train.py exited {proc.returncode}: {proc.stderr[-2000:]}"
            else:
                row.update(trainer_throughput(out / "metrics.jsonl", batch_size))
                if row["bare_images_per_s"]:
                    row["trainer_vs_bare"] = row["trainer_images_per_s"] / row["bare_images_per_s"]
            rows.append(row)
            print(format_e2e_row(row), flush=True)
            save_progress()


HEADER = (f"{'classifier':<12} {'C':>5} {'bs':>4} {'mode':<10} {'img/s':>9} {'step ms':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'mem GiB':>8}")


def format_row(row: dict) -> str:
    classes = row.get("num_classes", "-")
    if "error" in row:
        return f"{row['classifier']:<12} {classes:>5} {row['batch_size']:>4} {row['mode']:<10} {row['error']}"
    tflops = f"{row['achieved_tflops']:.3f}" if "achieved_tflops" in row else "-"  # FLOP count can be missing
    mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
    mem = f"{row['peak_mem_gib']:.2f}" if "peak_mem_gib" in row else "-"
    return (f"{row['classifier']:<12} {classes:>5} {row['batch_size']:>4} {row['mode']:<10} "
            f"{row['images_per_s']:>9.1f} {row['step_ms']:>9.1f} {tflops:>8} {mfu:>6} {mem:>8}")


def format_e2e_row(row: dict) -> str:
    head = f"e2e {row['classifier']:<12} bs {row['batch_size']:>3}"
    if "error" in row:
        return f"{head} {row['error']}"
    bare = row["bare_images_per_s"]
    return (f"{head} trainer {row['trainer_images_per_s']:.1f} img/s, bare step {bare:.1f} img/s -> "
            f"x{row.get('trainer_vs_bare', float('nan')):.2f} ({row['trainer_wall_s']:.0f} s wall)")


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
        print(f"  {s['classifier']:<12} C {s['num_classes']:>5} bs {s['batch_size']:>3} {s['mode']:<10} "
              f"x{s['speedup_vs_reference']:.2f}")
    if len(args.num_classes) > 1:
        print(f"\nagainst {args.num_classes[0]} classes (same mode and batch size): step time, peak memory")
        for r in report["class_ratios"]:
            mem = f"x{r['mem_ratio']:.2f} ({r['peak_mem_gib']:.2f} GiB)" if "mem_ratio" in r else "-"
            print(f"  {r['classifier']:<12} C {r['num_classes']:>5} bs {r['batch_size']:>3} {r['mode']:<10} "
                  f"x{r['time_ratio']:.2f} ({r['step_ms'] / 1000:.2f} s)  {mem}")
    write_json(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
