"""Multi-node training for real: a two-node SLURM on this machine (launch/local_slurm.sh start --nodes 2), each slurmd
in its own network namespace with its own host name (node1, node2) and address, so that rank, world size, node-local
rank and the rendezvous address come from SLURM (and from torchrun's c10d rendezvous) exactly as on a cluster.

The jobs the selected tests need are all queued at once by one module fixture (the nodes declare more CPUs than the
machine has, so they run side by side); each test then waits for its own. Moments that must fall in the middle of a
run are pinned by suspending the job (`scontrol suspend`, SIGSTOP to every task) once its first checkpoint exists:
the event (a requeue, a dead task) then hits a run that cannot have finished, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from _helpers import PYTHON, ROOT, free_port
from conftest import LOCAL_SLURM
from safetensors.torch import load_file
from test_slurm import REPORT, Submission, _logs, _squeue_states, running_job_id, wait_for_job
from test_training_loop import FLOAT64_ATOL, _interleaved_manifest, assert_same_weights, explainer_args, state_of

from explainer.config import ExplainerRunConfig, load_config
from explainer.data.loader import make_train_loader, read_manifest

STEPS, CKPT_EVERY = 12, 2  # one epoch of the tiny shards at global batch 8
PG_TIMEOUT_MIN = 0.5  # the node-death job's process-group timeout: a hang would show as 30 s, not 30 min
JOB_TIMEOUT_S = 300
FIRST_CKPT = f"step_{CKPT_EVERY:08d}"


def _common(out: Path, manifest: Path, classifier: Path, *extra: str) -> list[str]:
    """The same run everywhere: float64 SGD (as the 1-vs-2-process test), global batch 8, no shuffle buffer, one
    epoch; checkpoints and validations every 2 steps (they do not change the weights) so that there is something to
    resume from early."""
    return [*explainer_args(manifest, classifier, out), "data.shuffle_buffer=0", "train.seed=0",
            f"train.max_steps={STEPS}", f"train.checkpoint_every_steps={CKPT_EVERY}",
            f"train.val_every_steps={CKPT_EVERY}", "train.keep_last=20", "tracking.wandb_mode=disabled",
            "optim.batch_policy=reproduce", "data.batch_size=8", "optim.optimizer=sgd", "optim.lr=0.5",
            "train.dtype=float64", *extra]


def _submit_args(nodes: int, tasks: int, common: list[str]) -> list[str]:
    """explainer submit on the local cluster: the default --cluster slurm, as on a GPU cluster (one CPU per task)."""
    return ["--nodes", str(nodes), "--tasks-per-node", str(tasks), "--cpus-per-task", "1", "--time", "10", *common]


@dataclass
class Proc:
    """A run started without sbatch (torchrun on both nodes, or one plain process), waited for like a job."""

    name: str
    out: Path
    cmds: list[list[str]]
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT), **self.env}
        self.out.mkdir(parents=True, exist_ok=True)
        for i, cmd in enumerate(self.cmds):
            log = open(self.out.parent / f"{self.out.name}.{i}.log", "w")  # noqa: SIM115 (closed by the child)
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))  # kill(): its whole process group
            log.close()

    def kill(self) -> None:
        """Each command with its children (local_slurm.sh exec runs torchrun as a child in the node's namespace)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait(self) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=JOB_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        logs = "\n".join(f"--- {p} ---\n{p.read_text()[-3000:]}" for p in sorted(self.out.parent.glob(
            f"{self.out.name}.*.log")))
        assert all(p.returncode == 0 for p in self.procs), f"{self.name}: {[p.returncode for p in self.procs]}\n{logs}"


def _on_node(node: int, *cmd: str) -> list[str]:
    return ["bash", str(LOCAL_SLURM), "exec", f"node{node}", "--", *cmd]


def _torchrun_two_nodes(out: Path, common: list[str]) -> Proc:
    """One torchrun per node namespace, c10d rendezvous hosted on node1 (its host name, as on a cluster)."""
    port, rdzv_id = free_port(), f"explainer-{os.getpid()}"
    cmds = [_on_node(node, PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"node1:{port}", "--rdzv-id", rdzv_id,
                     "explainer/train.py", *common) for node in (1, 2)]
    return Proc("torchrun", out, cmds, env={"ACCELERATE_USE_CPU": "1"})


