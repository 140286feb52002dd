"""SIGTERM / SIGINT with real signals and real processes: training stops after the step, checkpoints on every rank and
exits 143 / 130; make_shards stops its workers (explainer/signals.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from _helpers import PYTHON, ROOT, free_port, tiny_overrides

TRAIN = "explainer/train.py"
# Long enough that no run ends before the signal; no scheduled validation or checkpoint, so the one checkpoint is the
# signal's.
SIGNAL_RUN = ["train.epochs=100", "train.max_steps=500", "train.checkpoint_every_steps=1000",
              "train.val_every_steps=1000", "train.log_every_steps=1", "tracking.wandb_mode=disabled"]


def _train_args(manifest: Path, classifier: Path, out: Path, *extra: str) -> list[str]:
    return [PYTHON, TRAIN, "--config", "configs/synthetic.yaml", *tiny_overrides(manifest, out),
            f"classifier.checkpoint={classifier}", "explainer.arch=tiny_unet", *extra]


def _start_ranks(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """`world` gloo ranks as separate processes (RANK/WORLD_SIZE/MASTER_* as torchrun exports them), so that a
    signal can reach one rank and not the other, as with a scheduler that signals one task."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return procs


def _wait_for_training(out: Path, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    """Until the run has logged a training step (so the signal lands inside the loop)."""
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text().replace('"kind":"train"',
                                                                                       '"kind": "train"')):
        for proc in procs:
            assert proc.poll() is None, f"a rank ended before the signal:\n{proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "training did not start"
        time.sleep(0.1)


def _finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return done


def _stop_line(stderr: str, name: str) -> re.Match:
    found = re.search(rf"{name}: stopped after step (\d+); checkpoint (\S+) \(continue with train.resume=auto\); "
                      rf"exit (\d+)", stderr)
    assert found, stderr[-3000:]
    return found


def test_sigterm_to_one_rank_stops_both_after_the_same_step_and_the_resume_continues(
        synthetic_manifest, tiny_classifier, tmp_path):
    out = tmp_path / "run"
    procs = _start_ranks(_train_args(synthetic_manifest, tiny_classifier, out, *SIGNAL_RUN))
    _wait_for_training(out, procs)
    procs[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns it from the step's reduction
    (rc0, _, err0), (rc1, _, err1) = _finish(procs)
    assert (rc0, rc1) == (143, 143), (err0[-3000:], err1[-3000:])
    line = _stop_line(err0, "SIGTERM")
    step = int(line.group(1))
    assert line.group(2) == str(out / "checkpoints" / f"step_{step:08d}") and line.group(3) == "143"
    assert "stopped after step" not in err1  # said once, by rank 0
    assert "Traceback" not in err0 + err1
    meta = json.loads((out / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())
    assert meta["step"] == step and 0 < step < 500
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{step:08d}"]
    assert not (out / "summary.json").exists()  # stopped, not finished

    procs = _start_ranks(_train_args(synthetic_manifest, tiny_classifier, out, *SIGNAL_RUN,
                                     f"train.max_steps={step + 2}", "train.resume=auto"))
    (rc0, out0, err0), (rc1, _, err1) = _finish(procs, timeout=240)
    assert (rc0, rc1) == (0, 0), (err0[-3000:], err1[-3000:])
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'} (step {step}," in out0 + err0
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


def test_ctrl_c_with_loader_workers_exits_130_without_traceback(synthetic_manifest, tiny_classifier, tmp_path):
    """SIGINT to the whole process group, as Ctrl-C in a terminal sends it (the DataLoader worker gets it too)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_args(synthetic_manifest, tiny_classifier, out, *SIGNAL_RUN, "data.num_workers=1"),
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_training(out, [proc])
    os.killpg(proc.pid, signal.SIGINT)
    [(rc, _, err)] = _finish([proc])
    assert rc == 130, err[-3000:]
    step = int(_stop_line(err, "SIGINT").group(1))
    assert (out / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_a_second_signal_exits_at_once(synthetic_manifest, tiny_classifier, tmp_path):
    out = tmp_path / "run"
    [proc] = _start_ranks(_train_args(synthetic_manifest, tiny_classifier, out, *SIGNAL_RUN), world=1)
    _wait_for_training(out, [proc])
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)  # before the step ends: leave now, no checkpoint
    [(rc, _, err)] = _finish([proc])
    assert rc == 143, err[-3000:]
    assert "second signal (SIGTERM): exiting now, status 143" in err
    assert "stopped after step" not in err and not (out / "checkpoints").exists()


# A stand-in for submitit's USR2 handler (no SLURM job here): on global rank 0 it "requeues" (records whether the
# checkpoint of the stop already exists) and exits, as submitit's checkpoint_and_try_requeue does; elsewhere it returns.
_SUBMITIT_LIKE = """
import json, os, signal, sys
from pathlib import Path

def requeue(signum, frame):
    if os.environ["RANK"] != "0":
        return
    checkpoints = sorted(p.name for p in Path(sys.argv[1]).glob("checkpoints/step_*"))
    Path(sys.argv[1], "requeued.json").write_text(json.dumps({"checkpoints": checkpoints}))
    sys.exit(-1)

signal.signal(signal.SIGUSR2, requeue)
from explainer.train import main
sys.exit(main(sys.argv[2:]))
"""


def test_usr2_preemption_stops_every_rank_after_the_step_then_requeues(synthetic_manifest, tiny_classifier, tmp_path):
    """SLURM's USR2 to rank 0 only. Before: submitit's handler requeued and exited rank 0 mid-step, and rank 1 waited
    for it (until SIGKILL under SLURM). Now: both ranks finish the step and write its checkpoint, then the replaced
    handler requeues on rank 0 (its -1 exit status) and rank 1 exits 140; both within 60 s of the signal."""
    out = tmp_path / "run"
    args = _train_args(synthetic_manifest, tiny_classifier, out, *SIGNAL_RUN)
    procs = _start_ranks([PYTHON, "-c", _SUBMITIT_LIKE, str(out), *args[2:]])
    _wait_for_training(out, procs)
    signalled = time.time()
    procs[0].send_signal(signal.SIGUSR2)
    (rc0, _, err0), (rc1, _, err1) = _finish(procs, timeout=60)
    assert time.time() - signalled < 60
    assert (rc0, rc1) == (255, 140), (err0[-3000:], err1[-3000:])
    step = int(_stop_line(err0, "SIGUSR2").group(1))
    assert json.loads((out / "requeued.json").read_text()) == {"checkpoints": [f"step_{step:08d}"]}
    assert "Traceback" not in err0 + err1
