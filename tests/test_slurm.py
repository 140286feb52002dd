"""SLURM launch, sweeps and preemption against a real slurmctld (launch/local_slurm.sh), plus the parts that need no
cluster: --dry-run scripts, config validation before submission, sweep expansion and the sweep report.

The SLURM jobs of this file are all submitted at once by one module fixture (the node declares more CPUs than it has,
so they run side by side), and each test then waits for and checks its own job: the file costs about the time of
its slowest job instead of the sum of all of them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import PYTHON, ROOT, run_cmd, tiny_overrides

from explainer.config import ConfigError, parse_overrides
from explainer.sweep import build_runs, expand, load_sweep, read_index, report_rows, write_report, yaml_scalar

SUBMIT = ROOT / "launch" / "submit.py"
REPORT = ROOT / "launch" / "sweep_report.py"
JOB_TIMEOUT_S = 300
REQUEUE_STEPS, REQUEUE_CKPT_EVERY = 48, 4


def _squeue_states(job_id: str) -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True)
    return proc.stdout.split("\n")[:-1] if proc.returncode == 0 else []


def _logs(folder: Path) -> str:
    out = []
    for path in sorted(folder.rglob("*_log.*")):
        out.append(f"--- {path} ---\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(out) or f"(no logs under {folder})"


def wait_for_job(job_id: str, job_dir: Path, timeout: float = JOB_TIMEOUT_S) -> None:
    """Until SLURM no longer lists the job (or array); submitit's own wait needs sacct, which this cluster lacks."""
    deadline = time.monotonic() + timeout
    while _squeue_states(job_id):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            raise AssertionError(f"job {job_id} still queued after {timeout}s: {_squeue_states(job_id)}\n"
                                 f"{_logs(job_dir)}")
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------------------------------
# All SLURM jobs of the file, submitted together
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Submission:
    name: str
    args: list[str]
    out: Path  # train.output_dir, or the sweep folder
    proc: subprocess.Popen | None = None
    stdout: str = ""
    job_id: str = ""
    events: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the preemption thread asks for the id too

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
        env.pop("WANDB_API_KEY", None)
        self.proc = subprocess.Popen([PYTHON, str(SUBMIT), *self.args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def submitted(self) -> str:
        """Wait for submit.py; return the job id it printed."""
        with self.lock:
            return self._submitted()

    def _submitted(self) -> str:
        if not self.job_id:
            self.stdout, _ = self.proc.communicate(timeout=JOB_TIMEOUT_S)  # several submit at once on 2 busy cores
            assert self.proc.returncode == 0, f"submit.py {self.name} failed:\n{self.stdout}"
            match = re.search(r"submitted job (?:array )?(\d+)", self.stdout)
            assert match, self.stdout
            self.job_id = match.group(1)
        return self.job_id


def _tiny(manifest: Path, classifier: Path, out: Path, steps: int = 6) -> list[str]:
    return [*tiny_overrides(manifest, out), f"classifier.checkpoint={classifier}", f"train.max_steps={steps}"]


def running_job_id(sub: Submission) -> str:
    """The id of a submission's job once it runs, from its submitit folder: on busy cores submit.py can exit after
    the job's first checkpoints, too late for a test that must act on one."""
    job_dirs = [p.name for p in (sub.out / "submitit").iterdir() if p.is_dir() and p.name.isdigit()]
    assert len(job_dirs) == 1, job_dirs
    return job_dirs[0]


def _preempt_when_checkpointed(sub: Submission) -> None:
    """Preempt the job (USR2, as `scancel --signal` from the scheduler) once it has a complete checkpoint, then let
    the requeued job start at once: SLURM holds requeued jobs for ~2 minutes (BeginTime), an operator can lift it."""
    try:
        first = sub.out / "checkpoints" / f"step_{REQUEUE_CKPT_EVERY:08d}" / "meta.json"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not first.is_file():
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        job_id = running_job_id(sub)
        sub.events["complete_at_signal"] = sorted(p.name for p in first.parent.parent.glob("step_*"))
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        sub.events["signalled"] = True
        while True:
            assert time.monotonic() < deadline, f"job never went back to PENDING: {_squeue_states(job_id)}"
            states = _squeue_states(job_id)
            if states and states[0].startswith("PENDING"):
                sub.events["pending_after_requeue"] = states[0]
                subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
                break
            time.sleep(0.2)
    except BaseException as exc:  # reported by the test
        sub.events["error"] = repr(exc)


@pytest.fixture(scope="module")
def slurm_jobs(slurm_cluster, synthetic_manifest, tiny_classifier, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    sweep_file = root / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "tiny",
        "base_config": str(ROOT / "configs" / "synthetic.yaml"),
        "method": "grid",
        # lambda_e = 1e300 (finite, so the config takes it; nan is refused) is inf in float32 and makes every loss
        # non-finite: a run that really fails, which the report must keep
        "parameters": {"loss.lambda_e": [1.0, 3.0, 1e300]},
    }))
    jobs = {
        "single": Submission("single", ["--config", "configs/synthetic.yaml", "--time", "10",
                                        *_tiny(synthetic_manifest, tiny_classifier, root / "single")],
                             root / "single"),
        # one CPU per task for the others, so that all jobs fit on the node at once ("single" keeps the defaults)
        "two_tasks": Submission("two_tasks", ["--config", "configs/synthetic.yaml", "--time", "10",
                                              "--cpus-per-task", "1", "--tasks-per-node", "2",
                                              *_tiny(synthetic_manifest, tiny_classifier, root / "two")], root / "two"),
        "sweep": Submission("sweep", ["--sweep", str(sweep_file), "--array-parallelism", "2", "--time", "10",
                                      "--cpus-per-task", "1",
                                      "--job-dir", str(root / "sweep"),
                                      *_tiny(synthetic_manifest, tiny_classifier, root / "unused")], root / "sweep"),
        "requeue": Submission("requeue", ["--config", "configs/synthetic.yaml", "--time", "10", "--cpus-per-task", "1",
                                          *_tiny(synthetic_manifest, tiny_classifier, root / "requeue",
                                                 REQUEUE_STEPS),
                                          f"train.checkpoint_every_steps={REQUEUE_CKPT_EVERY}",
                                          "train.log_every_steps=4", "train.keep_last=20"], root / "requeue"),
    }
    for sub in jobs.values():
        sub.start()
    watcher = threading.Thread(target=_preempt_when_checkpointed, args=(jobs["requeue"],), daemon=True)
    watcher.start()
    yield jobs
    watcher.join(timeout=5)
    for sub in jobs.values():
        if sub.job_id and _squeue_states(sub.job_id):
            subprocess.run(["scancel", sub.job_id])


