"""Checkpoints: only complete folders count, rotation keeps the last k and the best, resume restores state."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from explainer.run_checkpoints import CheckpointManager, TrainerState


@pytest.fixture
def prepared():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _train_one_step(model, optimizer):
    loss = model(torch.ones(4, 3)).pow(2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_rotate_keep_best_and_ignore_incomplete(tmp_path, prepared):
    accelerator, model, optimizer = prepared
    manager = CheckpointManager(tmp_path, keep_last=2)
    state = TrainerState()
    for step in range(1, 6):
        _train_one_step(model, optimizer)
        state.step = step
        state.best_step = 2  # pretend step 2 had the best validation loss
        manager.save(accelerator, state)
    names = [p.name for p in manager.complete()]
    assert names == ["step_00000002", "step_00000004", "step_00000005"]
    # A kill during a save leaves a temp folder, or a folder without meta.json: neither is "latest".
    (manager.root / ".tmp-step_00000006").mkdir()
    (manager.root / "step_00000007").mkdir()
    assert manager.latest().name == "step_00000005"
    assert manager.resolve("auto").name == "step_00000005"
    assert manager.resolve(None) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        manager.resolve(str(manager.root / "step_00000007"))


def test_load_restores_weights_optimizer_and_trainer_state(tmp_path, prepared):
    accelerator, model, optimizer = prepared
    manager = CheckpointManager(tmp_path, keep_last=3)
    _train_one_step(model, optimizer)
    state = TrainerState(step=1, epoch=2, batches_in_epoch=3, best_metric=0.5, best_step=1, bad_validations=1)
    path = manager.save(accelerator, state)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = json.dumps(optimizer.state_dict()["param_groups"])
    _train_one_step(model, optimizer)  # move away from the checkpoint
    assert not torch.equal(saved["weight"], model.state_dict()["weight"])
    restored = CheckpointManager.load(accelerator, path)
    assert restored == state
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key])
    assert json.dumps(optimizer.state_dict()["param_groups"]) == saved_opt


def test_unreadable_meta_is_reported(tmp_path, prepared):
    accelerator, _, _ = prepared
    manager = CheckpointManager(tmp_path, keep_last=1)
    path = manager.save(accelerator, TrainerState(step=1))
    (path / "meta.json").write_text("{broken")
    with pytest.raises(RuntimeError, match="cannot read meta.json"):
        CheckpointManager.load(accelerator, path)


_RESOLVE = """
import json
from accelerate import Accelerator
from explainer.run_checkpoints import CheckpointManager
accelerator = Accelerator(cpu=True)
try:
    path = CheckpointManager("run", keep_last=2).resolve_shared(accelerator, "auto")
    print(json.dumps({"path": None if path is None else str(path)}))
except RuntimeError as exc:
    print(json.dumps({"error": str(exc)}))
"""


_TEMPLATE = {}


def _fake_checkpoint(cwd, step):
    """A complete, usable checkpoint of a tiny model (real accelerate files, RNG states for ranks 0 and 1)."""
    if "dir" not in _TEMPLATE:
        import tempfile

        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(torch.nn.Linear(3, 2), torch.optim.Adam([torch.zeros(1)]))
        _TEMPLATE["dir"] = Path(tempfile.mkdtemp()) / "template"
        accelerator.save_state(str(_TEMPLATE["dir"]))
        shutil.copy(_TEMPLATE["dir"] / "random_states_0.pkl", _TEMPLATE["dir"] / "random_states_1.pkl")
    path = cwd / "run" / "checkpoints" / f"step_{step:08d}"
    shutil.copytree(_TEMPLATE["dir"], path)
    (path / "meta.json").write_text(json.dumps({"step": step}))
    return path


def _resolve_on_two_ranks(cwds):
    from _helpers import run_ranks

    procs = run_ranks(_RESOLVE, world=2, cwds=cwds)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(proc.stdout.strip().splitlines()[-1]) for proc in procs]


def test_resume_auto_is_rank0s_choice_on_every_rank(tmp_path):
    """Each rank has its own (node-local) run folder: rank 1's newer checkpoint must not win on rank 1."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for step in (4, 6):
        _fake_checkpoint(cwds[0], step)
        _fake_checkpoint(cwds[1], step)
    _fake_checkpoint(cwds[1], 8)  # only rank 1 sees step 8
    results = _resolve_on_two_ranks(cwds)
    assert results == [{"path": "run/checkpoints/step_00000006"}] * 2


