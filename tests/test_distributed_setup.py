"""Process-group set-up (explainer/distributed.py): which GPU a process takes, the process-group timeout, DDP options.

The device choice is tested as logic, with the visible-device count and the launcher's variables given (no GPU here:
CUDA is what is "mocked", by passing the count). The timeout and the DDP options are observed in real 2-process gloo
worlds started by torchrun (tests/_dist_probe.py): what reached torch, not what we meant to pass.
"""

from __future__ import annotations

import json
import sys

import pytest
from _helpers import ROOT, free_port, run_cmd, run_ranks

from explainer.config import TrainConfig
from explainer.distributed import (
    DeviceBindingError,
    bind_local_device,
    check_gpus_visible,
    choose_cuda_device,
    ddp_kwargs,
)

PROBE = ROOT / "tests" / "_dist_probe.py"


@pytest.mark.parametrize(("local_rank", "local_world", "visible", "expected"), [
    (3, 8, 8, 3),  # every task sees the node's 8 GPUs: its own is cuda:LOCAL_RANK
    (3, 8, 1, 0),  # one GPU bound per task: it is cuda:0 for every task
    (0, 1, 8, 0),  # one process on a machine with 8 GPUs
    (2, 4, 8, 2),  # 4 tasks on an 8-GPU node
    (3, None, 8, 3),  # LOCAL_WORLD_SIZE not exported
])
def test_device_choice_for_both_binding_styles(local_rank, local_world, visible, expected):
    assert choose_cuda_device(local_rank, local_world, visible) == expected


@pytest.mark.parametrize(("local_rank", "local_world", "visible"), [(3, 8, 2), (5, 8, 4), (0, 2, 0), (9, None, 8)])
def test_ambiguous_binding_fails_with_a_clear_message(local_rank, local_world, visible):
    with pytest.raises(DeviceBindingError, match=f"sees {visible} GPU|no GPU is visible"):
        choose_cuda_device(local_rank, local_world, visible)


