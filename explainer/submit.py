r"""Submit Explainer training to SLURM (one task per GPU, multi-node), locally, or as a sweep (one job array).

  python launch/submit.py --config configs/coco_resnet.yaml --nodes 2 --gpus-per-node 8 --partition P --time 720 \
      [--account A --qos Q --constraint C --mem-gb 480 --cpus-per-task 10 --exclude node[1-2]] [key.sub=value ...]
  python launch/submit.py --sweep configs/sweeps/lambdas.yaml --gpus-per-node 1 --array-parallelism 8 ...
  python launch/submit.py --config ... --dry-run          # print the sbatch script, submit nothing
  python launch/submit.py --config ... --cluster local    # same code path on a machine without SLURM
  python launch/submit.py --make-shards "imagenet --root /data/imagenet --out shards/imagenet" --parts 8 ...

The logic lives in explainer/slurm.py (submission) and explainer/sweep.py (sweeps); this file only parses.
"""

from __future__ import annotations

import argparse
import sys

from explainer.arguments import ArgumentParser
from explainer.config import ConfigError
from explainer.slurm import JobSpec, LaunchError, launch_run, launch_sweep


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--config", help="run config YAML (with --sweep: replaces the sweep file's base_config)")
    p.add_argument("--sweep", metavar="FILE", help="sweep file (configs/sweeps/*.yaml): submit one job array")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm",
                   help="slurm (default); local: subprocesses on this machine; debug: in this process, pdb on error")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node without GPUs (CPU/gloo runs); default: --gpus-per-node, or 1")
    p.add_argument("--partition")
    p.add_argument("--time", type=int, default=60, help="time limit in minutes (requeued with resume on time-out)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--mem-gb", type=float,
                   help="memory per node in GB; default: tasks per node x (8 + 2 x data.num_workers) with GPUs, "
                        "x (2 + 1 x data.num_workers) without; 0: the partition's default")
    p.add_argument("--cpus-per-task", type=int, help="default: data.num_workers + 2 (at least data.num_workers + 1)")
    p.add_argument("--exclude", help="nodes to avoid, e.g. node[01-03]")
    p.add_argument("--array-parallelism", type=int, default=16, help="sweeps: runs of the array at once")
    p.add_argument("--job-dir", help="submitit folder (logs, pickles); default <train.output_dir>/submitit, for a "
                                     "sweep the sweep folder runs/sweeps/<sweep id>")
    p.add_argument("--dry-run", action="store_true", help="validate and print the sbatch script; submit nothing")
    p.add_argument("--make-shards", metavar="ARGS", help="make-shards imagenet as a job array of --parts parts, e.g. "
                   "\"imagenet --root /data/imagenet --out shards/imagenet\" (explainer/shard_jobs.py)")
    p.add_argument("--parts", type=int, default=8, help="--make-shards: array tasks (default 8)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides, e.g. optim.lr=1e-4")
    args = p.parse_args(argv)
    if not args.config and not args.sweep and not args.make_shards:
        p.error("give --config (one run), --sweep (a job array) or --make-shards")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    spec = JobSpec(cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
                   time_min=args.time, partition=args.partition, account=args.account, qos=args.qos,
                   constraint=args.constraint, exclude=args.exclude, array_parallelism=args.array_parallelism)
    try:
        if args.make_shards:
            from explainer.shard_jobs import launch_make_shards

            launch_make_shards(args, spec)
        elif args.sweep:
            launch_sweep(args.sweep, args.config, args.overrides, spec, args.job_dir, args.dry_run)
        else:
            launch_run(args.config, args.overrides, spec, args.job_dir, args.dry_run)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
