"""Run by tests/test_distributed_setup.py under torchrun (2 CPU processes, gloo): builds the process group through
explainer.distributed exactly as the trainer / evaluate.py do and reports what reached torch, as JSON per rank.

  probe accelerator OUT overrides...   make_accelerator(train config) + DDP on a small BatchNorm model
  probe state OUT timeout_min          make_state(timeout) (evaluate.py)
Then both check the process-group timeout: rank 1 joins a collective 8 s late; with a short timeout rank 0 fails.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from explainer.config import ExplainerRunConfig, load_config
from explainer.distributed import make_accelerator, make_state


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    report: dict = {"rank": rank}
    if mode == "accelerator":
        cfg = load_config(ExplainerRunConfig, None, sys.argv[3:])
        accelerator = make_accelerator("no", None, out, cfg.train)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 6 * 6, 4))
        model = accelerator.prepare(model)
        torch.manual_seed(1 + rank)  # different data per rank: the all-reduce averages different gradients
        loss = model(torch.randn(4, 3, 8, 8)).square().mean()
        accelerator.backward(loss)
        grads = [p.grad for p in model.parameters()]
        report.update(
            wrapper=type(model).__name__,
            gradient_as_bucket_view=model.gradient_as_bucket_view,
            broadcast_buffers=model.broadcast_buffers,
            bucket_bytes_cap=model.bucket_bytes_cap,
            comm_hooks=[getattr(h, "__name__", repr(h)) for h, _ in model._comm_hooks],
            # gradients that are views into DDP's buckets share their storage with the other parameters' gradients
            grad_storages=len({g.untyped_storage().data_ptr() for g in grads}),
            n_grads=len(grads),
            # after a bf16-compressed all-reduce every averaged gradient is a bf16 number
            grads_bf16_exact=all(bool((g == g.to(torch.bfloat16).float()).all()) for g in grads),
        )
    else:
        make_state(float(sys.argv[3]))
    if rank == 1:
        time.sleep(8.0)
    start = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(1))
        report["collective"] = "completed"
    except Exception as exc:  # gloo raises once the process group's timeout has passed
        report["collective"] = f"{type(exc).__name__}: {exc}"[:300]
    report["waited_s"] = time.perf_counter() - start
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group after a timed-out collective


if __name__ == "__main__":
    main()
