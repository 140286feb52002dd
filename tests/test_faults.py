"""Faults never cost a run (issue 17): a diverged run saves nothing and resume falls back past bad checkpoints, one
writer per run folder (real lock contention between real processes, kill -9 leaves no stale lock), a full disk (a
real tmpfs) and user mistakes give one line naming the file, not a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _helpers import PYTHON, ROOT, make_synthetic_shards, run_cmd, run_ranks, tiny_overrides

from explainer.config import ExplainerRunConfig, load_config
from explainer.models.model_files import unwrap
from explainer.recipes import ExplainerRecipe
from explainer.run_checkpoints import inspect
from explainer.training_loop import TrainingDiverged, fit

TRAIN = "explainer/train.py"


def _args(manifest: Path, classifier: Path, out: Path, *extra: str) -> list[str]:
    return [PYTHON, TRAIN, "--config", "configs/synthetic.yaml", *tiny_overrides(manifest, out),
            f"classifier.checkpoint={classifier}", "explainer.arch=tiny_unet", "tracking.wandb_mode=disabled", *extra]


def _one_line_error(proc: subprocess.CompletedProcess, code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert needle in last, last


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# ----------------------------------------------------------------------------------------------------------------------
# 1. A diverged run never writes a checkpoint; --resume auto falls back past bad ones
# ----------------------------------------------------------------------------------------------------------------------


class _PoisonRecipe(ExplainerRecipe):
    """At one call, the mask head's bias becomes NaN after the forward pass: what an overflowing update does (an lr
    of 1e38 cannot be relied on to overflow on cue). The loss and gradients of that step stay finite, so the step
    is applied and the weights are non-finite when the checkpoint is due."""

    def __init__(self, cfg, poison_call: int):
        super().__init__(cfg)
        self.calls, self.poison_call = 0, poison_call

    def train_step(self, model, batch, precision):
        result = super().train_step(model, batch, precision)
        self.calls += 1
        if self.calls == self.poison_call:
            with torch.no_grad():
                unwrap(model).head.bias.fill_(float("nan"))
        return result


def test_diverged_weights_are_not_saved_and_resume_auto_falls_back(synthetic_manifest, tiny_classifier, tmp_path,
                                                                  capsys):
    """Before: the NaN weights were saved as step 4 (called the 'last good checkpoint'), rotation deleted older
    good ones, and --resume auto picked the poisoned one."""
    out = tmp_path / "run"
    overrides = [*tiny_overrides(synthetic_manifest, out), f"classifier.checkpoint={tiny_classifier}",
                 "explainer.arch=tiny_unet", "tracking.wandb_mode=disabled", "train.max_steps=6",
                 "train.checkpoint_every_steps=2", "train.val_every_steps=2", "train.keep_last=1"]
    cfg = load_config(ExplainerRunConfig, ROOT / "configs" / "synthetic.yaml", overrides)
    with pytest.raises(TrainingDiverged) as stopped:
        fit(_PoisonRecipe(cfg, poison_call=4))
    good = out / "checkpoints" / "step_00000002"
    assert "non-finite weights or optimizer state at step 4" in str(stopped.value)
    assert str(stopped.value).endswith(f"Last finite checkpoint: {good}")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"] and inspect(good) is None

    # A poisoned checkpoint written by an older version: --resume auto says so and resumes from step 2.
    poisoned = out / "checkpoints" / "step_00000004"
    import shutil

    shutil.copytree(good, poisoned)
    optimizer = torch.load(poisoned / "optimizer.bin", weights_only=True)
    optimizer["state"][0]["exp_avg"].fill_(float("nan"))
    torch.save(optimizer, poisoned / "optimizer.bin")
    (poisoned / "meta.json").write_text(json.dumps({**json.loads((good / "meta.json").read_text()), "step": 4}))
    from explainer.train import main

    capsys.readouterr()
    assert main(_args(synthetic_manifest, tiny_classifier, out, "train.max_steps=4", "train.keep_last=1",
                      "train.checkpoint_every_steps=2", "train.val_every_steps=2", "--resume", "auto")[2:]) == 0
    said = capsys.readouterr().out
    assert f"skipping checkpoint {poisoned}: {poisoned / 'optimizer.bin'}: " in said, said[-3000:]
    assert "non-finite values" in said and f"resumed from {good} (step 2," in said
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert inspect(poisoned) is None  # step 4 written again by the resumed run, replacing the poisoned one


# ----------------------------------------------------------------------------------------------------------------------
# 2. One writer per run folder
# ----------------------------------------------------------------------------------------------------------------------


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (path.is_file() and path.stat().st_size):
        assert proc.poll() is None, "the holder ended before the test could contend with it"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_second_run_is_refused_and_kill9_leaves_no_stale_lock(synthetic_manifest, tiny_classifier, tmp_path):
    """Two real trainers into one folder: the second stops at once naming the first (host, pid); after kill -9 of
    the first, a third starts. Before: both ran and deleted each other's in-progress checkpoints."""
    out = tmp_path / "run"
    holder = subprocess.Popen(_args(synthetic_manifest, tiny_classifier, out, "train.max_steps=100000",
                                    "train.val_every_steps=100000"),
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / "config.yaml", holder)  # written once the lock is held
        holder.send_signal(signal.SIGSTOP)  # still alive and holding the lock, but no longer competing for the CPU
        second = run_cmd(_args(synthetic_manifest, tiny_classifier, out, "train.max_steps=2"), check=False)
        _one_line_error(second, 2, f"train.output_dir {out} is in use by another run (host {os.uname().nodename}, "
                                   f"pid {holder.pid}, since ")
        assert load_config(ExplainerRunConfig, out / "config.yaml").train.max_steps == 100000  # the holder's
        assert holder.poll() is None, "the holder must still be alive"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    third = run_cmd(_args(synthetic_manifest, tiny_classifier, out, "train.max_steps=1"))
    assert json.loads((out / "summary.json").read_text())["steps"] == 1, third.stdout[-2000:]