# ----------------------------------------------------------------------------------------------------------------------
# Order matters for speed only: the first test queues every SLURM job, the tests without SLURM run while the jobs
# train, and the tests that wait for the jobs come last.
# ----------------------------------------------------------------------------------------------------------------------


def _slurm_tests_as_non_root(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """pytest on this file's SLURM tests in a subprocess that plays a non-root user (EXPLAINER_TEST_EUID); its
    EXPLAINER_SLURM_DIR is a fresh folder, so a cluster started there by mistake would show."""
    full = {**os.environ, "EXPLAINER_TEST_EUID": "1000", "EXPLAINER_SLURM_DIR": str(tmp_path / "no-cluster"), **env}
    if "EXPLAINER_REQUIRE_SLURM" not in env:
        full.pop("EXPLAINER_REQUIRE_SLURM", None)
    return subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'bt'}",
                           *args, "-m", "slurm", str(Path(__file__).resolve())],
                          cwd=ROOT, env=full, capture_output=True, text=True, timeout=300)


def test_slurm_tests_skip_with_one_line_for_non_root_unless_required(tmp_path):
    """`make test` without root: the SLURM tests are skipped with one line saying why and how to run them; with
    EXPLAINER_REQUIRE_SLURM=1 (what .ci/run exports) the same situation fails them instead."""
    n = sum(1 for _ in re.finditer(r"^@pytest\.mark\.slurm$", Path(__file__).read_text(), re.M))
    assert n >= 5
    skipped = _slurm_tests_as_non_root(tmp_path, "-n", "2", "--dist", "loadgroup")  # as `make test` runs them
    out = skipped.stdout
    assert skipped.returncode == 0 and f"{n} skipped" in out, out + skipped.stderr
    lines = [line for line in out.splitlines() if "SLURM tests skipped" in line]
    assert len(lines) == 1 and "they need root" in lines[0] and "run `make test` as root" in lines[0], out
    required = _slurm_tests_as_non_root(tmp_path, EXPLAINER_REQUIRE_SLURM="1")
    out = required.stdout
    assert required.returncode == 1 and f"{n} errors" in out and "SLURM tests skipped" not in out, out
    assert "EXPLAINER_REQUIRE_SLURM=1 but they need root" in out, out
    assert not (tmp_path / "no-cluster").exists()  # nothing was started


