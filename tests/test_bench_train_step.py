"""The train-step benchmark and benchmarks/gpu_check.sh on tiny models, so both keep working between GPU runs."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--device", "cpu", "--explainer", "tiny_unet", "--classifiers", "tiny_cnn", "--image-size", "32",
        "--num-classes", "3", "--warmup", "1", "--iters", "1", "--rounds", "1"]


def test_peak_table_by_device_name_and_precision(bench):
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H200") == 989.4
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("NVIDIA L40") == 181.05
    assert bench.peak_tflops("Some Future GPU") is None
    assert bench.peak_tflops("NVIDIA H200", "tf32") == 494.7 and bench.peak_tflops("NVIDIA H200", "fp32") == 66.9
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5


def test_two_half_passes_cost_the_flops_of_one_full_pass(bench):
    import torch

    from explainer.models import build_classifier, build_explainer, freeze

    explainer = build_explainer("tiny_unet", 3)
    classifier = freeze(build_classifier("tiny_cnn", 3))
    cpu = torch.device("cpu")
    images, labels = bench.make_batch(2, 3, 32, cpu, 0)
    args = bench.parse_args(["--device", "cpu", "--explainer", "tiny_unet", "--classifiers", "tiny_cnn"])
    counts = {mode: bench.count_flops(bench.Runner(mode, explainer, classifier, images, labels, args, cpu))
              for mode in ("reference", "ours_fp32")}
    assert counts["ours_fp32"] == pytest.approx(counts["reference"], rel=0.05)


def test_class_specific_mode_adds_one_classifier_block(bench, tmp_path):
    """'ours_class_specific' (opt-in) is 'ours' plus x * s_k in the same classifier call: more FLOPs per step than
    'ours' (a third block of the batch), the same precision, and a speedup row against the reference."""
    out = tmp_path / "bench.json"
    bench.main([*TINY, "--batch-sizes", "2", "--modes", "reference,ours,ours_class_specific", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {row["mode"]: row for row in report["results"]}
    assert rows["ours_class_specific"]["precision"] == rows["ours"]["precision"] == "bf16"
    assert rows["ours_class_specific"]["flops_per_step"] > rows["ours"]["flops_per_step"]
    assert {s["mode"] for s in report["speedups"]} == {"ours", "ours_class_specific"}
    with pytest.raises(SystemExit):
        bench.parse_args([*TINY, "--modes", "ours,nope"])


def test_every_row_has_its_own_flops_and_the_peak_of_its_precision(bench, tmp_path):
    """Each mode's FLOPs are recounted here independently (the reference's 3x3 TV convolutions make its count
    differ from ours), and each MFU is over the peak of the row's precision: fp32 rows over --peak-tflops-fp32."""
    import torch

    from explainer.models import build_classifier, build_explainer, freeze

    out = tmp_path / "bench.json"
    bench.main([*TINY, "--batch-sizes", "2", "--peak-tflops", "1.0", "--peak-tflops-fp32", "0.25",
                "--channels-last", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {row["mode"]: row for row in report["results"]}
    assert set(rows) == {"reference", "ours_fp32", "ours"}
    args = bench.parse_args([*TINY, "--channels-last"])
    cpu = torch.device("cpu")
    images, labels = bench.make_batch(2, 3, 32, cpu, args.seed)
    for mode, row in rows.items():
        runner = bench.Runner(mode, build_explainer("tiny_unet", 3), freeze(build_classifier("tiny_cnn", 3)), images,
                              labels, args, cpu)
        assert row["flops_per_step"] == bench.count_flops(runner), mode
        assert row["achieved_tflops"] == pytest.approx(row["flops_per_step"] * row["images_per_s"] / 2 / 1e12)
        peak = 1.0 if mode == "ours" else 0.25
        assert row["precision"] == ("bf16" if mode == "ours" else "fp32") and row["peak_tflops"] == peak
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / peak)
    assert rows["reference"]["flops_per_step"] != rows["ours_fp32"]["flops_per_step"]
    assert {s["mode"] for s in report["speedups"]} == {"ours_fp32", "ours"}


def test_class_count_sweep_reports_ratios_against_the_first_count(bench, tmp_path):
    """--num-classes 3,12: one row per class count (models rebuilt with that many classes), each with its step time
    and (Linux) the process's peak RSS of one step, and ratios against the 3-class row of the same mode."""
    out = tmp_path / "classes.json"
    bench.main([*TINY[:-8], "--warmup", "1", "--iters", "1", "--rounds", "1", "--num-classes", "3,12",
                "--batch-sizes", "2", "--modes", "ours_fp32", "--profile", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [(r["num_classes"], r["mode"]) for r in report["results"]] == [(3, "ours_fp32"), (12, "ours_fp32")]
    assert all(len(r["profile"]) == 3 and r["profile"][0]["self_ms"] > 0 for r in report["results"])
    ratios = {r["num_classes"]: r for r in report["class_ratios"]}
    assert set(ratios) == {3, 12} and ratios[3]["time_ratio"] == 1.0 and ratios[12]["base_classes"] == 3
    row = report["results"][1]
    assert ratios[12]["time_ratio"] == pytest.approx(row["step_ms"] / report["results"][0]["step_ms"])
    if sys.platform == "linux":  # VmHWM: the step's peak, above the resident size of the loaded modules
        assert 0.1 < row["peak_mem_gib"] < 8 and ratios[12]["mem_ratio"] == pytest.approx(
            row["peak_mem_gib"] / report["results"][0]["peak_mem_gib"])
    for bad in ("0", "3,x", ""):
        with pytest.raises(SystemExit):
            bench.parse_args([*TINY[:-8], "--num-classes", bad])


def test_a_row_without_a_flop_count_still_prints(bench):
    row = {"classifier": "vgg16", "batch_size": 64, "mode": "ours", "images_per_s": 10.0, "step_ms": 6400.0}
    assert "vgg16" in bench.format_row(row) and " - " in bench.format_row(row)


def test_compile_is_static_and_fresh_for_every_batch_size(bench, tmp_path):
    """Reusing one compiled module across batch sizes makes dynamo recompile with a symbolic batch size (slower
    kernels) from the second size on: every graph compiled here must have static shapes, one batch size each."""
    import torch

    graphs: list[tuple[bool, set[int]]] = []

    def recording_backend(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        symbolic = any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and
                                                        any(isinstance(d, torch.SymInt) for d in v.shape))
                       for v in values)
        graphs.append((symbolic, {int(t.shape[0]) for t in example_inputs
                                  if isinstance(t, torch.Tensor) and t.dim() == 4}))
        return gm.forward

    args = bench.parse_args([*TINY, "--batch-sizes", "2,3", "--modes", "ours", "--compile",
                             "--out", str(tmp_path / "c.json")])
    args.compile_backend = recording_backend
    bench.run(args)
    assert graphs and not any(symbolic for symbolic, _ in graphs)
    sizes = set().union(*(s for _, s in graphs))
    assert {2, 3} <= sizes or {4, 6} <= sizes  # the explainer sees B images, the classifier 2B


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage_and_summarises(tmp_path):
    """benchmarks/gpu_check.sh --device cpu --smoke: the same stages and JSON files as on a GPU, tiny models."""
    out = tmp_path / "gc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--smoke",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{log[-5000:]}"
    stages = (out / "stages.txt").read_text().splitlines()
    assert [s.split(":")[0] for s in stages] == ["checkpoint_resume", "step_eager", "step_classes", "e2e",
                                                 "eval_timing", "step_compiled"]
    assert all(": exit 0," in s for s in stages), stages
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == summary["partial"] == [] and summary["env"]["device_type"] == "cpu"
    aims = {c["aim"] for c in summary["checks"] if "value" in c}
    assert aims == {"step_speedup", "mfu", "trainer_vs_bare"}
    e2e = json.loads((out / "e2e.json").read_text())["e2e"][0]
    assert e2e["trainer_images_per_s"] > 0 and e2e["bare_images_per_s"] > 0 and e2e["trainer_windows"] >= 2
    compiled = json.loads((out / "step_compiled.json").read_text())["results"]
    assert [r["compiled"] for r in compiled] == ["explainer+classifier"]
    timing = json.loads((out / "eval_timing.json").read_text())["results"][0]
    assert timing["explainer_ms_per_image"] > 0 and timing["gradcam_ms_per_image"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted([  # what comes back from a GPU machine: results only
        "env.json", "step_eager.json", "step_classes.json", "e2e.json", "eval_timing.json", "step_compiled.json",
        "checkpoint_resume.json", "summary.json", "stages.txt", "gpu_check.log"])
    resume = summary["checkpoint_resume"]  # on a GPU: the save with Adam's step on the CPU (issue 26 §1)
    assert resume["ok"] and resume["resumed_from_step"] == 2 and resume["final_steps"] == 4, resume
    assert [(r["num_classes"], r["mode"]) for r in summary["class_ratios"]] == [(4, "ours"), (40, "ours")]