_LOCK = """
import json, sys
from accelerate import Accelerator
from explainer.run_errors import UserError
from explainer.run_lock import acquire_shared
accelerator = Accelerator(cpu=True)
try:
    lock = acquire_shared(accelerator, sys.argv[1])
    print(json.dumps({"holder": lock.holder, "held": lock.held}))
except UserError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def test_only_rank0_locks_and_a_refusal_reaches_every_rank(tmp_path):
    """2 gloo ranks: when the folder is busy both stop with the holder's name (no rank left waiting in a
    collective); when it is free rank 0 holds the lock and rank 1 learns rank 0's id."""
    from explainer.run_lock import acquire

    def on_two_ranks() -> list[dict]:
        return [json.loads(p.stdout.strip().splitlines()[-1]) for p in run_ranks(_LOCK, args=[str(tmp_path / "run")])]

    busy = acquire(tmp_path / "run")  # this test process is the other run
    try:
        results = on_two_ranks()
    finally:
        busy.release()
    busy_message = f"train.output_dir {tmp_path / 'run'} is in use by another run (host {os.uname().nodename}, " \
                   f"pid {os.getpid()}, since "
    assert all(r.get("error", "").startswith(busy_message) for r in results), results
    results = on_two_ranks()
    assert [r["held"] for r in results] == [True, False], results
    assert results[0]["holder"] == results[1]["holder"] and "pid" in results[0]["holder"]


# ----------------------------------------------------------------------------------------------------------------------
# 4. A full disk and user errors: one line naming the file
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs of a given size (root can mount one). Elsewhere a skip that says why; under CI=true a failure."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                              text=True)
        if proc.returncode:
            why = proc.stderr.strip() or "mount failed"
            reason = f"cannot mount a tmpfs to fill a disk for real ({why}); mounting needs root"
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true: {reason}", pytrace=False)
            pytest.skip(reason)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_during_a_save_names_the_folder_and_keeps_the_last_checkpoint(small_tmpfs):
    """Before: `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ...` from deep in torch,
    and the half-written temporary folder stayed, holding the space."""
    from accelerate import Accelerator

    from explainer.run_checkpoints import CheckpointError, CheckpointManager, TrainerState

    disk = small_tmpfs("1200k")
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(300, 300)  # 352 KiB of weights, 704 KiB of Adam moments once stepped
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    manager = CheckpointManager(disk / "run", keep_last=3)
    first = manager.save(accelerator, TrainerState(step=1))  # no Adam state yet: fits
    model(torch.ones(2, 300)).sum().backward()
    optimizer.step()
    with pytest.raises(CheckpointError) as err:
        manager.save(accelerator, TrainerState(step=2))
    message = str(err.value)
    assert f"cannot write checkpoint {manager.root}/.tmp-step_00000002." in message
    assert "no space left on device" in message and message.endswith(f"the last complete checkpoint is {first}, "
                                                                      "untouched")
    assert [p.name for p in manager.root.iterdir()] == ["step_00000001"] and inspect(first) is None