@pytest.mark.slurm
def test_submit_prints_job_ids_logs_and_outputs(slurm_jobs):
    for sub in slurm_jobs.values():
        job_id = sub.submitted()
        if sub.name == "sweep":
            assert f"submitted job array {job_id} (3 runs)" in sub.stdout and f"{sub.out}/sweep.json" in sub.stdout
        else:
            log = f"{sub.out}/submitit/{job_id}/{job_id}_0_log.out"
            assert f"submitted job {job_id} (slurm: 1 node(s) x " in sub.stdout and log in sub.stdout, sub.stdout
            assert f"outputs: {sub.out}" in sub.stdout and f"squeue -j {job_id}" in sub.stdout


# ----------------------------------------------------------------------------------------------------------------------
# Without SLURM
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_cluster_runs_the_same_training(synthetic_manifest, tiny_classifier, tmp_path):
    proc = run_cmd([PYTHON, str(SUBMIT), "--config", "configs/synthetic.yaml", "--cluster", "local",
                    *_tiny(synthetic_manifest, tiny_classifier, tmp_path / "run")], timeout=300)
    assert re.search(r"job \d+ done: 6/6 steps", proc.stdout), proc.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def _submit_main(args: list[str], capsys) -> tuple[int, str, str]:
    """launch/submit.py's main() in this process (it only parses, validates and prints for these cases)."""
    spec = importlib.util.spec_from_file_location("launch_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    rc = module.main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_dry_run_multi_node_script(synthetic_manifest, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "coco"
    args = ["--dry-run", "--config", "configs/coco_resnet.yaml", "--nodes", "2", "--gpus-per-node", "8",
            "--partition", "gpu", "--time", "720", "--account", "acct", "--qos", "high", "--constraint", "a100",
            "--mem-gb", "480", "--cpus-per-task", "10", "--exclude", "node[01-02]", f"train.output_dir={out}",
            f"data.manifest={synthetic_manifest}", f"classifier.checkpoint={tiny_classifier}"]
    rc, script, err = _submit_main(args, capsys)
    assert rc == 0, err
    assert script.startswith("#!/bin/bash\n")
    for line in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=720",
                 "--account=acct", "--qos=high", "--constraint=a100", "--mem=480GB", "--cpus-per-task=10",
                 "--exclude='node[01-02]'", "--signal=USR2@120", "--open-mode=append", "--job-name=explainer-coco",
                 f"--output={out}/submitit/%j/%j_0_log.out"]:
        assert f"#SBATCH {line}\n" in script, line
    assert re.search(r"\nsrun --unbuffered .* -u -m submitit\.core\._submit \S+/submitit/%j\n", script)
    assert "dry run: nothing submitted" in err
    assert not out.exists()  # nothing written, nothing queued


