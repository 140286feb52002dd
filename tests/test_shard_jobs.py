"""make-shards imagenet as a job array through the submitit launcher (explainer/shard_jobs.py), on --cluster local:
the same code path as SLURM minus sbatch (the SLURM array itself is the launcher's, tested in test_slurm.py)."""

from __future__ import annotations

import json

import pytest
from _data_helpers import make_shards, samples_of
from _imagenet_tree import make_imagenet_tree

from explainer.submit import main as submit_main


def test_parts_run_as_jobs_and_the_last_one_merges(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path / "src", "archives")
    out = tmp_path / "shards"
    text = f"imagenet --root {root} --out {out} --val-per-class 1 --workers 1 --shard-maxcount 4"
    assert submit_main(["--make-shards", text, "--parts", "2", "--cluster", "local", "--cpus-per-task", "2",
                        "--mem-gb", "0"]) == 0
    assert "submitted 2 part(s)" in capsys.readouterr().out
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["parts"]["num_parts"] == 2 and [p.rsplit("/", 1)[-1] for p in merged["parts"]["merged_from"]] == [
        "part-00000", "part-00001"]
    assert make_shards("imagenet", "--root", str(root), "--out", str(tmp_path / "one"), "--val-per-class", "1",
                       "--workers", "1") == 0
    for split in ("train", "val", "test"):
        assert samples_of(out, split) == samples_of(tmp_path / "one", split)


@pytest.mark.parametrize(("text", "message"), [
    ("voc --root x --out y", "only 'imagenet' runs in parts"),
    ("imagenet --root x", "give --out"),
    ("imagenet --bogus", "not valid make-shards arguments"),
])
def test_bad_make_shards_arguments_are_refused_before_submitting(text, message, tmp_path, capsys):
    assert submit_main(["--make-shards", text, "--cluster", "local", "--job-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_dry_run_prints_one_job_array_of_the_parts(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path / "src", "ilsvrc")
    text = f"imagenet --root {root} --out {tmp_path / 'shards'} --workers 6"
    assert submit_main(["--make-shards", text, "--parts", "8", "--partition", "cpu", "--time", "240",
                        "--dry-run"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --array=0-7%", "#SBATCH --cpus-per-task=8", "#SBATCH --partition=cpu", "#SBATCH --time=240",
                 "#SBATCH --job-name=explainer-make-shards"):
        assert line in script, line
    assert not (tmp_path / "shards").exists()  # nothing submitted, nothing written