@pytest.mark.parametrize(("env", "visible", "index"), [
    ({"WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}, 8, 5),  # torchrun / submitit, all GPUs visible
    ({"WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}, 1, 0),  # one GPU per task
    ({"WORLD_SIZE": "16", "SLURM_LOCALID": "5"}, 1, 0),  # an srun task whose launcher exported no LOCAL_RANK
    ({"WORLD_SIZE": "16", "SLURM_LOCALID": "5"}, 8, 5),
])
def test_bind_makes_accelerate_and_ddp_agree(env, visible, index):
    """accelerate takes cuda:(LOCAL_RANK % device_count) and gives DDP device_ids=[LOCAL_RANK]: after the binding
    both are the chosen GPU, and the launcher's node-local rank is kept."""
    env = dict(env)
    node_local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID")))
    assert bind_local_device(env, device_count=visible) == index
    local_rank = int(env["LOCAL_RANK"])
    assert local_rank % visible == local_rank == index  # accelerate's device == DDP's device_ids[0] < visible
    assert int(env.get("EXPLAINER_NODE_LOCAL_RANK", local_rank)) == node_local


def test_bind_leaves_single_processes_alone_and_refuses_unknown_layouts():
    env = {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    assert bind_local_device(env, device_count=8) is None and env == {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    env = {"SLURM_NTASKS": "8", "SLURM_LOCALID": "3"}  # plain `python train.py` inside a multi-task allocation
    assert bind_local_device(env, device_count=8) is None and "LOCAL_RANK" not in env
    with pytest.raises(DeviceBindingError, match="neither LOCAL_RANK nor SLURM_LOCALID"):
        bind_local_device({"WORLD_SIZE": "4"}, device_count=4)
    with pytest.raises(DeviceBindingError, match="sees 2 GPUs"):
        bind_local_device({"WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}, device_count=2)


def test_a_job_given_gpus_never_trains_on_the_cpu():
    with pytest.raises(DeviceBindingError, match="gave this job 8 GPU"):
        check_gpus_visible({"SLURM_GPUS_ON_NODE": "8"}, cuda_available=False)
    check_gpus_visible({"SLURM_GPUS_ON_NODE": "8"}, cuda_available=True)
    check_gpus_visible({}, cuda_available=False)


def test_broadcast_buffers_auto_is_off_only_where_batchnorm_is_synced():
    synced = TrainConfig(sync_batchnorm=True)
    assert ddp_kwargs(synced, cuda=True, world_size=8).broadcast_buffers is False
    assert ddp_kwargs(synced, cuda=False, world_size=8).broadcast_buffers is True  # no SyncBatchNorm on CPU
    assert ddp_kwargs(synced, cuda=True, world_size=1).broadcast_buffers is True
    assert ddp_kwargs(TrainConfig(), cuda=True, world_size=8).broadcast_buffers is True
    frozen = TrainConfig(ddp_broadcast_buffers=False)
    assert ddp_kwargs(frozen, cuda=True, world_size=8).broadcast_buffers is False


def _probe(tmp_path, *args: str) -> list[dict]:
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             str(PROBE), args[0], str(tmp_path), *args[1:]], env={"ACCELERATE_USE_CPU": "1"}, timeout=300)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_ddp_options_and_timeout_reach_torch_in_a_gloo_world(tmp_path):
    """Every option differs from torch's DDP default, so each one is seen to arrive; the timeout (3 s) makes rank 0's
    collective fail while rank 1 is 8 s late (torch's default would have waited)."""
    ranks = _probe(tmp_path, "accelerator", "train.process_group_timeout_min=0.05",
                   "train.ddp_comm_hook=bf16", "train.ddp_bucket_cap_mb=1", "train.ddp_broadcast_buffers=false")
    for r in ranks:
        assert r["wrapper"] == "DistributedDataParallel"
        assert r["gradient_as_bucket_view"] is True and r["broadcast_buffers"] is False
        assert r["bucket_bytes_cap"] == 2**20 and r["comm_hooks"] == ["bf16_compress_hook"]
        assert r["grad_storages"] < r["n_grads"]  # gradients are views into a shared bucket
        assert r["grads_bf16_exact"]  # the all-reduce went through bf16
    assert "completed" not in ranks[0]["collective"] and 2.0 < ranks[0]["waited_s"] < 7.5, ranks[0]


@pytest.mark.slow
def test_evaluation_state_gets_its_own_timeout(tmp_path):
    ranks = _probe(tmp_path, "state", "0.05")
    assert "completed" not in ranks[0]["collective"] and 2.0 < ranks[0]["waited_s"] < 7.5, ranks[0]


_MAKE_ACCELERATOR_IN_RUN = """
from pathlib import Path
from explainer.config import TrainConfig
from explainer.distributed import make_accelerator
from explainer.training_loop import claim_run_folder
claim_run_folder(make_accelerator("no", None, "run", TrainConfig()), Path("run"), 3)  # what the trainer does first
print("accelerator ready")
"""


def test_every_rank_fails_with_one_message_when_the_run_folder_is_not_shared(tmp_path):
    """Two real gloo ranks whose relative run folder `run` lands in different places (each rank's working directory,
    as on nodes without a shared filesystem): both stop before training with the same message naming rank 1's host
    and folder. (In a shared folder every multi-process test passes the check; tests/test_slurm_two_nodes.py checks
    that the token file is gone afterwards.)"""
    own = [tmp_path / "node0", tmp_path / "node1"]
    for folder in own:
        folder.mkdir()
    ranks = run_ranks(_MAKE_ACCELERATOR_IN_RUN, cwds=own)
    messages = []
    for proc in ranks:
        assert proc.returncode != 0 and "accelerator ready" not in proc.stdout, proc.stdout + proc.stderr
        lines = [line.split("RunFolderNotShared: ", 1)[1] for line in proc.stderr.splitlines()
                 if "explainer.distributed.RunFolderNotShared: " in line]
        assert len(lines) == 1, proc.stderr
        messages.append(lines[0])
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"train.output_dir {own[0] / 'run'} is not shared: rank 1 on ")  # rank 0's folder
    assert "data.manifest" in messages[0]
    assert f"(its folder: {own[1] / 'run'})" in messages[0] and "rank 0 on" not in messages[0]
