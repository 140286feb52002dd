"""Loader throughput (decode + resize + ImageNet normalise) vs a plain PIL loop doing the same work, same images.

    python benchmarks/bench_loader.py                       # 320 photo-sized images at 224 px, about 1 min
    python benchmarks/bench_loader.py --images 2000 --size 224 --batch-size 64
    python benchmarks/bench_loader.py --remote --images 1000   # shards in S3: 50 ms per request, 100 MB/s cap

The PIL loop reads the JPEG files, decodes, converts to RGB, resizes (bilinear) and normalises each image into a
float32 CHW array, in one process. The loader reads the same images from the shards (one epoch, after a warm-up epoch
that starts the persistent workers) in-process (0 workers), with 1 worker and with 2 workers.

--remote: the same shards read from local disk and from a bucket of a local S3-compatible server (moto, from the dev
extra, in a process of its own) that answers every request --latency-ms late, with the bandwidth capped at --rate-mbs:
by default (--net auto, as root with iproute2) in the kernel, a tbf qdisc on the loopback of a network namespace the
benchmark makes for itself (unique name, removed on the way out, SIGTERM included), so no Python proxy spends CPU on
pacing bytes; the latency is a sleep in the server (this kernel has no netem qdisc; a sleep costs no CPU either).
Not root: --net proxy, the pacing proxy of tests/_s3.py (cap per connection). Compared, bucket / local at the same
worker count: 1 worker with the server pinned to a core of its own and the loader to the other(s) (a real bucket's
server runs elsewhere), then 1 and 2 workers sharing every core with the server. docs/training.md#object-storage
reports the ratios (the goal: at least 0.9). The numbers also go to --out as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_source import bench_dir, make_source  # noqa: E402

from explainer.atomic import write_json_atomic  # noqa: E402
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


def _epochs(manifest, size: int, batch: int, workers: int, server: int | None = None) -> dict[str, float]:
    """One timed epoch after a warm-up one: images/s (also from the first batch on: a bucket's epoch starts with a
    wait for the first shard, latency + its bytes, which a long epoch spreads thinner), and CPU seconds of the
    loader (this process and its workers) and of the `server` process (pid) per 1000 images."""
    from _netns import children, cpu_seconds

    cfg = DataConfig(image_size=size, batch_size=batch, num_workers=workers, shuffle_buffer=100)
    stream = make_train_loader(cfg, manifest, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    # Warm-up: one whole epoch, which starts the persistent workers. Not one batch: the workers would go on making
    # the batches they had prefetched for the abandoned epoch, and the timed epoch would wait for that wasted work
    # (prefetch_factor batches per worker, a fifth to a third of this epoch) - cost the PIL loop does not pay.
    for _ in stream:
        pass
    stream.set_epoch(1)
    procs = [pid for pid in children(os.getpid()) if pid != server]
    loader = [os.getpid(), *procs]
    cpu0 = [cpu_seconds(pid) for pid in loader], cpu_seconds(server) if server else 0.0
    decode0 = sum(cpu_seconds(pid, pid) for pid in procs)  # the workers' main threads: decoding
    t0 = time.perf_counter()
    sizes = []
    for b in stream:
        sizes.append(b["image"].shape[0])
        if len(sizes) == 1:
            first = time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    n = sum(sizes)
    loader_cpu = sum(cpu_seconds(pid) for pid in loader) - sum(cpu0[0])
    decode = sum(cpu_seconds(pid, pid) for pid in procs) - decode0
    workers_cpu = sum(cpu_seconds(pid) for pid in procs) - sum(cpu0[0][1:])
    server_cpu = cpu_seconds(server) - cpu0[1] if server else 0.0
    del stream  # its persistent workers end here, not during the next run
    return {"images_s": n / elapsed, "images": n, "epoch_s": elapsed, "first_batch_s": first,
            "after_first_images_s": (n - sizes[0]) / (elapsed - first),
            "loader_cpu_s_per_1000": 1000 * loader_cpu / n, "server_cpu_s_per_1000": 1000 * server_cpu / n,
            # the workers' other threads: the read-ahead's fetching (s3fs's event loop, the request pool) for a bucket
            "worker_threads_cpu_s_per_1000": 1000 * (workers_cpu - decode) / n}


def loader_rate(manifest, size: int, batch: int, workers: int) -> float:
    return _epochs(manifest, size, batch, workers)["images_s"]


def _serve(latency: float, rate: float, net: str, conn) -> None:
    """The S3 server in a process of its own, so that it does not share the loader's interpreter: moto behind the
    pacing proxy (net "proxy"), or moto alone with the delay as a sleep (net "netns": the kernel caps the rate)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _s3 import moto_server, s3_server

    if net == "proxy":
        with s3_server(latency=latency, rate=rate) as proxy:
            conn.send(proxy.url)
            conn.recv()  # until the benchmark is done
    else:
        with moto_server(latency=latency) as url:
            conn.send(url)
            conn.recv()


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


