"""Loader throughput (decode + resize + ImageNet normalise) vs a plain PIL loop doing the same work, same images.

    python benchmarks/bench_loader.py                       # 320 photo-sized images at 224 px, about 1 min
    python benchmarks/bench_loader.py --images 2000 --size 224 --batch-size 64
    python benchmarks/bench_loader.py --remote --images 1000   # shards in S3: 50 ms latency, 50 MB/s per connection

The PIL loop reads the JPEG files, decodes, converts to RGB, resizes (bilinear) and normalises each image into a
float32 CHW array, in one process. The loader reads the same images from the shards (one epoch, after a warm-up epoch
that starts the persistent workers) in-process (0 workers), with 1 worker and with 2 workers.

--remote: the same shards read from local disk and from a bucket of a local S3-compatible server (moto, from the dev
extra) behind a proxy that adds --latency-ms before every answer and caps each answer's body at --rate-mbs (the
proxy of tests/_s3.py, all on 127.0.0.1), with 1 and 2 workers: the ratio bucket / local at the same worker count is
what docs/training.md#object-storage reports (the goal: at least 0.9).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_source import bench_dir, make_source  # noqa: E402

from explainer.config import DataConfig  # noqa: E402
from explainer.data import IMAGENET_MEAN, IMAGENET_STD, make_train_loader, read_manifest  # noqa: E402
from explainer.data.shards import ShardOptions  # noqa: E402
from explainer.data.voc import build_voc_shards  # noqa: E402


def pil_loop(files: list[Path], size: int) -> float:
    mean = np.array(IMAGENET_MEAN, np.float32)
    std = np.array(IMAGENET_STD, np.float32)
    t0 = time.perf_counter()
    for path in files:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255.0
        x = ((arr - mean) / std).transpose(2, 0, 1)
        assert x.shape == (3, size, size)
    return len(files) / (time.perf_counter() - t0)


def loader_rate(manifest, size: int, batch: int, workers: int) -> float:
    cfg = DataConfig(image_size=size, batch_size=batch, num_workers=workers, shuffle_buffer=100)
    stream = make_train_loader(cfg, manifest, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    # Warm-up: one whole epoch, which starts the persistent workers. Not one batch: the workers would go on making
    # the batches they had prefetched for the abandoned epoch, and the timed epoch would wait for that wasted work
    # (prefetch_factor batches per worker, a fifth to a third of this epoch) - cost the PIL loop does not pay.
    for _ in stream:
        pass
    stream.set_epoch(1)
    t0 = time.perf_counter()
    n = sum(b["image"].shape[0] for b in stream)
    return n / (time.perf_counter() - t0)


def _serve(latency: float, rate: float, conn) -> None:
    """moto and the proxy in a process of their own, so that they do not share the loader's interpreter."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _s3 import s3_server

    with s3_server(latency=latency, rate=rate) as proxy:
        conn.send(proxy.url)
        conn.recv()  # until the benchmark is done


def waiting_share(manifest, size: int, batch: int) -> tuple[float, float]:
    """(images/s, share of the timed epoch spent waiting for bytes) with the decode in this process (0 workers):
    what read-ahead did not hide, measured inside one epoch, so the machine's load drifting between runs cancels."""
    from explainer.data.remote import ReadAhead

    cfg = DataConfig(image_size=size, batch_size=batch, num_workers=0, shuffle_buffer=100)
    stream = make_train_loader(cfg, manifest, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    for _ in stream:
        pass
    stream.set_epoch(1)
    ReadAhead.waited_s = 0.0
    t0 = time.perf_counter()
    n = sum(b["image"].shape[0] for b in stream)
    elapsed = time.perf_counter() - t0
    return n / elapsed, ReadAhead.waited_s / elapsed


def remote_vs_local(local_manifest: Path, args: argparse.Namespace) -> None:
    """Loader rate from a bucket behind added latency and a bandwidth cap vs from local disk, same workers."""
    import multiprocessing as mp

    import s3fs

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _s3 import make_bucket, use_s3_env

    parent, child = mp.get_context("spawn").Pipe()
    server = mp.get_context("spawn").Process(target=_serve, args=(args.latency_ms / 1000, args.rate_mbs * 1e6, child))
    server.start()
    try:
        use_s3_env(os.environ, parent.recv())
        make_bucket("bench")
        fs = s3fs.S3FileSystem()  # kept referenced: see explainer/data/remote.py:_KEEP
        fs.put(f"{local_manifest.parent}/", "bench/shards/", recursive=True)
        print(f"bucket behind {args.latency_ms:g} ms latency per request, {args.rate_mbs:g} MB/s per connection")
        url = "s3://bench/shards/manifest.json"
        best: dict[tuple[str, int], float] = {}
        share = 1.0
        for _ in range(args.repeat):
            share = min(share, waiting_share(read_manifest(url), args.size, args.batch_size)[1])
            for workers in (1, 2):
                for name, manifest in (("local", read_manifest(local_manifest)), ("bucket", read_manifest(url))):
                    rate = loader_rate(manifest, args.size, args.batch_size, workers)
                    best[name, workers] = max(best.get((name, workers), 0.0), rate)
        print(f"0 workers: waited for bytes {100 * share:.1f}% of the bucket epoch (what read-ahead did not hide)")
        for workers in (1, 2):
            local, bucket = best["local", workers], best["bucket", workers]
            print(f"{workers} worker(s): local disk {local:6.0f} images/s, bucket {bucket:6.0f} images/s, "
                  f"ratio {bucket / local:.2f}")
    finally:
        parent.send("stop")
        server.join(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each; the best is reported")
    parser.add_argument("--remote", action="store_true", help="bucket vs local disk instead (see above)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="--remote: added before every answer")
    parser.add_argument("--rate-mbs", type=float, default=50.0, help="--remote: MB/s of each answer's body")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (others' work on a shared machine skews "
          "wall-clock rates; runs are interleaved and the best of --repeat is reported)")

    root = bench_dir() / "loader"
    voc = make_source(root / "source", args.images)
    out = root / f"shards-{args.images}"
    if not (out / "manifest.json").exists():
        build_voc_shards(voc, ShardOptions(out=out, maxcount=100, progress=False), command=["bench"])
    if args.remote:
        return remote_vs_local(out / "manifest.json", args)
    manifest = read_manifest(out / "manifest.json")
    files = sorted((voc / "JPEGImages").glob("*.jpg"))
    n_used = (len(files) // args.batch_size) * args.batch_size
    print(f"{len(files)} images of 500x375 -> {args.size} px, batch {args.batch_size} ({n_used} per loader epoch)")
    pil_loop(files, args.size)  # warm the page cache
    best = {"pil": 0.0, 0: 0.0, 1: 0.0, 2: 0.0}
    for _ in range(args.repeat):  # interleaved, so load changes on a shared machine hit all alike
        best["pil"] = max(best["pil"], pil_loop(files, args.size))
        for workers in (0, 1, 2):
            best[workers] = max(best[workers], loader_rate(manifest, args.size, args.batch_size, workers))
    print(f"plain PIL loop        : {best['pil']:7.0f} images/s")
    for workers, label in ((0, "in-process"), (1, "1 worker  "), (2, "2 workers ")):
        print(f"loader, {label}    : {best[workers]:7.0f} images/s   ratio vs PIL loop "
              f"{best[workers] / best['pil']:.2f}x")


if __name__ == "__main__":
    main()