def _one_process_manifest(manifest: Path, out: Path) -> Path:
    """The shards laid out so that one process sees, at step j, both ranks' j-th batches (test_training_loop)."""
    cfg = load_config(ExplainerRunConfig, None, ["data.image_size=32", "data.batch_size=4", "data.num_workers=0",
                                                 "data.shuffle_buffer=0"])
    rank_batches = []
    for rank in range(2):
        stream = make_train_loader(cfg.data, read_manifest(manifest), "train", rank=rank, world_size=2, seed=0,
                                   drop_unlabelled=True)
        stream.set_epoch(0)
        rank_batches.append([list(b["key"]) for b in stream])
    assert len(rank_batches[0]) == STEPS
    return _interleaved_manifest(manifest, rank_batches, out)


# ----------------------------------------------------------------------------------------------------------------------
# Moments in the middle of a run, pinned by suspending the job
# ----------------------------------------------------------------------------------------------------------------------


def _wait_for_first_checkpoint(sub: Submission) -> tuple[str, Path]:
    """The job id and its checkpoints folder, once the first checkpoint is complete (watched without waiting for
    submit.py to exit: see running_job_id)."""
    meta = sub.out / "checkpoints" / FIRST_CKPT / "meta.json"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not meta.is_file():
        assert time.monotonic() < deadline, f"no checkpoint appeared\n{_logs(sub.out / 'submitit')}"
        time.sleep(0.05)
    return running_job_id(sub), meta.parent.parent


def _suspend_at_first_checkpoint(sub: Submission) -> str:
    job_id, checkpoints = _wait_for_first_checkpoint(sub)
    subprocess.run(["scontrol", "suspend", job_id], check=True)
    sub.events["checkpoints_at_event"] = sorted(p.name for p in checkpoints.glob("step_*"))
    return job_id