def test_dry_run_defaults_cpus_and_memory_from_the_workers(synthetic_manifest, tiny_classifier, tmp_path, capsys):
    """Without --cpus-per-task/--mem-gb a task would get one CPU for 8 decode workers and the partition's default
    memory: the defaults come from data.num_workers (the COCO preset has 8) and show in the script."""
    base = ["--dry-run", "--config", "configs/coco_resnet.yaml", "--nodes", "2", "--gpus-per-node", "8",
            f"train.output_dir={tmp_path / 'coco'}", f"data.manifest={synthetic_manifest}",
            f"classifier.checkpoint={tiny_classifier}"]
    rc, script, err = _submit_main(base, capsys)
    assert rc == 0, err
    assert "#SBATCH --cpus-per-task=10\n" in script  # 8 workers + 2
    assert "#SBATCH --mem=192GB\n" in script  # 8 tasks x (8 GB + 2 GB x 8 workers)
    assert "10 CPU(s) per task, 192 GB per node" in err
    assert "(offline)" in err  # W&B 'auto' is offline in SLURM tasks ...
    rc, script, err = _submit_main([*base, "data.num_workers=2", "tracking.wandb_mode=online"], capsys)
    assert rc == 0 and "#SBATCH --cpus-per-task=4\n" in script and "#SBATCH --mem=96GB\n" in script, err
    assert "(online)" in err  # ... unless the user asks for online
    rc, script, err = _submit_main([*base, "--mem-gb", "0", "--cpus-per-task", "9"], capsys)
    assert rc == 0 and "--mem=" not in script and "#SBATCH --cpus-per-task=9\n" in script, err
    assert "partition's default memory" in err
    rc, _, err = _submit_main([*base, "--cpus-per-task", "4"], capsys)
    assert rc == 2 and "--cpus-per-task 4 leaves no core" in err and "data.num_workers=8" in err, err
    rc, _, err = _submit_main([*base, "--mem-gb", "-1"], capsys)
    assert rc == 2 and "--mem-gb must be >= 0" in err, err
    rc, script, err = _submit_main([*base[:-3], "--cluster", "local", "--nodes", "1", "--gpus-per-node", "0",
                                    f"data.manifest={synthetic_manifest}", f"classifier.checkpoint={tiny_classifier}",
                                    f"train.output_dir={tmp_path / 'l'}"], capsys)
    assert rc == 0 and "(auto)" in err, err  # local runs keep 'auto'


def test_dry_run_sweep_is_one_array_with_a_cap(synthetic_manifest, tiny_classifier, tmp_path, capsys):
    args = ["--dry-run", "--sweep", "configs/sweeps/lambdas.yaml", "--gpus-per-node", "1", "--array-parallelism", "4",
            "--job-dir", str(tmp_path / "sw"), f"data.manifest={synthetic_manifest}",
            f"classifier.checkpoint={tiny_classifier}"]
    rc, script, err = _submit_main(args, capsys)
    assert rc == 0, err
    assert "#SBATCH --array=0-23%4\n" in script and "%A_%a_0_log.out" in script
    assert "--ntasks-per-node=1" in script and "--gpus-per-node=1" in script
    assert "#SBATCH --cpus-per-task=10\n" in script and "#SBATCH --mem=24GB\n" in script  # VOC base: 8 workers
    assert err.count(" -> ") == 24 and not (tmp_path / "sw").exists()


