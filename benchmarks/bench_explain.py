"""Time per image of `explainer explain` against the class count (docs/method.md#head-resolution).

For each class count, an Explainer checkpoint of --explainer (random weights: the cost does not depend on them) and
the same --images JPEG files; `explain` runs with --rank-by mask (no classifier: the cost measured is the Explainer's
and the writing) and --top-k 5, the default. Rounds are interleaved over the class counts and the median round is
kept, so background load hits every count alike; ratios are against the first count, in the same run.

  python benchmarks/bench_explain.py --num-classes 20,1000 --images 16 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # _bench_result, also when imported by a test

from _bench_result import write_result  # noqa: E402

from explainer.explain import explain  # noqa: E402
from explainer.models import build_explainer, save_model_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", default="20,1000")
    parser.add_argument("--explainer", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--image-size", type=int, default=224, help="the explainer's input (images are 320 x 240)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=".bench/explain.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.num_classes.split(",")]
    times: dict[int, list[float]] = {c: [] for c in counts}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rng = np.random.default_rng(0)
        (work / "in").mkdir()
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(work / "in" / f"{i:03d}.jpg")
        for c in counts:
            torch.manual_seed(0)
            save_model_file(work / f"e{c}.pt", build_explainer(args.explainer, c), kind="explainer",
                            arch=args.explainer, num_classes=c, classes=[f"class{k}" for k in range(c)],
                            image_size=args.image_size)
            explain(str(work / f"e{c}.pt"), [str(work / "in" / "000.jpg")], str(work / "warm"), rank_by="mask",
                    top_k=args.top_k, progress=False, device="cpu")
        for _ in range(args.rounds):
            for c in counts:
                start = time.perf_counter()
                explain(str(work / f"e{c}.pt"), [str(work / "in")], str(work / f"out{c}"), rank_by="mask",
                        top_k=args.top_k, batch_size=args.batch_size, progress=False, device="cpu")
                times[c].append((time.perf_counter() - start) / args.images)
    rows = [{"num_classes": c, "s_per_image": statistics.median(times[c]), "rounds": times[c]} for c in counts]
    base = rows[0]["s_per_image"]
    for row in rows:
        row["ratio"] = row["s_per_image"] / base
        print(f"{args.explainer} C={row['num_classes']:5d}: {1000 * row['s_per_image']:.1f} ms / image "
              f"(x{row['ratio']:.2f} of {counts[0]} classes; rounds {[round(1000 * t) for t in row['rounds']]} ms)")
    write_result(args.out, args, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