def _start_when_pending(job_id: str) -> None:
    """A requeued job waits (BeginTime, or held after a requeue while suspended); an operator can start it now."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        states = _squeue_states(job_id)
        if states and states[0].startswith("PENDING"):
            subprocess.run(["scontrol", "release", job_id], capture_output=True)  # no-op unless held
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
            return
        assert time.monotonic() < deadline, f"job never went back to PENDING: {states}"
        time.sleep(0.2)


def _requeue_by_operator(sub: Submission) -> None:
    job_id = _suspend_at_first_checkpoint(sub)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    _start_when_pending(job_id)


def _preempt_with_usr2(sub: Submission) -> None:
    """USR2 to every task (as the scheduler's --signal) at the first checkpoint: submitit's handler on rank 0 calls
    TrainJob.checkpoint and requeues the job itself. Not pinned by a suspension (a step that was just resumed drops
    signals); rank 0 leaves at once on USR2, with 10 of 12 steps to go, and the test checks it was mid-run."""
    job_id, checkpoints = _wait_for_first_checkpoint(sub)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    sub.events["checkpoints_at_event"] = sorted(p.name for p in checkpoints.glob("step_*"))
    _start_when_pending(job_id)


def _task_pid(job_id: str, rank: int) -> int:
    """The pid of a job's task (its submitit python process), found through its SLURM variables."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"submitit.core._submit" not in cmdline:
                continue
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode() and env.get(b"SLURM_PROCID") == str(rank).encode():
            return int(proc.name)
    raise AssertionError(f"no task of rank {rank} of job {job_id} found")


def _kill_node2_task(sub: Submission) -> None:
    """Node 2's task dies (SIGKILL, as when its node goes away); the job is let run again and rank 0 must notice."""
    job_id = _suspend_at_first_checkpoint(sub)
    pid = _task_pid(job_id, rank=1)
    os.kill(pid, signal.SIGKILL)
    sub.events["killed_at"] = time.monotonic()
    subprocess.run(["scontrol", "resume", job_id], check=True)


def _watch(sub: Submission, action: Callable[[Submission], None]) -> threading.Thread:
    def run() -> None:
        try:
            action(sub)
            sub.events["done"] = True
        except BaseException as exc:  # reported by the test
            sub.events["error"] = repr(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_events(sub: Submission) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while "done" not in sub.events and "error" not in sub.events:
        assert time.monotonic() < deadline, sub.events
        time.sleep(0.2)
    assert "error" not in sub.events, sub.events


# ----------------------------------------------------------------------------------------------------------------------
# All jobs of the selected tests, queued together
# ----------------------------------------------------------------------------------------------------------------------

NEEDS = {
    "test_two_nodes_equal_one_node_two_processes_and_one_process": ("nodes2", "tasks2", "torchrun", "one"),
    "test_requeue_restarts_both_nodes_and_the_run_equals_the_uninterrupted_one": ("nodes2", "requeue", "usr2"),
    "test_dead_node_fails_the_job_on_the_surviving_rank_and_a_resubmission_resumes": ("nodes2", "death"),
    "test_sweep_array_over_both_nodes_is_collected_by_the_report": ("sweep",),
}


@pytest.fixture(scope="module")
def two_node_jobs(request, slurm_cluster, synthetic_manifest, tiny_classifier, tmp_path_factory):
    wanted = {key for item in request.session.items if item.module is request.module
              for key in NEEDS.get(item.originalname, ())}
    root = tmp_path_factory.mktemp("two_nodes")
    m, c = synthetic_manifest, tiny_classifier
    jobs: dict[str, Submission | Proc] = {}
    if "nodes2" in wanted:
        jobs["nodes2"] = Submission("nodes2", _submit_args(2, 1, _common(root / "nodes2", m, c)), root / "nodes2")
    if "tasks2" in wanted:
        jobs["tasks2"] = Submission("tasks2", _submit_args(1, 2, _common(root / "tasks2", m, c)), root / "tasks2")
    if "torchrun" in wanted:
        jobs["torchrun"] = _torchrun_two_nodes(root / "torchrun", _common(root / "torchrun", m, c))
    if "one" in wanted:
        one_manifest = _one_process_manifest(m, root / "interleaved")
        jobs["one"] = Proc("one", root / "one", [[PYTHON, "explainer/train.py",
                                                  *_common(root / "one", one_manifest, c)]])
    if "requeue" in wanted:
        jobs["requeue"] = Submission("requeue", _submit_args(2, 1, _common(root / "requeue", m, c)), root / "requeue")
    if "usr2" in wanted:
        jobs["usr2"] = Submission("usr2", _submit_args(2, 1, _common(root / "usr2", m, c)), root / "usr2")
    if "death" in wanted:
        jobs["death"] = Submission("death", _submit_args(2, 1, _common(
            root / "death", m, c, f"train.process_group_timeout_min={PG_TIMEOUT_MIN}")), root / "death")
    if "sweep" in wanted:
        sweep_file = root / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({"name": "nodes", "base_config": str(ROOT / "configs" / "synthetic.yaml"),
                                              "method": "grid", "parameters": {"loss.lambda_e": [1.0, 3.0]}}))
        common = [*explainer_args(m, c, root / "unused"), f"train.max_steps={CKPT_EVERY}",
                  "tracking.wandb_mode=disabled"]
        jobs["sweep"] = Submission("sweep", ["--sweep", str(sweep_file), "--job-dir", str(root / "sweep"),
                                             "--array-parallelism", "2", *_submit_args(2, 1, common)], root / "sweep")
    for job in jobs.values():
        job.start()
    watchers = [_watch(jobs[key], action) for key, action in (("requeue", _requeue_by_operator),
                                                             ("usr2", _preempt_with_usr2),
                                                             ("death", _kill_node2_task)) if key in jobs]
    yield jobs
    for thread in watchers:
        thread.join(timeout=5)
    for job in jobs.values():
        if isinstance(job, Submission) and job.job_id and _squeue_states(job.job_id):
            subprocess.run(["scancel", job.job_id])
        if isinstance(job, Proc):
            job.kill()


def _finished(sub: Submission) -> list[dict]:
    """Wait for a submit.py job; return both tasks' results (summary + launcher), rank order."""
    job_id = sub.submitted()
    job_dir = sub.out / "submitit" / job_id
    wait_for_job(job_id, job_dir)
    assert (sub.out / "summary.json").is_file(), _logs(job_dir)
    results = []
    for path in sorted(job_dir.glob(f"{job_id}_*_result.pkl")):
        with open(path, "rb") as handle:
            status, value = pickle.load(handle)
        assert status == "success", (path, value)
        results.append(value)
    return sorted(results, key=lambda r: r["launcher"]["rank"])


def _task_log(sub: Submission, rank: int) -> str:
    """stdout then stderr of one task of a submit.py job (submitit writes its own lines to stdout)."""
    job_dir = sub.out / "submitit" / sub.job_id
    return "".join((job_dir / f"{sub.job_id}_{rank}_log.{kind}").read_text() for kind in ("out", "err"))


# ----------------------------------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
# not `numerics`: a float64 comparison (no BLAS-path rounding at FLOAT64_ATOL), and the in-process DDP-vs-one-process
# comparisons (tests/test_training_loop.py) are rerun on both MKL paths; the launch path here has no kernel choice
def test_two_nodes_equal_one_node_two_processes_and_one_process(two_node_jobs):
    """2 nodes x 1 task (sbatch), 1 node x 2 tasks (sbatch), 2 nodes x 1 process (torchrun, c10d) and 1 process
    give the same float64 weights to rounding (FLOAT64_ATOL of the 1-vs-2-process test: same sums, other order)."""
    nodes2 = _finished(two_node_jobs["nodes2"])
    launchers = [r["launcher"] for r in nodes2]
    assert [(x["rank"], x["world_size"], x["local_rank"], x["host"]) for x in launchers] == \
        [(0, 2, 0, "node1"), (1, 2, 0, "node2")]  # two hosts, node-local rank 0 on each
    assert {x["master_addr"] for x in launchers} == {"node1"}  # from SLURM's node list, not localhost
    tasks2 = [r["launcher"] for r in _finished(two_node_jobs["tasks2"])]
    assert [(x["rank"], x["local_rank"]) for x in tasks2] == [(0, 0), (1, 1)] and tasks2[0]["host"] == tasks2[1]["host"]
    for key in ("torchrun", "one"):
        two_node_jobs[key].wait()
    runs = {key: two_node_jobs[key].out for key in ("nodes2", "tasks2", "torchrun", "one")}
    summaries = {key: json.loads((out / "summary.json").read_text()) for key, out in runs.items()}
    assert {key: (s["world_size"], s["global_batch"], s["steps"]) for key, s in summaries.items()} == {
        "nodes2": (2, 8, STEPS), "tasks2": (2, 8, STEPS), "torchrun": (2, 8, STEPS), "one": (1, 8, STEPS)}
    for key in ("nodes2", "tasks2", "torchrun"):
        assert_same_weights(runs[key] / "explainer_last.pt", runs["one"] / "explainer_last.pt", atol=FLOAT64_ATOL)
        assert not (runs[key] / ".rank0-token").exists()  # the shared-folder check cleans up
    # not vacuous: after the first checkpoint the weights still moved by far more than the tolerance
    early = load_file(runs["one"] / "checkpoints" / FIRST_CKPT / "model.safetensors")
    final = state_of(runs["one"] / "explainer_last.pt")
    assert early.keys() == final.keys() and max((early[k] - final[k]).abs().max() for k in final) > 1e-3


@pytest.mark.slurm
@pytest.mark.slow
def test_requeue_restarts_both_nodes_and_the_run_equals_the_uninterrupted_one(two_node_jobs):
    """`scontrol requeue` (an operator) and USR2 (the scheduler's preemption signal, submitit requeues): both nodes
    start again, resume from the same checkpoint and end with the uninterrupted 2-node run's weights, bit for bit."""
    straight = two_node_jobs["nodes2"].out
    _finished(two_node_jobs["nodes2"])
    for key in ("requeue", "usr2"):
        sub = two_node_jobs[key]
        _wait_events(sub)
        assert FIRST_CKPT in sub.events["checkpoints_at_event"]
        results = _finished(sub)
        assert [(r["launcher"]["host"], r["launcher"]["restart_count"]) for r in results] == \
            [("node1", 1), ("node2", 1)], key  # both nodes ran again, as the requeued job
        for rank in (0, 1):
            log = _task_log(sub, rank)
            assert log.count("Starting with JobEnvironment") == 2, (key, rank, log[-3000:])
        log0 = _task_log(sub, 0)
        resumed = re.findall(r"resumed from \S+step_(\d{8}) \(step (\d+)", log0)
        assert len(resumed) == 1 and CKPT_EVERY <= int(resumed[0][1]) < STEPS, (key, resumed)
        assert all(r["steps"] == STEPS for r in results)  # both ranks ran to the same end
        if key == "usr2":
            # ours (the step finished, a checkpoint on every rank), then submitit's handler, which requeues; its
            # "Requeued job" line may never be written: the requeue's SIGTERM can end the task first. (The task log
            # joins stdout and stderr, so the order of the two lines in it says nothing.)
            assert re.search(r"SIGUSR2: stopped after step \d+; checkpoint", log0), log0[-3000:]
            assert "Caught signal SIGUSR2" in log0, log0[-3000:]
            assert "Requeued job" in log0 or "DUE TO JOB REQUEUE" in log0, log0[-3000:]
        train = [json.loads(line)["step"] for line in (sub.out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
        assert train == sorted(set(train)) and train[-1] == STEPS, (key, train)  # each step logged once
        assert_same_weights(sub.out / "explainer_last.pt", straight / "explainer_last.pt")


@pytest.mark.slurm
@pytest.mark.slow
def test_dead_node_fails_the_job_on_the_surviving_rank_and_a_resubmission_resumes(two_node_jobs):
    """Node 2's task is killed mid-run: rank 0 (node 1) fails with a message well within the process-group timeout
    (no hang), the job leaves the queue, and submitting the same run again with train.resume=auto resumes from the
    newest checkpoint and ends with the uninterrupted run's weights."""
    sub = two_node_jobs["death"]
    _wait_events(sub)
    job_id = sub.submitted()
    job_dir = sub.out / "submitit" / job_id
    wait_for_job(job_id, job_dir, timeout=PG_TIMEOUT_MIN * 60 + 60)
    failed_after = time.monotonic() - sub.events["killed_at"]
    assert failed_after < PG_TIMEOUT_MIN * 60 + 30, failed_after
    assert not (sub.out / "summary.json").exists()
    with open(job_dir / f"{job_id}_0_result.pkl", "rb") as handle:
        status, trace = pickle.load(handle)
    assert status == "error", status
    assert re.search(r"(Connection closed by peer|Connection reset|timed out|Timed out)", trace), trace[-3000:]
    resubmit = Submission("resubmit", [*sub.args, "train.resume=auto"], sub.out)
    resubmit.start()
    results = _finished(resubmit)
    log0 = _task_log(resubmit, 0)
    resumed = re.search(r"resumed from \S+step_(\d{8}) \(step (\d+)", log0)
    assert resumed and CKPT_EVERY <= int(resumed.group(2)) < STEPS, log0[-3000:]
    assert [r["launcher"]["host"] for r in results] == ["node1", "node2"]
    _finished(two_node_jobs["nodes2"])
    assert_same_weights(sub.out / "explainer_last.pt", two_node_jobs["nodes2"].out / "explainer_last.pt")


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_array_over_both_nodes_is_collected_by_the_report(two_node_jobs):
    """A λ sweep as one job array whose every task spans both nodes; sweep-report lists every run as finished."""
    sub = two_node_jobs["sweep"]
    array_id = sub.submitted()
    wait_for_job(array_id, sub.out / "submitit")
    index = json.loads((sub.out / "sweep.json").read_text())
    assert [r["job_id"] for r in index["runs"]] == [f"{array_id}_{i}" for i in range(2)]
    for run in index["runs"]:
        summary = json.loads((Path(run["output_dir"]) / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == CKPT_EVERY
        folder = Path(run["stdout"]).parent
        hosts = set()
        for path in folder.glob("*_result.pkl"):
            with open(path, "rb") as handle:
                hosts.add(pickle.load(handle)[1]["launcher"]["host"])
        assert hosts == {"node1", "node2"}, (run, hosts)
    proc = subprocess.run([PYTHON, str(REPORT), str(sub.out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "status" not in line]
    assert len(table) == 2 and all(row.split("|")[3].strip() == "finished" for row in table), proc.stdout