def test_bad_configs_fail_before_submission(synthetic_manifest, tiny_classifier, tmp_path, capsys):
    base = ["--config", "configs/synthetic.yaml", f"data.manifest={synthetic_manifest}",
            f"classifier.checkpoint={tiny_classifier}", f"train.output_dir={tmp_path / 'x'}"]
    cases = [
        (["loss.lambda_ee=1"], "unknown key 'loss.lambda_ee'"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        ([f"classifier.checkpoint={tmp_path / 'missing.pt'}"], "classifier.checkpoint"),
        ([f"data.manifest={tmp_path / 'nope.json'}"], "data.manifest"),
        (["data.val_split=dev"], "data.val_split: split 'dev'"),
        (["--gpus-per-node", "4", "--tasks-per-node", "2"], "one task per GPU"),
        (["--cluster", "local", "--nodes", "2"], "--nodes must be 1"),
    ]
    for extra, message in cases:
        flags = [a for a in extra if not ("=" in a and not a.startswith("--"))]
        overrides = [a for a in extra if a not in flags]
        rc, _, err = _submit_main([*flags, *base, *overrides], capsys)
        assert rc == 2 and message in err, (extra, err)
    assert not (tmp_path / "x").exists()
    rc, _, err = _submit_main(["--sweep", str(tmp_path / "none.yaml")], capsys)
    assert rc == 2 and "none.yaml does not exist" in err


def _sweep_file(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base_config": str(ROOT / "configs" / "synthetic.yaml"), **body}))
    return path


def test_sweep_expansion_grid_and_seeded_random(tmp_path):
    grid = load_sweep(_sweep_file(tmp_path, {"parameters": {"loss.lambda_e": [1.0, 2.0, 3.0],
                                                            "optim.lr": {"values": [1e-4, 1e-5]}}}))
    points = expand(grid)
    assert points == [{"loss.lambda_e": e, "optim.lr": lr} for e in (1.0, 2.0, 3.0) for lr in (1e-4, 1e-5)]
    random_body = {"method": "random", "num_samples": 50, "seed": 7, "parameters": {
        "loss.lambda_tv": {"distribution": "log_uniform", "min": 0.1, "max": 10.0},
        "loss.w_n": {"distribution": "uniform", "min": 0.1, "max": 0.6},
        "loss.w_bound": [0.4, 0.8]}}
    first = expand(load_sweep(_sweep_file(tmp_path, random_body)))
    assert first == expand(load_sweep(_sweep_file(tmp_path, random_body)))  # seeded
    assert first != expand(load_sweep(_sweep_file(tmp_path, {**random_body, "seed": 8})))
    assert all(0.1 <= p["loss.lambda_tv"] <= 10 and 0.1 <= p["loss.w_n"] <= 0.6 for p in first)
    assert sum(p["loss.lambda_tv"] < 1.0 for p in first) > 10  # log-uniform: about half below the geometric mean
    assert {p["loss.w_bound"] for p in first} == {0.4, 0.8}
    # values survive the trip through dotted overrides (1e-05 would come back from YAML as a string)
    for value in (1e-5, 0.3, 3, True, "sum"):
        assert parse_overrides([f"k={yaml_scalar(value)}"])["k"] == value


def test_sweep_runs_get_own_folders_groups_and_ids(tmp_path):
    spec = load_sweep(ROOT / "configs" / "sweeps" / "lambdas.yaml")
    runs = build_runs(spec, tmp_path / "sw", "lambdas-x", ["train.keep_last=3"])
    assert len(runs) == spec.num_samples == 24
    assert len({r.cfg.train.output_dir for r in runs}) == 24 and len({r.cfg.tracking.run_id for r in runs}) == 24
    for run in runs:
        assert run.cfg.tracking.group == "lambdas-x" and {"sweep", "lambdas"} <= set(run.cfg.tracking.tags)
        assert run.cfg.train.keep_last == 3 and run.cfg.train.epochs == 30  # CLI and sweep-file overrides
        assert run.cfg.loss.lambda_e == run.params["loss.lambda_e"] and run.cfg.optim.lr == run.params["optim.lr"]
        assert run.cfg.data.image_size == 224  # the VOC base config
    with pytest.raises(ConfigError, match="loss.w_m is swept"):
        build_runs(spec, tmp_path / "sw", "x", ["loss.w_m=0.1"])
    log_uniform_at_zero = {"distribution": "log_uniform", "min": 0, "max": 1}
    for body, message in [
        ({"parameters": {"loss.lambda_e": {"distribution": "uniform", "min": 0, "max": 1}}}, "grid needs explicit"),
        ({"parameters": {"loss.nope": [1]}}, "run 0 .*unknown key 'loss.nope'"),
        ({"method": "random", "parameters": {"loss.w_n": [1]}}, "num_samples >= 1"),
        ({"method": "random", "num_samples": 2, "parameters": {"loss.w_n": log_uniform_at_zero}}, "min > 0"),
        ({"parameters": {"loss.w_n": [1]}, "extra": 1}, "unknown key 'extra'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_runs(load_sweep(_sweep_file(tmp_path, body)), tmp_path / "sw", "x", [])


def test_report_marks_failed_unfinished_and_unstarted_runs(tmp_path):
    """Runs that never wrote summary.json stay in the table: unfinished (best val so far), failed (reason), not
    started. Their folders are written here the way the trainer and submitit leave them."""
    runs = []
    for i in range(4):
        runs.append({"index": i, "params": {"loss.w_m": 0.01 * (i + 1)}, "output_dir": str(tmp_path / f"r{i}"),
                     "job_id": f"9_{i}", "stdout": str(tmp_path / f"r{i}.out"), "stderr": str(tmp_path / f"r{i}.err")})
    (tmp_path / "r0").mkdir()
    (tmp_path / "r0" / "summary.json").write_text(json.dumps(
        {"steps": 10, "total_steps": 10, "stopped_early": False,
         "best": {"step": 10, "epoch": 0, "loss": 0.5, "mask_iou": 0.2, "improved": True}}))
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"kind": "train", "step": 5, "loss": 0.9}, {"kind": "val", "step": 5, "loss": 0.4, "mask_iou": 0.1},
        {"kind": "val", "step": 10, "loss": 0.45, "mask_iou": 0.3}]) + '\n{"kind": "va')
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2.err").write_text("Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n"
                                     "submitit ERROR - Submitted job triggered an exception\n")
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep_id": "s", "parameters": ["loss.w_m"], "runs": runs}))
    rows = report_rows(read_index(tmp_path))
    assert [(r["index"], r["status"]) for r in rows] == [
        (1, "unfinished"), (0, "finished"), (2, "failed: RuntimeError: CUDA out of memory"), (3, "not started")]
    assert rows[0]["val_loss"] == 0.4 and rows[0]["best_step"] == 5  # its lowest val loss so far
    markdown, md, csv_path = write_report(tmp_path, metric="mask_iou", maximize=True)
    assert [line.split("|")[2].strip() for line in markdown.splitlines() if line.startswith("| ")][1:] == \
        ["0", "1", "2", "3"]  # 0.2 > 0.1 mask IoU at each run's best checkpoint; no-metric runs last
    assert md.is_file() and len(csv_path.read_text().splitlines()) == 5
    assert "No run logged" not in markdown
    # a metric no run logged (mask_iou without validation segmentations): nothing ranked, and the report says why
    markdown, _, _ = write_report(tmp_path, metric="pointing", maximize=True)
    assert "**No run logged val_pointing**" in markdown and "`--metric loss` (logged: loss, mask_iou)" in markdown