def test_resume_auto_fails_clearly_on_every_rank_when_one_cannot_read(tmp_path):
    """Node-local run folders: rank 1 cannot read rank 0's checkpoint. Before: rank 1 started fresh and rank 0
    resumed (divergence, then a hang); now both stop with the same message naming the rank."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    cwds[1].mkdir()
    _fake_checkpoint(cwds[0], 6)
    results = _resolve_on_two_ranks(cwds)
    for result in results:
        assert "error" in result, results
        assert "rank(s) [1] cannot read run/checkpoints/step_00000006/meta.json" in result["error"]
        assert "shared filesystem" in result["error"]


# ----------------------------------------------------------------------------------------------------------------------
# Issue 17: unusable checkpoints are skipped by --resume auto, named when chosen explicitly, never written
# ----------------------------------------------------------------------------------------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_in_optimizer(path):
    state = torch.load(path, weights_only=True)
    state["state"][0]["exp_avg"][0, 0] = float("inf")
    torch.save(state, path)


def _nan_in_model(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors["bias"][0] = float("nan")
    save_file(tensors, str(path))


CORRUPTIONS = {
    "truncated weights": ("model.safetensors", _truncate, "model.safetensors: cannot be read"),
    "garbage optimizer": ("optimizer.bin", lambda p: p.write_bytes(b"garbage" * 10), "optimizer.bin: cannot be read"),
    "non-finite optimizer": ("optimizer.bin", _nan_in_optimizer, "optimizer.bin: 1 non-finite values"),
    "non-finite weights": ("model.safetensors", _nan_in_model, "model.safetensors: 1 non-finite values"),
    "meta.json wrong type": ("meta.json", lambda p: p.write_text('{"step": "seven"}'),
                             "meta.json: meta.json.step: expected int, got str 'seven'"),
    "garbage RNG state": ("random_states_0.pkl", lambda p: p.write_bytes(b"\x80garbage"),
                          "random_states_0.pkl: cannot be read"),
    "missing weights": ("model.safetensors", lambda p: p.unlink(), "incomplete: no model.safetensors"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_resume_auto_skips_an_unusable_checkpoint_and_an_explicit_one_is_named(tmp_path, prepared, capsys,
                                                                            corruption):
    """Before: `auto` took the newest complete folder whatever it held (a safetensors error naming no file, or a
    diverged run resumed; a garbage RNG file was silently ignored by accelerate, so the resume was not exact)."""
    from explainer.logs import configure_logging
    from explainer.run_checkpoints import inspect
    from explainer.run_errors import UserError

    configure_logging(0)
    accelerator, model, optimizer = prepared
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        _train_one_step(model, optimizer)
        manager.save(accelerator, TrainerState(step=step))
    name, corrupt, reason = CORRUPTIONS[corruption]
    bad = manager.root / "step_00000002"
    corrupt(bad / name)
    assert reason in inspect(bad)
    with pytest.raises(UserError, match=f"train.resume='{bad}' cannot be resumed from: .*{reason[:20]}"):
        manager.resolve_shared(accelerator, str(bad))
    assert manager.resolve_shared(accelerator, "auto") == manager.root / "step_00000001"
    out = capsys.readouterr().out
    assert f"skipping checkpoint {bad}: " in out and reason in out, out
    [aside] = manager.root.glob("set-aside-*")  # the skipped one is moved aside, not left as the latest (issue 26)
    assert [p.name for p in aside.iterdir()] == ["step_00000002"] and not bad.exists()
    assert "moved the newer checkpoint(s) step_00000002 aside to " in out


def test_resume_auto_with_no_usable_checkpoint_stops_instead_of_starting_fresh(tmp_path, prepared):
    from explainer.run_errors import UserError

    accelerator, model, optimizer = prepared
    manager = CheckpointManager(tmp_path, keep_last=3)
    path = manager.save(accelerator, TrainerState(step=1))
    _truncate(path / "model.safetensors")
    (manager.root / "step_00000005").mkdir()  # e.g. an interrupted copy: said, not silently passed over
    with pytest.raises(UserError, match=r"no usable checkpoint in .*skipped step_00000005 \(incomplete: no meta.json.*"
                                        r"step_00000001 \(.*model.safetensors"):
        manager.resolve_shared(accelerator, "auto")


def test_rotation_keeps_the_checkpoint_this_run_resumed_from_and_wrote(tmp_path, prepared):
    """Newer unusable checkpoints (skipped by the resume) must not push this run's good ones out of keep_last.
    Before: keep_last=1 kept the corrupt step 9 and deleted the step 2 just written. Since issue 26 the resume moves
    step 9 aside, so it is neither kept in a slot nor named as the latest."""
    accelerator, model, optimizer = prepared
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(accelerator, TrainerState(step=1))
    corrupt = shutil.copytree(manager.root / "step_00000001", manager.root / "step_00000009")
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    resumed = CheckpointManager(tmp_path, keep_last=1)
    assert resumed.resolve_shared(accelerator, "auto").name == "step_00000001"
    _train_one_step(model, optimizer)
    resumed.save(accelerator, TrainerState(step=2))
    assert [p.name for p in resumed.complete()] == ["step_00000002"]
    assert resumed.latest_usable().name == "step_00000002"
    assert [p.name for p in resumed.root.glob("set-aside-*/*")] == ["step_00000009"]


def test_rotation_removes_only_its_own_temporary_folders(tmp_path, prepared):
    """Before: every save removed every .tmp-step_* folder, including the one another writer was filling."""
    accelerator, _, _ = prepared
    mine = CheckpointManager(tmp_path, keep_last=2, writer="host a, pid 1")
    other = mine.root / ".tmp-step_00000003.host-b-pid-2"
    other.mkdir(parents=True)
    leftover = mine.root / ".tmp-step_00000001.host-a-pid-1"  # an earlier failed save of this run
    leftover.mkdir()
    mine.save(accelerator, TrainerState(step=2))
    assert other.is_dir() and not leftover.exists()
    mine.remove_stale_temporaries()  # at the start of a run, under the lock: writers of leftovers are gone
    assert not other.exists()


def test_non_finite_state_is_detected_on_the_device(prepared):
    from explainer.run_checkpoints import all_finite_on_device

    accelerator, model, optimizer = prepared
    _train_one_step(model, optimizer)
    assert all_finite_on_device(accelerator, model, optimizer)
    inner = optimizer.optimizer
    moments = next(iter(inner.state.values()))["exp_avg_sq"]
    moments[0, 0] = float("inf")
    assert not all_finite_on_device(accelerator, model, optimizer)
    moments[0, 0] = 3e38  # huge but finite: max |x| does not overflow where a norm would
    assert all_finite_on_device(accelerator, model, optimizer)
    with torch.no_grad():
        model.bias[1] = float("nan")
    assert not all_finite_on_device(accelerator, model, optimizer)


def test_the_finite_check_takes_tensors_on_several_devices():
    """On a GPU torch keeps Adam's `step` on the CPU (no `capturable` / `fused`) while the moments live on the GPU.
    No GPU here: `meta` is the second device. Before: one torch.stack over both devices' flags raised, so a GPU run
    could never write a checkpoint (issue 26 §1). The flag comes back on the device asked for."""
    import math

    from explainer.run_checkpoints import any_nonfinite

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    _train_one_step(model, optimizer)
    state = next(iter(optimizer.state.values()))
    assert state["step"].device.type == "cpu"  # what stays on the CPU in a GPU run
    mixed = [state["step"], state["exp_avg"].to("meta"), state["exp_avg_sq"].to("meta")]
    with pytest.raises(RuntimeError):  # the old check on the same tensors
        torch.stack([torch.isfinite(m) for m in torch._foreach_norm(mixed, ord=math.inf)])
    flag = any_nonfinite(mixed, "meta")
    assert flag.device.type == "meta" and flag.shape == (1,) and flag.dtype == torch.bool
    cpu = [state["step"], state["exp_avg"], state["exp_avg_sq"]]
    assert not any_nonfinite(cpu, "cpu").item()
    cpu[1] = cpu[1].clone().fill_(float("nan"))
    assert any_nonfinite(cpu, "cpu").item()