def test_user_errors_are_one_line_with_exit_2(synthetic_manifest, tiny_classifier, tmp_path, capsys):
    """Before: 10-25 lines of traceback for each (and a meta.json with a wrong type, a run folder as a checkpoint).
    In this process (explainer.train.main, what the command runs after the interpreter starts): seconds, not a
    minute of interpreter starts; SystemExit with the code proves nothing escaped as a traceback."""
    from explainer.train import main

    def refused(*extra: str) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            main(_args(synthetic_manifest, tiny_classifier, *extra)[2:])
        return stop.value.code, capsys.readouterr().err.strip().splitlines()[-1]

    (tmp_path / "a-file").write_text("x")
    code, line = refused(tmp_path / "a-file")
    assert code == 2 and f"train.output_dir='{tmp_path / 'a-file'}' exists and is not a folder" in line, line
    code, line = refused(tmp_path / "x", "loss.lambda_e=[1,")
    assert code == 2 and "override 'loss.lambda_e=[1,': the value is not valid YAML" in line, line

    run = tmp_path / "run"
    assert main(_args(synthetic_manifest, tiny_classifier, run, "train.max_steps=1")[2:]) == 0
    code, line = refused(tmp_path / "other", "--resume", str(run))
    assert code == 2 and line.startswith(f"error: train.resume='{run}' is a run folder; name one of its "
                                         "checkpoints/step_* folders"), line
    meta = run / "checkpoints" / "step_00000001" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "epoch": [0]}))
    code, line = refused(tmp_path / "other", "--resume", str(meta.parent))
    assert code == 2 and f"cannot be resumed from: {meta}: meta.json.epoch: expected int, got list [0]" in line, line

    from explainer.models import load_explainer

    _, info = load_explainer(run)  # --checkpoint <run folder> means its explainer.pt
    assert info["arch"] == "tiny_unet"
    with pytest.raises(FileNotFoundError, match=f"explainer checkpoint {tmp_path} is a folder without explainer.pt"):
        load_explainer(tmp_path)


def test_disk_full_stops_training_with_one_line_and_a_resumable_folder(synthetic_manifest, tiny_classifier,
                                                                      small_tmpfs, capsys):
    """The trainer on a real tmpfs that fills up at its second checkpoint: exit 1, one line naming the folder, the
    reason and the last complete checkpoint, which a resume then uses."""
    from explainer.train import main

    disk = small_tmpfs("16m")
    out = disk / "run"
    steps = ["train.checkpoint_every_steps=1", "train.val_every_steps=100"]
    assert main(_args(synthetic_manifest, tiny_classifier, out, "train.max_steps=1", *steps)[2:]) == 0
    used = int(subprocess.run(["df", "--output=used", "-B1", str(disk)], capture_output=True, text=True,
                              check=True).stdout.split()[-1])
    explainer_bytes = (out / "explainer.pt").stat().st_size
    # room for the next explainer.pt (written beside the old one, then renamed) but not for a checkpoint (3x that)
    subprocess.run(["mount", "-o", f"remount,size={used + explainer_bytes + (64 << 10)}", str(disk)], check=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(_args(synthetic_manifest, tiny_classifier, out, "train.max_steps=2", *steps, "--resume", "auto")[2:])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    last = out / "checkpoints" / "step_00000001"
    assert stop.value.code == 1 and line.startswith(f"error: cannot write checkpoint {out / 'checkpoints'}/"
                                                    ".tmp-step_00000002."), line
    assert "no space left on device" in line and line.endswith(f"the last complete checkpoint is {last}, untouched")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"] and inspect(last) is None


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    """NFS without lockd answers ENOLCK; no such mount here, so os.lockf is replaced (the one stand-in of this file).
    The run must go on, unprotected and saying so, rather than become impossible on such a filesystem."""
    import errno

    import explainer.run_lock as run_lock
    from explainer.logs import configure_logging

    configure_logging(0)

    def no_locks(fd, cmd, length):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.os, "lockf", no_locks)
    lock = run_lock.acquire(tmp_path / "run")
    assert not lock.held and not lock.enforced
    assert "this filesystem has no working file locks (No locks available)" in capsys.readouterr().out