def _choose_net(asked: str) -> str:
    from _netns import netns_problem, qdisc_available

    problem = netns_problem() or (None if qdisc_available("tbf") else "needs the kernel's tbf qdisc")
    if asked == "netns" and problem:
        raise SystemExit(f"--net netns {problem}; or use --net proxy (the pacing proxy, no root needed)")
    if asked == "auto" and problem:
        print(f"network namespace not possible ({problem}): the pacing proxy instead (--net proxy)")
        return "proxy"
    return "proxy" if asked == "proxy" else "netns"


def _setups(cpus: list[int]) -> list[tuple[int, list[int], list[int]]]:
    """(workers, loader CPUs, server CPUs) of each compared setup: 1 worker with the server on a core of its own
    (as a real bucket's server is elsewhere), then 1 and 2 workers sharing every core with the server."""
    own = [(1, cpus[1:], cpus[:1])] if len(cpus) >= 2 else []
    return [*own, (1, cpus, cpus), (2, cpus, cpus)]


def _measure(local_manifest: Path, url: str, server: int, args: argparse.Namespace) -> dict:
    from _netns import pin

    cpus = sorted(os.sched_getaffinity(0))
    best: dict[tuple[str, int], dict[str, float]] = {}
    wait = {"images_s": 0.0, "waited_share": 1.0}
    setups = _setups(cpus)
    for _ in range(args.repeat):  # interleaved, so load changes on a shared machine hit all alike
        pin(os.getpid(), setups[0][1])
        pin(server, setups[0][2])
        rate, share = waiting_share(read_manifest(url), args.size, args.batch_size)
        wait = {"images_s": max(wait["images_s"], rate), "waited_share": min(wait["waited_share"], share)}
        for i, (workers, loader_cpus, server_cpus) in enumerate(setups):
            pin(os.getpid(), loader_cpus)
            pin(server, server_cpus)
            for name, manifest in (("local", read_manifest(local_manifest)), ("bucket", read_manifest(url))):
                got = _epochs(manifest, args.size, args.batch_size, workers, server if name == "bucket" else None)
                if got["images_s"] > best.get((name, i), {}).get("images_s", 0.0):
                    best[name, i] = got
    pin(os.getpid(), cpus)
    rows = []
    for i, (workers, loader_cpus, server_cpus) in enumerate(setups):
        local, bucket = best["local", i], best["bucket", i]
        rows.append({"workers": workers, "loader_cpus": loader_cpus, "server_cpus": server_cpus,
                     "own_core": loader_cpus != server_cpus, "local": local, "bucket": bucket,
                     "ratio": bucket["images_s"] / local["images_s"],
                     "ratio_after_first_batch": bucket["after_first_images_s"] / local["after_first_images_s"]})
    return {"wait_0_workers": wait, "rows": rows}


def _report(result: dict) -> None:
    wait = result["wait_0_workers"]
    print(f"0 workers (server on its own core where there are 2+): waited for bytes "
          f"{100 * wait['waited_share']:.1f}% of the bucket epoch (what read-ahead did not hide)")
    for row in result["rows"]:
        where = (f"loader on CPU {row['loader_cpus']}, server on CPU {row['server_cpus']}" if row["own_core"]
                 else "loader and server share all CPUs")
        local, bucket = row["local"], row["bucket"]
        print(f"{row['workers']} worker(s), {where}: local {local['images_s']:5.0f} images/s, bucket "
              f"{bucket['images_s']:5.0f} images/s, ratio {row['ratio']:.2f}")
        print(f"    first batch after {local['first_batch_s']:.2f} s (local) / {bucket['first_batch_s']:.2f} s "
              f"(bucket); ratio from the first batch on {row['ratio_after_first_batch']:.2f}; CPU s per 1000 "
              f"images: loader local {local['loader_cpu_s_per_1000']:.2f}, loader bucket "
              f"{bucket['loader_cpu_s_per_1000']:.2f} (of which the workers' threads besides the decoding one: local "
              f"{local['worker_threads_cpu_s_per_1000']:.2f}, bucket {bucket['worker_threads_cpu_s_per_1000']:.2f}), "
              f"server {bucket['server_cpu_s_per_1000']:.2f}")