# ----------------------------------------------------------------------------------------------------------------------
# Against the real controller (waiting for the jobs queued by the first test)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_single_job_trains_and_its_script_is_the_dry_run(slurm_jobs, synthetic_manifest, tiny_classifier):
    sub = slurm_jobs["single"]
    job_id = sub.submitted()
    job_dir = sub.out / "submitit" / job_id
    wait_for_job(job_id, job_dir)
    assert (sub.out / "summary.json").is_file(), _logs(job_dir)
    summary = json.loads((sub.out / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 6 and summary["world_size"] == 1
    assert (sub.out / "checkpoints" / "step_00000006" / "meta.json").is_file()
    from explainer.models import load_explainer

    model, meta = load_explainer(sub.out / "explainer.pt")
    assert model(torch.randn(1, 3, 32, 32)).full().shape == (1, len(meta["classes"]), 32, 32)
    records = [json.loads(line) for line in (sub.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [5, 6]
    assert [r["step"] for r in records if r["kind"] == "val"] == [6]
    resolved = yaml.safe_load((sub.out / "config.yaml").read_text())
    assert resolved["tracking"]["run_id"] and resolved["data"]["manifest"] == str(synthetic_manifest)
    # --dry-run prints exactly the script that was submitted
    dry = run_cmd([PYTHON, str(SUBMIT), "--dry-run", *sub.args, "train.resume=auto"])  # the folder has a run now
    submitted = (job_dir / f"{job_id}_submission.sh").read_text()
    assert dry.stdout == submitted
    # the defaults from data.num_workers=0 (CPU task): 0 + 2 CPUs, 2 GB; SLURM accepted and ran them
    assert "#SBATCH --cpus-per-task=2\n" in submitted and "#SBATCH --mem=2GB\n" in submitted


@pytest.mark.slurm
@pytest.mark.slow
def test_two_tasks_form_one_gloo_world_from_slurm(slurm_jobs):
    import submitit

    sub = slurm_jobs["two_tasks"]
    job_id = sub.submitted()
    wait_for_job(job_id, sub.out / "submitit")
    results = submitit.SlurmJob(folder=sub.out / "submitit" / "%j", job_id=job_id, tasks=[0, 1]).results()
    launchers = sorted((r["launcher"] for r in results), key=lambda x: x["rank"])
    assert [(x["rank"], x["world_size"], x["local_rank"]) for x in launchers] == [(0, 2, 0), (1, 2, 1)]
    assert launchers[0]["master_port"] == launchers[1]["master_port"] and launchers[0]["job_id"] == job_id
    summary = json.loads((sub.out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 16
    assert summary["steps"] == summary["total_steps"] == 6 and summary["best_val_loss"] < 10
    # both ranks wrote their part of the collective checkpoint
    ckpt = sub.out / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in ckpt.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_is_one_job_array_and_the_report_keeps_every_run(slurm_jobs):
    sub = slurm_jobs["sweep"]
    array_id = sub.submitted()
    wait_for_job(array_id, sub.out / "submitit")
    index = read_index(sub.out)
    assert [r["job_id"] for r in index["runs"]] == [f"{array_id}_{i}" for i in range(3)]  # one array
    script = next((sub.out / "submitit").rglob("*_submission.sh")).read_text()
    assert "#SBATCH --array=0-2%2" in script  # parallelism cap
    out_dirs = {r["output_dir"] for r in index["runs"]}
    assert len(out_dirs) == 3
    run_ids = set()
    for run in index["runs"]:
        cfg = yaml.safe_load((Path(run["output_dir"]) / "config.yaml").read_text())
        assert cfg["tracking"]["group"] == index["sweep_id"]
        assert "tiny" in cfg["tracking"]["tags"] and "sweep" in cfg["tracking"]["tags"]
        run_ids.add(cfg["tracking"]["run_id"])
        assert cfg["loss"]["lambda_e"] == run["params"]["loss.lambda_e"]
    assert len(run_ids) == 3
    proc = run_cmd([PYTHON, str(REPORT), str(sub.out)])
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "status" not in line]
    assert len(table) == 3, proc.stdout
    assert [row.split("|")[3].strip() for row in table][:2] == ["finished", "finished"]
    assert "failed: " in table[2] and "TrainingDiverged" in table[2]
    losses = [float(row.split("|")[6]) for row in table[:2]]
    assert losses == sorted(losses)  # ranked by val loss (the sweep file's default metric)
    csv_lines = (sub.out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and (sub.out / "report.md").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_to_the_planned_steps(slurm_jobs):
    sub = slurm_jobs["requeue"]
    job_id = sub.submitted()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while "pending_after_requeue" not in sub.events and "error" not in sub.events:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "error" not in sub.events, sub.events
    job_dir = sub.out / "submitit" / job_id
    wait_for_job(job_id, job_dir)
    log = (job_dir / f"{job_id}_0_log.out").read_text()
    assert "Requeued job" in log and log.count("Starting with JobEnvironment") == 2, _logs(job_dir)
    resumed = re.search(r"resumed from .*step_(\d{8}) \(step (\d+)", log)
    assert resumed, log
    assert REQUEUE_CKPT_EVERY <= int(resumed.group(2)) < REQUEUE_STEPS  # continued, not restarted nor already done
    summary = json.loads((sub.out / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == REQUEUE_STEPS
    train_steps = [json.loads(line)["step"] for line in (sub.out / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "train"]
    assert train_steps == list(range(4, REQUEUE_STEPS + 1, 4))  # each step logged once across both attempts
    run_id = yaml.safe_load((sub.out / "config.yaml").read_text())["tracking"]["run_id"]
    attempts = sorted((sub.out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(attempts) == 2, list((sub.out / "wandb").iterdir())  # the same W&B run id before and after