_SAVE_ON_A_FULL_DISK = """
import json, sys, torch
from accelerate import Accelerator
from explainer.run_checkpoints import CheckpointError, CheckpointManager, TrainerState
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Linear(300, 300)
model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
manager = CheckpointManager(sys.argv[1], keep_last=3, writer="two-ranks")
manager.save(accelerator, TrainerState(step=1))
model(torch.ones(2, 300)).sum().backward()
optimizer.step()
try:
    manager.save(accelerator, TrainerState(step=2))
    print(json.dumps({"saved": True}))
except CheckpointError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def test_a_save_failing_on_rank0_stops_every_rank(small_tmpfs):
    """2 gloo ranks on one full disk, rank 0's weights do not fit: both ranks raise (rank 1 pointing to rank 0, or
    naming its own full disk when its write came second) instead of rank 1 waiting in the next collective until the
    process-group timeout (30 min)."""
    disk = small_tmpfs("1200k")
    procs = run_ranks(_SAVE_ON_A_FULL_DISK, args=[str(disk / "run")], timeout=180)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.stdout.strip().splitlines()[-1]) for p in procs]
    assert "rank 0: no space left on device" in results[0]["error"], results
    # rank 1's own small file (its random states) may also meet the full disk first: then it names its own failure
    assert any(why in results[1]["error"] for why in ("on another rank (its message says why)",
                                                       "rank 1: no space left on device")), results
    last = disk / "run" / "checkpoints" / "step_00000001"
    assert all(r["error"].endswith(f"the last complete checkpoint is {last}, untouched") for r in results), results
    assert [p.name for p in last.parent.iterdir()] == ["step_00000001"] and inspect(last) is None


_START_UP = """
import errno, json, os, sys, time
from pathlib import Path
from explainer.config import TrainConfig
from explainer.distributed import make_accelerator
from explainer.run_errors import RunError
from explainer.training_loop import claim_run_folder
accelerator = None
results = {}
for item in sys.argv[1:]:
    scenario, folder = item.split("=", 1)
    accelerator = accelerator or make_accelerator("no", None, folder, TrainConfig())  # what the trainer does first
    lockf = os.lockf
    if scenario == "lockf_eio" and accelerator.is_main_process:  # stand-in: no filesystem here answers EIO
        def eio(fd, cmd, length):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.lockf = eio
    start = time.time()
    try:
        lock, _ = claim_run_folder(accelerator, Path(folder), 3)
        lock.release()
        results[scenario] = "started"
    except RunError as exc:
        results[scenario] = f"{type(exc).__name__}: {exc}"
    os.lockf = lockf
print(json.dumps(results))
"""


def test_start_up_failures_on_rank0_stop_every_rank(tmp_path, small_tmpfs):
    """2 gloo ranks meet, in turn: a folder another run holds whose token file cannot be written (before: rank 0
    wrote the token before taking the lock, failed, and rank 1 waited in the broadcast; two runs into one folder said
    "not shared" instead of "busy"), a token rank 0 cannot write, a lock call failing with an errno outside the
    handled set (EIO), and a full disk under the lock file. Every rank raises naming the folder and the reason, all
    four within the 90 s bound instead of waiting out the 30-minute process-group timeout."""
    from explainer.run_lock import acquire

    folders = {name: tmp_path / name for name in ("busy", "token", "lockf_eio")}
    for name in ("busy", "token"):  # a non-empty folder where the token file goes: os.replace onto it fails
        (folders[name] / ".rank0-token" / "x").mkdir(parents=True)
    full = small_tmpfs("64k")
    folders["disk_full"] = full / "run"
    folders["disk_full"].mkdir()
    subprocess.run(["dd", "if=/dev/zero", f"of={full / 'filler'}", "bs=4k"], capture_output=True)  # until ENOSPC
    holder = acquire(folders["busy"])  # this test process is the other run
    try:
        procs = run_ranks(_START_UP, args=[f"{k}={v}" for k, v in folders.items()], timeout=90)
    finally:
        holder.release()
    results = [json.loads(p.stdout.strip().splitlines()[-1]) for p in procs]
    for rank, result in enumerate(results):
        assert result["busy"].startswith(f"RunFolderBusy: train.output_dir {folders['busy']} is in use by another "
                                         f"run (host {os.uname().nodename}, pid {os.getpid()}"), (rank, result)
        assert f"train.output_dir {folders['token']}: rank 0 cannot write .rank0-token there (Is a directory)" \
            in result["token"], (rank, result)
        assert f"{folders['lockf_eio'] / 'run.lock'}: cannot lock the run folder (Input/output error, errno 5)" \
            in result["lockf_eio"], (rank, result)
        assert f"cannot write {folders['disk_full'] / 'run.lock'} (no space left on device)" in result["disk_full"], \
            (rank, result)


_FAILING_RUNS = """
import json, sys, time
from pathlib import Path
from explainer.config import ExplainerRunConfig, load_config
from explainer.recipes import ExplainerRecipe
from explainer.run_errors import RunError
from explainer.training_loop import fit
base, common = sys.argv[1], json.loads(sys.argv[2])
results = {}
for name, extra in json.loads(sys.argv[3]).items():
    out = Path(base) / name
    cfg = load_config(ExplainerRunConfig, Path("configs/synthetic.yaml"), [*common, f"train.output_dir={out}", *extra])
    start = time.time()
    try:
        fit(ExplainerRecipe(cfg))
        results[name] = {"error": None}
    except RunError as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    results[name]["seconds"] = time.time() - start