@contextlib.contextmanager
def bucket(local_manifest: Path, args: argparse.Namespace) -> Iterator[tuple[str, int, str]]:
    """The shards of `local_manifest` in a bucket of a local S3 server (its own process) behind args.latency_ms and
    args.rate_mbs; yields (manifest URL, server pid, "netns" or "proxy"). Everything is undone on the way out."""
    import multiprocessing as mp

    import s3fs

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _netns import capped_namespace, entered
    from _s3 import make_bucket, use_s3_env

    net = _choose_net(args.net)
    with contextlib.ExitStack() as stack:
        # SIGTERM (timeout, a job's end) runs the clean-up below too, instead of leaving the namespace behind
        stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, _terminate))
        if net == "netns":  # the namespace goes last: after the server has stopped and this thread left it
            stack.enter_context(entered(stack.enter_context(capped_namespace(args.rate_mbs * 1e6))))
        parent, child = mp.get_context("spawn").Pipe()
        server = mp.get_context("spawn").Process(target=_serve, args=(args.latency_ms / 1000, args.rate_mbs * 1e6,
                                                                      net, child))
        server.start()
        child.close()  # so that a server that dies is an EOFError here, not a wait for ever
        stack.callback(server.join, 30)
        stack.callback(lambda: server.is_alive() and parent.send("stop"))
        if not parent.poll(120):
            raise RuntimeError("the S3 server process did not start within 120 s")
        use_s3_env(os.environ, parent.recv())
        make_bucket("bench")
        fs = s3fs.S3FileSystem()  # kept referenced: see explainer/data/remote.py:_KEEP
        fs.put(f"{local_manifest.parent}/", "bench/shards/", recursive=True)
        cap = "in all (tbf qdisc in a network namespace)" if net == "netns" else "per connection (pacing proxy)"
        print(f"bucket: {args.latency_ms:g} ms added before every answer, {args.rate_mbs:g} MB/s {cap}")
        yield "s3://bench/shards/manifest.json", server.pid, net


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def remote_vs_local(local_manifest: Path, args: argparse.Namespace) -> dict:
    """Loader rate from a bucket behind added latency and a bandwidth cap vs from local disk, same workers."""
    with bucket(local_manifest, args) as (url, server, net):
        result = _measure(local_manifest, url, server, args)
    _report(result)
    return {"net": net, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each; the best is reported")
    parser.add_argument("--remote", action="store_true", help="bucket vs local disk instead (see above)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="--remote: added before every answer")
    parser.add_argument("--rate-mbs", type=float, default=100.0,
                        help="--remote: bandwidth cap in MB/s: in all with --net netns, per connection with proxy")
    parser.add_argument("--net", choices=("auto", "netns", "proxy"), default="auto",
                        help="--remote: how the cap is made: a tbf qdisc in a network namespace of the benchmark's "
                             "own (root, iproute2), or the pacing proxy of tests/_s3.py; auto: netns where possible")
    parser.add_argument("--out", help="JSON of the numbers (default .bench/loader.json, --remote: "
                                      ".bench/loader-remote.json)")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.1f} (others' work on a shared machine skews "
          "wall-clock rates; runs are interleaved and the best of --repeat is reported)")

    root = bench_dir() / "loader"
    voc = make_source(root / "source", args.images)
    out = root / f"shards-{args.images}"
    if not (out / "manifest.json").exists():
        build_voc_shards(voc, ShardOptions(out=out, maxcount=100, progress=False), command=["bench"])
    if args.remote:
        _write(args, load, remote_vs_local(out / "manifest.json", args))
        return
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
    _write(args, load, {"pil_images_s": best["pil"], "loader_images_s": {w: best[w] for w in (0, 1, 2)}})


def _write(args: argparse.Namespace, load: tuple[float, float, float], result: dict) -> None:
    path = Path(args.out or bench_dir() / ("loader-remote.json" if args.remote else "loader.json"))
    write_json_atomic(path, {"command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
                             "cpus": os.cpu_count(), "load_average_before": load[0],
                             "load_average_after": os.getloadavg()[0], **result})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
