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