print(json.dumps(results))
"""


def _mixed_class_shards(base: Path, tmp_path: Path) -> Path:
    """Real shards whose train split has two shards: the tiny set's (at most 2 classes per image) and one with up to
    4. With 2 ranks each rank reads one of them in the first epoch, so only one rank meets images over a cap of 2."""
    many = make_synthetic_shards(tmp_path / "many", ["--max-objects", "4", "--seed", "4", "--counts",
                                                     "train=96,val=8,test=8"])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for shard in base.parent.glob("*.tar"):
        shutil.copy(shard, mixed / shard.name)
    shutil.copy(many.parent / "train-000000.tar", mixed / "train-000001.tar")
    manifest = json.loads(base.read_text())
    train = manifest["splits"]["train"]
    train["shards"].append({**train["shards"][0], "path": "train-000001.tar"})
    train["total"] *= 2
    (mixed / "manifest.json").write_text(json.dumps(manifest))
    return mixed / "manifest.json"


def test_a_failure_on_one_rank_stops_every_rank_after_the_same_step(synthetic_manifest, tiny_classifier, tmp_path):
    """2 gloo ranks, five real runs in the same two processes, each failing on ONE rank: rank 0 cannot write
    config.yaml, explainer.pt (first validation), explainer_last.pt or summary.json (a folder is in the way: what a
    permission or full-disk error does to an atomic write), or rank 1 alone meets images with more classes than
    loss.max_classes_per_image. Before: the failing rank raised and the other waited in its next collective until
    the process-group timeout (30 min; on gloo a crash can also end it with a connection error). Now both raise the
    same error within seconds of each other."""
    runs = {name: [] for name in ("config.yaml", "explainer.pt", "explainer_last.pt", "summary.json")}
    for name in runs:
        (tmp_path / name / name / "in-the-way").mkdir(parents=True)
    runs["class_cap"] = [f"data.manifest={_mixed_class_shards(synthetic_manifest, tmp_path / 'shards')}",
                         "loss.max_classes_per_image=2"]
    common = [*tiny_overrides(synthetic_manifest, tmp_path), f"classifier.checkpoint={tiny_classifier}",
              "explainer.arch=tiny_unet", "tracking.wandb_mode=disabled", "train.max_steps=1",
              "train.val_max_batches=1"]
    procs = run_ranks(_FAILING_RUNS, args=[str(tmp_path), json.dumps(common), json.dumps(runs)], timeout=240)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.stdout.strip().splitlines()[-1]) for p in procs]
    for name in ("config.yaml", "explainer.pt", "explainer_last.pt", "summary.json"):
        path = tmp_path / name / name
        assert results[0][name]["error"].startswith(f"RunError: cannot write {path}: "), results[0][name]
        assert results[1][name]["error"].startswith(f"RunError: cannot write {path}: on rank 0 (its message says "
                                                    "why)"), results[1][name]
    assert not (tmp_path / "explainer.pt" / "checkpoints").exists()  # stopped before the step-1 checkpoint
    assert (tmp_path / "summary.json" / "explainer_last.pt").is_file()
    for rank, result in enumerate(results):
        error = result["class_cap"]["error"]
        assert error.startswith("UserError: loss.max_classes_per_image is 2, but an image with "), (rank, error)
        assert "ground-truth classes reached rank 1 in step 1: raise the cap" in error, (rank, error)
        assert all(r["seconds"] < 60 for r in result.values()), result


def test_a_run_folder_is_never_silently_overwritten_or_redescribed(synthetic_manifest, tiny_classifier, tmp_path,
                                                                   capsys):
    """Issue 26 §3, in this process (explainer.train.main, what the command runs). Before: a second `train` into the
    folder started at step 0 and replaced explainer.pt; `--resume` at 64 px, letterbox, rtis or with other classes
    exited 0 with no word; the checkpoints newer than the one resumed from stayed and a later --resume auto
    continued the abandoned run."""
    from explainer.train import main

    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    every = ["train.checkpoint_every_steps=1", "train.val_every_steps=2", "train.keep_last=9"]

    def train(*extra: str, resume: str | None = None) -> tuple[int, str]:
        capsys.readouterr()
        try:
            code = main(_args(synthetic_manifest, tiny_classifier, run, *every, *extra)[2:] +
                        ([] if resume is None else ["--resume", resume]))
        except SystemExit as stop:
            code = stop.code
        said = capsys.readouterr()
        return code, said.out + said.err

    assert train("train.max_steps=3")[0] == 0
    best = (run / "explainer.pt").read_bytes()
    code, said = train("train.max_steps=1")
    assert code == 2 and said.strip().splitlines()[-1] == (
        f"error: train.output_dir {run} holds another run's checkpoints (newest: step_00000003); continue that run "
        "with --resume auto, or choose another train.output_dir"), said[-2000:]
    assert (run / "explainer.pt").read_bytes() == best and len(list(ckpts.glob("step_*"))) == 3

    code, said = train("data.image_size=64", "data.resize=letterbox", "loss.kind=rtis", "loss.w_class_specific=0",
                       "explainer.arch=lraspp_mobilenet_v3_large", resume="auto")
    line = said.strip().splitlines()[-1]
    assert code == 2 and line.startswith(f"error: --resume {ckpts / 'step_00000003'}: the run folder {run} was "
                                         "trained with 4 classes / tiny_unet, and this config changes what its "
                                         "checkpoint means: "), line
    for change in ("data.image_size 32 -> 64", "data.resize 'squash' -> 'letterbox'", "loss.kind 'wysiwyc' -> 'rtis'",
                   "explainer.arch 'tiny_unet' -> 'lraspp_mobilenet_v3_large'"):
        assert change in line, (change, line)
    assert "loss.w_class_specific" not in line and (run / "explainer.pt").read_bytes() == best
    # Other classes: the explainer trainer already refuses a classifier trained on other classes, so the check that
    # runs before the load is called here on the same folder, with the classes another manifest would give.
    from explainer.run_errors import UserError
    from explainer.run_resume import check_resume

    cfg = load_config(ExplainerRunConfig, run / "config.yaml")
    classes = json.loads(synthetic_manifest.read_text())["classes"]
    with pytest.raises(UserError, match=r"was trained with 4 classes / tiny_unet, .*: classes 4 \[.*\] -> 3 "):
        check_resume(ckpts / "step_00000003", "explainer", cfg, classes[:3])
    assert check_resume(ckpts / "step_00000003", "explainer", cfg, classes) == {}

    code, said = train("train.max_steps=4", "optim.lr=0.0005", resume="auto")  # allowed, said and recorded
    assert code == 0 and "resumed with changed settings: " in said and "optim.lr 0.003 -> 0.0005" in said, said
    [record] = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert record["changed"]["optim.lr"] == [0.003, 0.0005] and record["step"] == 3
    assert record["changed"]["train.max_steps"] == [3, 4] and "train.resume" not in record["changed"]

    code, said = train("train.max_steps=3", resume=str(ckpts / "step_00000002"))  # an older step, named
    assert code == 0, said[-3000:]
    [aside] = ckpts.glob("set-aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000003", "step_00000004"]
    assert f"moved the newer checkpoint(s) step_00000003, step_00000004 aside to {aside} (nothing deleted)" in said
    (ckpts / "step_00000003" / "meta.json").unlink()  # the newest unusable: --resume auto skips and sets it aside
    code, said = train("train.max_steps=3", resume="auto")
    assert code == 0 and f"resumed from {ckpts / 'step_00000002'} (step 2," in said, said[-3000:]
    assert len(list(ckpts.glob("set-aside-*/step_00000003"))) == 2
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000001", "step_00000002", "step_00000003"]
