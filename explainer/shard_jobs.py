"""`make-shards imagenet` as a job array: one part per array task, through the same submitit launcher as training.

    explainer submit --make-shards "imagenet --root /data/imagenet --out shards/imagenet --workers 16" --parts 8 \
        --cpus-per-task 18 --mem-gb 32 --time 240 --partition cpu

Part I writes OUT/part-0000I with `--num-parts N --part I --resume` (a requeued or rerun task continues its part);
each task, once its part is complete, merges when every part's manifest is there, so the last one to finish writes
OUT/manifest.json (`make-shards merge` by hand does the same). The merge is atomic, so two parts finishing at once
both write the same file.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import submitit

from explainer.config import ConfigError
from explainer.data.shards import MANIFEST_NAME


def part_dir(out: str | Path, part: int) -> Path:
    return Path(out) / f"part-{part:05d}"


class ShardPartJob:
    """One array task: make-shards for part `part` of `num_parts`, then the merge if every part is complete."""

    def __init__(self, argv: list[str], out: str, num_parts: int, part: int) -> None:
        self.argv, self.out, self.num_parts, self.part = argv, out, num_parts, part

    def __call__(self) -> dict[str, Any]:
        from explainer.data.parts import merge_parts
        from explainer.make_shards import main

        folder = part_dir(self.out, self.part)
        rc = main([*self.argv, "--out", str(folder), "--num-parts", str(self.num_parts), "--part", str(self.part),
                   "--resume", "--no-progress"])
        if rc != 0:
            raise RuntimeError(f"make-shards part {self.part} of {self.num_parts} exited with status {rc} (its log "
                               "says why); resubmit: complete shards are kept")
        parts = [part_dir(self.out, i) for i in range(self.num_parts)]
        merged = all((p / MANIFEST_NAME).is_file() for p in parts)
        if merged:
            merge_parts(parts, self.out, ["explainer", "make-shards", "merge", *map(str, parts), "--out", self.out])
        return {"part": self.part, "out": str(folder), "merged": merged}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeued after a time-out or preemption: the same part again, which resumes."""
        return submitit.helpers.DelayedSubmission(self)


def parse_make_shards(text: str, parts: int) -> tuple[list[str], str]:
    """(make-shards arguments, output folder) from --make-shards, checked by make-shards' own parser."""
    from explainer.make_shards import parse_args

    argv = shlex.split(text)
    try:
        args = parse_args(argv)
    except SystemExit:
        raise ConfigError(f"--make-shards {text!r}: not valid make-shards arguments (see explainer make-shards "
                          "--help)") from None
    if args.dataset != "imagenet":
        raise ConfigError(f"--make-shards: only 'imagenet' runs in parts, got {args.dataset!r}")
    if args.out is None:
        raise ConfigError("--make-shards: give --out (the folder of the merged manifest; part I goes to OUT/part-I)")
    if parts < 1:
        raise ConfigError(f"--parts must be >= 1, got {parts}")
    return argv, str(args.out)


def launch_make_shards(args: argparse.Namespace, spec: Any) -> list[submitit.Job]:
    """Submit the parts as one job array (or print the script with --dry-run); local clusters wait for them."""
    from explainer.slurm import LaunchError, describe_local, make_executor, render_sbatch

    argv, out = parse_make_shards(args.make_shards, args.parts)
    workers = next((int(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--workers"), 8)
    spec.check(workers)
    spec = spec.with_defaults(workers)
    spec.name = "explainer-make-shards"
    folder = Path(args.job_dir).absolute() if args.job_dir else Path(out).absolute() / "submitit"
    if args.dry_run:
        print(render_sbatch(spec, folder, args.parts) if spec.cluster == "slurm"
              else describe_local(spec, folder, args.parts), end="")
        return []
    executor = make_executor(spec, folder)
    with executor.batch():
        jobs = [executor.submit(ShardPartJob(argv, out, args.parts, i)) for i in range(args.parts)]
    print(f"submitted {len(jobs)} part(s) of make-shards ({spec.cluster}); parts in {out}/part-*, merged manifest: "
          f"{out}/{MANIFEST_NAME} when the last part ends (or: explainer make-shards merge {out}/part-* --out {out})")
    if spec.cluster != "slurm":
        for job in jobs:
            try:
                job.results()
            except Exception as exc:  # noqa: BLE001 - submitit wraps the task's error
                raise LaunchError(f"make-shards part job {job.job_id} failed; logs: {job.paths.stderr}\n{exc}") \
                    from None
        print(f"done: {out}/{MANIFEST_NAME}", file=sys.stdout)
    return jobs
