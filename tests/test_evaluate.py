"""Evaluation: the Evaluator on a toy with a known answer, the report, and end-to-end runs on real shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers import PYTHON, colour_classifier, free_port, run_cmd
from torch import nn

from explainer.baselines import build_baseline
from explainer.config import EvalConfig
from explainer.evaluate import Evaluator, MaskNetwork, markdown_report, parse_methods, write_outputs

pytestmark = pytest.mark.usefixtures("one_thread")


S = 24
ORIG = 224
CLASSES = ["red", "green"]


class OracleExplainer(nn.Module):
    """Mask of class k = where channel k is lit: the perfect explainer for the colour classifier."""

    def forward(self, x):
        return 40 * (x[:, :2] - 0.5)


def toy_batch(seed: int, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, S, S)
    labels = torch.zeros(n, 2)
    seg_classes = torch.zeros(n, S, S, dtype=torch.uint8)
    for i in range(n):
        for k in range(2):
            if torch.rand((), generator=g) < 0.6 or (k == 1 and labels[i].sum() == 0):
                r, c = (int(v) for v in torch.randint(0, S - 8, (2,), generator=g))
                x[i, k, r : r + 8, c : c + 8] = 1.0
                seg_classes[i, r : r + 8, c : c + 8] = k + 1
                labels[i, k] = 1
    seg = (seg_classes > 0).to(torch.uint8)
    # a one-pixel void band on the top edge of every object
    edge = (seg_classes > 0) & ~torch.nn.functional.pad(seg_classes[:, :-1] > 0, (0, 0, 1, 0), value=False)
    seg[edge] = 255
    return {"image": x, "labels": labels, "seg": seg, "seg_classes": seg_classes,
            "has_seg": torch.ones(n, dtype=torch.bool), "key": [f"{seed}-{i}" for i in range(n)],
            "orig_size": torch.tensor([[ORIG, ORIG]] * n)}  # as if resized from 224 x 224 originals


def run_toy(methods: list[str], figure_images: int = 0) -> tuple[Evaluator, dict]:
    clf = colour_classifier(gain=40)
    cfg = EvalConfig(rise_masks=200, rise_cells=4, rise_batch=100)
    built = {m: MaskNetwork(m, OracleExplainer()) if m == "explainer" else build_baseline(m, clf, cfg)
             for m in methods}
    ev = Evaluator(clf, built, CLASSES, cfg, torch.device("cpu"), figure_images=figure_images)
    for seed in range(3):
        ev.update(toy_batch(seed))
    return ev, ev.finish()


@pytest.mark.numerics
def test_evaluator_on_a_toy_with_known_answer():
    ev, res = run_toy(["explainer", "gradcam"])
    assert res["n_images"] == 12 and res["n_seg_images"] == 12
    seg = res["segmentation"]
    assert seg["G.T."]["iou"] == pytest.approx(1.0) and seg["G.T."]["mae"] == pytest.approx(0.0)
    assert seg["explainer"]["iou"] > 0.99 and seg["explainer"]["mae"] < 0.01  # the oracle is the ground truth
    assert seg["gradcam"]["iou"] > 0.9  # full-resolution 1x1-conv features: Grad-CAM is exact here too
    assert seg["0"]["iou"] == 0.0 and seg["1"]["mae"] > 0.5
    assert seg["explainer"]["n"] == 12 and seg["0.5"]["mae"] == pytest.approx(0.5)
    cs = res["class_specific"]["explainer"]
    assert "gradcam" not in res["class_specific"]
    # off-diagonal: an image without the mask's class is blanked out -> softmax 0.5 over two classes at most
    assert cs["mean_diagonal"] > 0.9 and cs["max_off_diagonal"] < 0.35
    assert res["classification"]["clean"]["f1"] == pytest.approx(1.0)
    assert res["classification"]["masked"]["explainer"]["recall"] == pytest.approx(1.0)
    t = res["timing"]
    assert t["explainer"]["images"] == 12 and not t["explainer"]["autograd"] and t["gradcam"]["autograd"]
    assert t["explainer"]["seconds_per_image"] > 0


@pytest.mark.numerics
def test_report_and_figures_are_written(tmp_path):
    ev, res = run_toy(["explainer", "gradcam", "rise"], figure_images=3)
    res["settings"] = {"checkpoint": "x.pt", "classifier": "c.pt", "manifest": "m.json", "split": "test",
                       "world_size": 1, "device": "cpu", "date": "today", "batch_size": 4}
    write_outputs(res, ev, tmp_path)
    report = (tmp_path / "report.md").read_text()
    for heading in ("Table 2", "Table 1", "Table 4", "Table 3", "| *G.T.* |", "| Grad-CAM |", "| RISE |"):
        assert heading in report
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["segmentation"]["explainer"]["iou"] > 0.99
    assert (tmp_path / "figures" / "fig1.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "class_specific_explainer.png").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
    assert markdown_report(res).count("## Table") == 4


@pytest.mark.numerics
def test_mask_network_upsamples_only_the_scored_classes():
    """An explainer whose head is at 1/8 (LR-ASPP): the classes a table reads (each image's wanted ones, and `scored`,
    the class-specific table's) are the full-resolution masks the model gave before; the others are left at 0, and
    nothing of them is upsampled. The Evaluator asks for every class while RISE's top-1 protocol is on."""
    from explainer.models import build_explainer

    torch.manual_seed(0)
    net = build_explainer("lraspp_mobilenet_v3_large", 6).eval()
    x = torch.randn(2, 3, 32, 32)
    wanted = torch.zeros(2, 6, dtype=torch.bool)
    wanted[0, 4] = True
    with torch.no_grad():
        before = torch.sigmoid(net.net(x)["out"])  # every class upsampled, as the model returned it before
    maps = MaskNetwork("explainer", net, scored=[1])(x, wanted)
    torch.testing.assert_close(maps[:, [1, 4]], before[:, [1, 4]], rtol=0, atol=1e-6)
    assert maps[:, [0, 2, 3, 5]].abs().max() == 0
    torch.testing.assert_close(MaskNetwork("explainer", net)(x, wanted), before, rtol=0, atol=1e-6)
    methods = {"explainer": MaskNetwork("explainer", net)}
    Evaluator(colour_classifier(gain=40), methods, [str(k) for k in range(6)], EvalConfig(), torch.device("cpu"))
    assert methods["explainer"].scored is None  # faithfulness_rise: the top-1 class may be any
    Evaluator(colour_classifier(gain=40), methods, [str(k) for k in range(6)],
              EvalConfig(faithfulness_rise=False, class_specific_classes=["2"]), torch.device("cpu"))
    assert methods["explainer"].scored == [2]


@pytest.mark.numerics
def test_faithfulness_on_the_toy_oracle_beats_a_reversed_map():
    """The oracle's maps rank the object first: deletion kills the class at once, insertion brings it back at once;
    the same maps reversed (object last) do the opposite. Pointing: the oracle always hits, the reversed map (its
    maximum on the background, far from the 8x8 object in most images) mostly misses."""
    clf = colour_classifier(gain=40)
    cfg = EvalConfig(faithfulness_steps=8)

    class Reversed(MaskNetwork):
        def __call__(self, images, wanted):
            return 1 - super().__call__(images, wanted)

    methods = {"explainer": MaskNetwork("explainer", OracleExplainer()), "rtis": Reversed("rtis", OracleExplainer())}
    ev = Evaluator(clf, methods, CLASSES, cfg, torch.device("cpu"))
    for seed in range(3):
        ev.update(toy_batch(seed))
    res = ev.finish()
    faith = res["faithfulness"]
    ours, rev = faith["methods"]["explainer"], faith["methods"]["rtis"]
    pairs = sum(int(v) for b in range(3) for v in toy_batch(b)["labels"].sum(0))
    assert ours["pairs"] == rev["pairs"] == ours["pointing_pairs"] == pairs
    # the toy's probability floor is sigmoid(-2) = 0.12 (nothing lit), its ceiling ~1; at 24 px the insertion start
    # is blurred by less than a pixel (sigma 5 px at 224), so the class is already there: insertion is high for both
    assert ours["deletion_auc"] < 0.25 < 0.6 < rev["deletion_auc"]
    assert ours["insertion_auc"] > rev["insertion_auc"]
    assert ours["pointing_accuracy"] == 1.0 and rev["pointing_accuracy"] < 0.5
    assert ours["pointing_annotation"] == "mask" and set(ours["pointing_mask"]["per_class"]) == set(CLASSES)
    st = faith["settings"]
    assert st["steps"] == 8 and st["probability"] == "sigmoid" and st["image_size"] == S
    assert st["pointing_tolerance_px"] == 15 and st["deletion_substrate"] == "zero" and st["rise_protocol"]
    assert "batch evaluation" in st["rise"]["protocol"] and st["rise"]["deletion"] == f"to 0, {8 * S} px per step"
    assert st["rise"]["insertion"] == f"from the blur, {8 * S} px per step" and "resize=squash" in st["pointing_frame"]
    assert ours["rise_pairs"] == rev["rise_pairs"] == 12  # RISE: the top-1 class of each image
    assert ours["rise_deletion_auc"] < rev["rise_deletion_auc"]
    report = markdown_report({**res, "settings": {}})
    assert "## Faithfulness (beyond the paper)" in report and "sigmoid probability" in report
    off = Evaluator(clf, methods, CLASSES, EvalConfig(faithfulness_steps=0), torch.device("cpu"))
    off.update(toy_batch(0))
    off_res = off.finish()["faithfulness"]["methods"]["explainer"]
    assert off_res["pairs"] == 0 and off_res["pointing_pairs"] > 0  # the pointing game is cheap: always on


def _with_boxes(batch: dict, difficult_class: int | None = None) -> dict:
    """The toy's objects as VOC boxes in original (224 px) coordinates, 1-based inclusive like the XML."""
    scale = ORIG // S
    objects = []
    for seg in batch["seg_classes"]:
        rows = []
        for k in range(2):
            ys, xs = (seg == k + 1).nonzero(as_tuple=True)
            if len(ys):
                rows.append([k, int(xs.min()) * scale + 1, int(ys.min()) * scale + 1, (int(xs.max()) + 1) * scale,
                             (int(ys.max()) + 1) * scale, int(k == difficult_class)])
        objects.append(torch.tensor(rows, dtype=torch.long).reshape(-1, 6))
    return {**batch, "objects": objects}


def test_pointing_game_headline_is_torchrays_box_test():
    """With boxes the headline is TorchRay's: box test, all-difficult pairs skipped, mean over ALL classes (a class
    left without pairs scores 0); the mask-based and pooled numbers stand beside it."""
    clf = colour_classifier(gain=40)
    methods = {"explainer": MaskNetwork("explainer", OracleExplainer())}
    ev = Evaluator(clf, methods, CLASSES, EvalConfig(faithfulness_steps=0), torch.device("cpu"))
    batches = [toy_batch(seed) for seed in range(2)]
    for b in batches:
        ev.update(_with_boxes(b))
    row = ev.finish()["faithfulness"]["methods"]["explainer"]
    pairs = int(sum(b["labels"].sum() for b in batches))
    assert row["pointing_annotation"] == "box" and row["pointing_pairs"] == pairs == row["pointing_mask"]["pairs"]
    assert row["pointing_accuracy"] == 1.0 and row["pointing_skipped_difficult"] == 0
    # every green object difficult: green's pairs are skipped, TorchRay's mean counts green as 0
    ev = Evaluator(clf, methods, CLASSES, EvalConfig(faithfulness_steps=0), torch.device("cpu"))
    for b in batches:
        ev.update(_with_boxes(b, difficult_class=1))
    row = ev.finish()["faithfulness"]["methods"]["explainer"]
    green = int(sum(b["labels"][:, 1].sum() for b in batches))
    assert row["pointing_skipped_difficult"] == green > 0 and row["pointing_pairs"] == pairs - green
    assert row["pointing_accuracy"] == 0.5 and row["pointing_box"]["accuracy_class_mean"] == 1.0
    assert row["pointing_accuracy_pooled"] == 1.0 and row["pointing_box"]["per_class"] == {"red": 1.0}
    # COCO (pointing_boxes=False): TorchRay's COCO test is mask-based; the boxes still feed the localization table
    ev = Evaluator(clf, methods, CLASSES, EvalConfig(faithfulness_steps=0), torch.device("cpu"), pointing_boxes=False)
    for b in batches:
        ev.update(_with_boxes(b))
    res = ev.finish()
    row = res["faithfulness"]["methods"]["explainer"]
    assert row["pointing_annotation"] == "mask" and row["pointing_box"]["pairs"] == 0 and row["pointing_pairs"] == pairs
    loc = res["localization"]["methods"]["explainer"]
    assert loc["box_pairs"] == pairs and loc["maxboxacc_v2_iou"]["50"] == 100.0
    assert loc["pxap"] > 95  # the oracle (its edges blurred by the upsampling)


def test_class_specific_rows_without_test_images_are_hidden():
    clf = colour_classifier(gain=40)
    ev = Evaluator(clf, {"explainer": MaskNetwork("explainer", OracleExplainer())}, CLASSES, EvalConfig(),
                   torch.device("cpu"))
    batch = toy_batch(0)
    keep = batch["labels"][:, 0] == 0  # only images without "red"
    batch = {k: (v[keep] if isinstance(v, torch.Tensor) else [x for x, f in zip(v, keep) if f])
             for k, v in batch.items()}
    ev.update(batch)
    res = ev.finish()
    report = markdown_report({**res, "settings": {}})
    assert "\n| red |" not in report and "\n| green |" in report
    assert "Classes without a test image (rows left out): red." in report


def test_evaluation_tables_and_figures_go_to_an_offline_wandb_run(tmp_path, monkeypatch):
    """A real W&B offline run (no server here): the tables and figures are media files of the run on disk."""
    from explainer.config import TrackingConfig
    from explainer.evaluate import log_to_wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    ev, res = run_toy(["explainer", "gradcam"], figure_images=2)
    res["settings"] = {"checkpoint": str(tmp_path / "run" / "explainer.pt"), "batch_size": 4}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb_run_id.txt").write_text("train42")
    write_outputs(res, ev, tmp_path / "eval")
    assert log_to_wandb(res, tmp_path / "eval", TrackingConfig(wandb_mode="disabled"), None) is None
    folder = log_to_wandb(res, tmp_path / "eval", TrackingConfig(wandb_mode="auto", project="test"),
                          res["settings"]["checkpoint"])
    assert folder is not None and folder.parent == tmp_path / "eval" / "wandb" and folder.name.startswith("offline-")
    assert list(folder.glob("*.wandb"))
    tables = {p.name.rsplit("_", 2)[0]: p for p in folder.glob("files/media/table/eval/*.table.json")}
    assert set(tables) == {"segmentation", "class_specific_explainer", "classification", "timing", "faithfulness",
                           "localization"}
    faith = json.loads(tables["faithfulness"].read_text())
    assert [row[0] for row in faith["data"]] == ["explainer", "gradcam"]
    assert len(list(folder.glob("files/media/images/eval/figures/*.png"))) == 2  # fig1, the class-specific heat map


@pytest.mark.numerics
def test_evaluator_without_segmentation_and_bad_settings():
    clf = colour_classifier(gain=40)
    ev = Evaluator(clf, {"explainer": MaskNetwork("explainer", OracleExplainer())}, CLASSES, EvalConfig(),
                   torch.device("cpu"))
    batch = toy_batch(0)
    batch["has_seg"][:] = False
    ev.update(batch)
    res = ev.finish()
    assert res["n_seg_images"] == 0 and res["segmentation"]["explainer"]["n"] == 0
    assert res["classification"]["clean"]["f1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="class_specific_classes"):
        Evaluator(clf, {}, CLASSES, EvalConfig(class_specific_classes=["blue"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown"):
        parse_methods("explainer,igos")
    assert parse_methods("explainer, gradcam,explainer") == ["explainer", "gradcam"]


# ----------------------------------------------------------------------------------------------------------------------
# End to end on real shards (the shared session fixtures): python -m explainer.evaluate, 1 and 2 processes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explainer_checkpoints(synthetic_manifest, tmp_path_factory) -> tuple[Path, Path]:
    """Two untrained tiny_unet checkpoints (the numbers do not matter here, only that every sample counts once)."""
    from explainer.data.loader import read_manifest
    from explainer.models import build_explainer, save_model_file

    classes = read_manifest(synthetic_manifest).classes
    out = tmp_path_factory.mktemp("explainers")
    paths = []
    for seed, name in enumerate(("explainer.pt", "rtis.pt")):
        torch.manual_seed(seed)
        paths.append(save_model_file(out / name, build_explainer("tiny_unet", len(classes)), kind="explainer",
                                     arch="tiny_unet", num_classes=len(classes), classes=list(classes),
                                     image_size=32))
    return paths[0], paths[1]



def _evaluate_cmd(manifest: Path, classifier: Path, checkpoint: Path, out: Path, methods: str,
                  extra: list[str] = (), procs: int = 1) -> list[str]:
    launcher = [PYTHON] if procs == 1 else [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                                            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    # overrides on both sides of the options (parsed intermixed)
    return [*launcher, "-m", "explainer.evaluate", "--config", "configs/synthetic.yaml", f"data.manifest={manifest}",
            "--checkpoint", str(checkpoint), "--classifier", str(classifier), "--methods", methods, "--out", str(out),
            "--no-progress", *extra, "data.image_size=32", "data.batch_size=8",
            "data.num_workers=0", "eval.rise_masks=100", "eval.rise_batch=100", "eval.ep_iterations=5",
            "eval.ep_areas=[0.1,0.3]", "eval.wsol_frame=image"]  # WSOL at 32 px: the 224 frame is test_wsol.py's


@pytest.mark.numerics
@pytest.mark.slow
def test_evaluate_end_to_end_one_and_two_processes(synthetic_manifest, tiny_classifier, explainer_checkpoints,
                                                   tmp_path):
    from explainer.data.loader import read_manifest

    total = read_manifest(synthetic_manifest).splits["test"].total
    explainer_pt, rtis_pt = explainer_checkpoints
    one, two = tmp_path / "one", tmp_path / "two"
    run_cmd(_evaluate_cmd(synthetic_manifest, tiny_classifier, explainer_pt, one, "explainer,gradcam,rise,ep,rtis",
                          ["--rtis-checkpoint", str(rtis_pt)]))
    run_cmd(_evaluate_cmd(synthetic_manifest, tiny_classifier, explainer_pt, two, "explainer,gradcam,rise",
                          procs=2), env={"ACCELERATE_USE_CPU": "1"})
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert a["n_images"] == b["n_images"] == total and b["settings"]["world_size"] == 2
    assert a["key_checksum"] == b["key_checksum"]  # the same samples, each once
    for row in ("explainer", "gradcam", "rise", "0", "0.5", "1", "G.T."):
        assert b["segmentation"][row]["n"] == a["segmentation"][row]["n"] == a["n_seg_images"]
        for metric in ("acc", "iou", "mae", "sal"):
            assert b["segmentation"][row][metric] == pytest.approx(a["segmentation"][row][metric], abs=1e-6)
    for row_a, row_b in zip(a["class_specific"]["explainer"]["table"], b["class_specific"]["explainer"]["table"]):
        assert row_b == pytest.approx(row_a)
    for key in ("precision", "recall", "f1", "macro_f1"):
        assert b["classification"]["clean"][key] == pytest.approx(a["classification"]["clean"][key])
        assert b["classification"]["masked"]["explainer"][key] == pytest.approx(
            a["classification"]["masked"]["explainer"][key])
    for row in ("explainer", "gradcam", "rise"):  # faithfulness sums: N processes = 1 process
        fa, fb = a["faithfulness"]["methods"][row], b["faithfulness"]["methods"][row]
        assert fa["pairs"] == fb["pairs"] > 0 and fa["pointing_pairs"] == fb["pointing_pairs"] > 0
        for key in ("deletion_auc", "insertion_auc", "rise_deletion_auc", "rise_insertion_auc", "pointing_accuracy",
                    "pointing_accuracy_pooled"):
            assert fb[key] == pytest.approx(fa[key], abs=1e-6), (row, key)
        # the synthetic shards carry VOC boxes: the headline is TorchRay's box test, the mask test beside it
        assert fa["pointing_annotation"] == "box" and fa["pointing_pairs"] == fa["pairs"]
        assert fa["pointing_mask"]["pairs"] > 0 and fa["rise_pairs"] == total
    for row in ("explainer", "gradcam", "rise"):  # WSOL counts and histograms: N processes = 1 process
        la, lb = a["localization"]["methods"][row], b["localization"]["methods"][row]
        assert la["box_pairs"] == lb["box_pairs"] == a["faithfulness"]["methods"][row]["pointing_pairs"] > 0
        assert la["pixel_pairs"] == lb["pixel_pairs"] > 0
        for key in ("maxboxacc_v2", "maxboxacc_v1", "pxap", "boxacc_50_per_class"):
            assert lb[key] == pytest.approx(la[key], abs=1e-9), (row, key)
    assert a["localization"]["settings"]["frame"] == "image" and len(a["localization"]["methods"]) == 5
    assert a["scored"] == {"images": total, "skipped": 0, "problems": [],
                           "per_method": {m: total for m in ("explainer", "gradcam", "rise", "ep", "rtis")}}
    assert b["scored"]["images"] == total and b["scored"]["skipped"] == 0
    assert set(a["faithfulness"]["methods"]) == {"explainer", "gradcam", "rise", "ep", "rtis"}
    # configs/synthetic.yaml: 8 steps; data.image_size=32 here
    assert a["faithfulness"]["settings"]["steps"] == 8 and a["faithfulness"]["settings"]["image_size"] == 32
    assert set(a["segmentation"]) >= {"ep", "rtis"} and set(a["class_specific"]) == {"explainer", "rtis"}
    assert a["timing"]["ep"]["images"] == total and a["timing"]["ep"]["autograd"]
    # one EP map per (image, ground-truth class): at least one per labelled image
    assert set(a["ep_chosen_areas"]) == {"0.1", "0.3"}
    assert sum(a["ep_chosen_areas"].values()) >= a["segmentation"]["ep"]["n"]
    report = (one / "report.md").read_text()
    assert "pointing (TorchRay)" in report and "RISE deletion" in report and "## Images scored" in report
    assert "| RTIS |" in report and "| Extremal P. |" in report and "masked (Explainer)" in report
    assert "## Localization (WSOL, Choe et al. 2020)" in report
    assert (one / "figures" / "fig1.png").is_file() and (two / "figures" / "fig1.png").is_file()


@pytest.mark.slow
def test_evaluate_max_images_across_two_processes_and_errors(synthetic_manifest, tiny_classifier,
                                                             explainer_checkpoints, tmp_path):
    explainer_pt, _ = explainer_checkpoints
    run_cmd(_evaluate_cmd(synthetic_manifest, tiny_classifier, explainer_pt, tmp_path / "m", "explainer",
                          ["--max-images", "10"], procs=2), env={"ACCELERATE_USE_CPU": "1"})
    assert json.loads((tmp_path / "m" / "results.json").read_text())["n_images"] == 10
    proc = run_cmd(_evaluate_cmd(synthetic_manifest, tiny_classifier, explainer_pt, tmp_path / "r", "explainer,rtis"),
                   check=False)
    assert proc.returncode != 0 and "--rtis-checkpoint" in proc.stderr


def test_softmax_classifier_rules_and_figures_in_the_classifiers_colours():
    """softmax=True (loss.classification=ce): Table 4 predicts the top-1 class (one per image, so an image with two
    classes misses one) and faithfulness_prob=auto means softmax; the figure images undo the classifier's mean/std."""
    clf = colour_classifier(gain=40)
    ev = Evaluator(clf, {"explainer": MaskNetwork("explainer", OracleExplainer())}, CLASSES,
                   EvalConfig(faithfulness_steps=4), torch.device("cpu"), figure_images=2,
                   norm={"mean": (0.5,) * 3, "std": (0.5,) * 3}, softmax=True)
    batch = toy_batch(0)
    assert batch["labels"].sum() > len(batch["labels"])  # some image has both classes
    ev.update(batch)
    res = ev.finish()
    clean = res["classification"]["clean"]
    assert clean["rule"] == "top-1 (softmax)" and clean["precision"] == pytest.approx(1.0)
    assert clean["recall"] == pytest.approx(len(batch["labels"]) / float(batch["labels"].sum()))
    assert res["faithfulness"]["settings"]["probability"] == "softmax"
    images, _, _ = ev.figure_data()
    assert torch.allclose(images, batch["image"][:2] * 0.5 + 0.5)


def _manifest_copy(manifest: Path, tmp_path: Path, edit) -> Path:
    """A copy of the shards whose manifest `edit` changed."""
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(manifest.parent, folder, ignore=shutil.ignore_patterns("source"))
    raw = json.loads(manifest.read_text())
    edit(raw)
    (folder / manifest.name).write_text(json.dumps(raw))
    return folder / manifest.name


def _evaluate_in_process(manifest: Path, classifier: Path, checkpoint: Path, out: Path) -> dict:
    from explainer.config import ExplainerRunConfig, load_config
    from explainer.evaluate import evaluate

    cfg = load_config(ExplainerRunConfig, "configs/synthetic.yaml", [
        f"data.manifest={manifest}", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
        "eval.faithfulness_steps=0"])
    return evaluate(cfg, str(checkpoint), classifier=str(classifier), methods=["explainer"], out=str(out),
                    progress=False, figure_images=0)


def test_evaluate_refuses_an_empty_test_split(synthetic_manifest, tiny_classifier, explainer_checkpoints, tmp_path):
    def empty(raw):
        raw["splits"]["test"] = {"shards": [], "total": 0}

    manifest = _manifest_copy(synthetic_manifest, tmp_path, empty)
    with pytest.raises(ValueError, match=r"nothing to evaluate: manifest .* lists 0 samples in split 'test'"):
        _evaluate_in_process(manifest, tiny_classifier, explainer_checkpoints[0], tmp_path / "out")
    assert not (tmp_path / "out" / "results.json").exists()


def test_evaluate_records_what_it_scored_and_skipped(synthetic_manifest, tiny_classifier, explainer_checkpoints,
                                                     tmp_path):
    def shorter(raw):  # the manifest lists one sample fewer than the first test shard holds
        raw["splits"]["test"]["shards"][0]["count"] -= 1
        raw["splits"]["test"]["total"] -= 1

    manifest = _manifest_copy(synthetic_manifest, tmp_path, shorter)
    total = json.loads(manifest.read_text())["splits"]["test"]["total"]
    _evaluate_in_process(manifest, tiny_classifier, explainer_checkpoints[0], tmp_path / "out")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["scored"]["images"] == total and res["scored"]["per_method"] == {"explainer": total}
    assert len(res["scored"]["problems"]) == 1 and "holds more samples" in res["scored"]["problems"][0]
    assert "holds more samples" in (tmp_path / "out" / "report.md").read_text()
