"""`submit --dry-run` renders the sbatch script with three private members of submitit's SlurmExecutor (there is no
public way to get the script without submitting). A submitit upgrade that moves or changes them must fail here, with
a message that says where they are used, not later as an AttributeError on a user's login node."""

from __future__ import annotations

import inspect

import pytest
import submitit
from submitit.slurm.slurm import SlurmExecutor

from explainer.slurm import JobSpec, render_sbatch

USED_BY = "explainer/slurm.py::render_sbatch (explainer submit --dry-run)"

# name -> the parameters render_sbatch passes (None: a property it reads)
PRIVATE = {"_convert_parameters": ["self", "params"], "_make_submission_file_text": ["self", "command", "uid"],
           "_submitit_command_str": None}


@pytest.mark.parametrize("name", list(PRIVATE))
def test_private_members_still_exist_with_the_same_shape(name):
    hint = (f"submitit {submitit.__version__} changed SlurmExecutor.{name}, which {USED_BY} relies on: adapt "
            "render_sbatch to the new submitit or pin the last working version (submitit==1.5.4) in pyproject.toml")
    member = inspect.getattr_static(SlurmExecutor, name, None)
    assert member is not None, hint
    if PRIVATE[name] is None:
        assert isinstance(member, property), hint
    else:
        assert list(inspect.signature(member).parameters) == PRIVATE[name], hint


def test_they_still_do_what_the_dry_run_needs(tmp_path):
    """Generic parameters become sbatch options, and the script carries the command submitit would run."""
    spec = JobSpec(nodes=2, gpus_per_node=4, time_min=90, mem_gb=16, partition="gpu")
    script = render_sbatch(spec, tmp_path / "jobs")
    expected = ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --time=90",
                "#SBATCH --mem=16GB", "#SBATCH --partition=gpu"]
    missing = [line for line in expected if line not in script.splitlines()]
    assert script.startswith("#!/bin/bash") and not missing, \
        f"submitit {submitit.__version__}: {USED_BY} renders a different script (missing {missing}):\n{script}"
    assert "-m submitit.core._submit" in script, f"{USED_BY}: the srun command line changed:\n{script}"
