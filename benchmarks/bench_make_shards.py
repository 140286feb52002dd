"""make_shards throughput vs plain `tar cf` of the same source files, measured in the same run.

    python benchmarks/bench_make_shards.py                  # 2000 photo-sized images, < 1 min
    python benchmarks/bench_make_shards.py --images 5000 --repeat 5
    python benchmarks/bench_make_shards.py --imagenet --images 4000   # ILSVRC-layout tree, 1000 classes

--imagenet: an ILSVRC-2012-like tree (the Kaggle layout: 1000 wnid folders, photo-sized JPEGs of ~110 KB, box XMLs
for 40% of the train images as in the real set, a flat val of a tenth as many images with XMLs and
LOC_val_solution.csv), sharded by `make-shards imagenet` with 1 and 2 workers against `tar cf` of the same files; it
prints images/s per worker, the planning cost per image (listing, hold-out, XML look-ups: one process, before any
worker starts) and the time one machine would take for ILSVRC-2012's 1,331,167 train + val images at that rate.

Both read the same VOC-layout folder from the page cache (one warm-up pass each). make_shards does more than tar:
it parses every XML, checks every image header and end marker, checks segmentation PNGs, writes JSON labels and
the manifest; it runs with 1 worker (like tar) and with 2 workers (shards of 250 samples, so there is work to share).
A third make_shards variant (1 worker) reads every image header through PIL instead of the JPEG header walk
(`explainer.data.shards._jpeg_header`), which says what the hand-written walk is worth.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_source import bench_dir, make_source, source_bytes  # noqa: E402

from explainer.data import shards  # noqa: E402
from explainer.data.shards import ShardOptions  # noqa: E402
from explainer.data.voc import build_voc_shards  # noqa: E402


def time_tar(voc: Path, out: Path) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["tar", "cf", str(out), "-C", str(voc), "JPEGImages", "Annotations", "SegmentationClass"],
                   check=True)
    return time.perf_counter() - t0


def time_make_shards(voc: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    build_voc_shards(voc, ShardOptions(out=out, workers=workers, progress=False, maxcount=250), command=["bench"])
    return time.perf_counter() - t0


@contextlib.contextmanager
def pil_headers():
    """Every image header through PIL: the JPEG header walk answers "ask PIL" (in-process, so with 1 worker only)."""
    walk = shards._jpeg_header
    shards._jpeg_header = lambda data: None
    try:
        yield
    finally:
        shards._jpeg_header = walk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each; the best is reported")
    parser.add_argument("--imagenet", action="store_true", help="the ImageNet-like measurement (see above)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (others' work on a shared machine skews "
          "wall-clock rates; runs are interleaved and the best of --repeat is reported)")
    if args.imagenet:
        from _bench_imagenet import imagenet_bench

        imagenet_bench(args.images, args.repeat)
        return

    root = bench_dir() / "make_shards"
    t0 = time.perf_counter()
    voc = make_source(root / "source", args.images)
    print(f"source: {args.images} images, {source_bytes(voc) / 1e6:.1f} MB ({time.perf_counter() - t0:.1f} s to "
          f"prepare) in {voc}")
    tar_out, shard_out = root / "plain.tar", root / "shards"
    time_tar(voc, tar_out)  # warm the page cache
    time_make_shards(voc, shard_out, 1)
    best = {"tar": float("inf"), "w1": float("inf"), "w2": float("inf"), "w1_pil": float("inf")}
    for _ in range(args.repeat):  # interleaved, so load changes on a shared machine hit all of them alike
        best["tar"] = min(best["tar"], time_tar(voc, tar_out))
        best["w1"] = min(best["w1"], time_make_shards(voc, shard_out, 1))
        best["w2"] = min(best["w2"], time_make_shards(voc, shard_out, 2))
        with pil_headers():
            best["w1_pil"] = min(best["w1_pil"], time_make_shards(voc, shard_out, 1))
    n = args.images
    print(f"tar cf                    : {n / best['tar']:8.0f} images/s")
    print(f"make_shards --workers 1   : {n / best['w1']:8.0f} images/s   ratio vs tar {best['tar'] / best['w1']:.2f}x")
    print(f"make_shards --workers 2   : {n / best['w2']:8.0f} images/s   ratio vs tar {best['tar'] / best['w2']:.2f}x")
    print(f"make_shards, PIL headers  : {n / best['w1_pil']:8.0f} images/s   ratio vs tar "
          f"{best['tar'] / best['w1_pil']:.2f}x; JPEG header walk vs PIL: {best['w1_pil'] / best['w1']:.3f}x")


if __name__ == "__main__":
    main()
