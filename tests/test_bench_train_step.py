"""Smoke test of the train-step benchmark on tiny models, so the script keeps working between GPU runs."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_table_by_device_name(bench):
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H200") == 989.4
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("NVIDIA L40") == 181.05
    assert bench.peak_tflops("Some Future GPU") is None


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


def test_cpu_benchmark_writes_every_mode(bench, tmp_path):
    out = tmp_path / "bench.json"
    bench.main([
        "--device", "cpu", "--explainer", "tiny_unet", "--classifiers", "tiny_cnn", "--image-size", "32",
        "--batch-sizes", "2", "--num-classes", "3", "--warmup", "1", "--iters", "1", "--rounds", "1",
        "--peak-tflops", "1.0", "--channels-last", "--out", str(out),
    ])
    report = json.loads(out.read_text())
    rows = {row["mode"]: row for row in report["results"]}
    assert set(rows) == {"reference", "ours_fp32", "ours"}
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["flops_per_step"] > 0 and row["mfu"] > 0
    assert len({row["flops_per_step"] for row in rows.values()}) == 1  # one FLOP count of the step for every mode
    assert {s["mode"] for s in report["speedups"]} == {"ours_fp32", "ours"}
