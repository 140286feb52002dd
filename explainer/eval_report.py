"""Reporting of an evaluation's results dict: report.md (the paper's tables), results.json, figures, W&B tables.

Everything here reads the dict that explainer.evaluator.Evaluator.finish builds (plus the figure images it kept);
nothing is measured here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainer.atomic import write_text_atomic
from explainer.config import TrackingConfig

if TYPE_CHECKING:
    from explainer.evaluator import Evaluator

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _title(name: str) -> str:
    from explainer.figures import METHOD_TITLES

    return METHOD_TITLES.get(name, name)


def _header_lines(res: dict[str, Any]) -> list[str]:
    info = res.get("settings", {})
    return ["# Evaluation report", "", f"- explainer checkpoint: `{info.get('checkpoint')}`",
            f"- classifier: `{info.get('classifier')}`",
            f"- data: `{info.get('manifest')}` split `{info.get('split')}`: {res['n_images']} images, "
            f"{res['n_seg_images']} with segmentation; {info.get('world_size', 1)} process(es) on "
            f"{info.get('device')}", f"- date: {info.get('date')}", ""]


def _segmentation_lines(res: dict[str, Any]) -> list[str]:
    lines = ["## Table 2: segmentation scores of the aggregated mask", "",
             "Mask = pixel-wise max over the image's ground-truth classes, compared with the binary ground truth; "
             "void pixels excluded (the reference counted them as foreground). Acc, IoU higher is better; MAE, Sal "
             "lower is better.", "",
             "| method | Acc | IoU | MAE | Sal | images |", "|---|---|---|---|---|---|"]
    for row, s in res["segmentation"].items():
        name = _title(row) if s["kind"] == "method" else f"*{row}*"
        lines.append(f"| {name} | {_fmt(s['acc'])} | {_fmt(s['iou'])} | {_fmt(s['mae'])} | {_fmt(s['sal'], 2)} | "
                     f"{s['n']} |")
    return [*lines, ""]


def _class_specific_lines(name: str, cs: dict[str, Any]) -> list[str]:
    """Rows of target classes without a test image are left out (they would be all dashes); columns stay."""
    lines = [f"## Table 1: class-specific masking ({_title(name)})", "",
             "Softmax probability (x100) of the target class (row) when the image is multiplied by the "
             f"thresholded mask of the column class, averaged over thresholds {cs['thresholds']} and the test "
             "images containing the target; \"none\" = unmasked. Good: high diagonal, low off-diagonal.", "",
             "| target \\ mask | " + " | ".join(cs["columns"]) + " | images |",
             "|---" * (len(cs["columns"]) + 2) + "|"]
    hidden = []
    for i, (target, row, n) in enumerate(zip(cs["targets"], cs["table"], cs["images_per_target"])):
        if not n:
            hidden.append(target)
            continue
        cells = [("**" + _fmt(v * 100, 2) + "**") if j == i else _fmt(v * 100, 2) for j, v in enumerate(row)]
        lines.append(f"| {target} | " + " | ".join(cells) + f" | {int(n)} |")
    lines += ["", f"Mean diagonal {_fmt(cs['mean_diagonal'] * 100, 2)} (worst "
                  f"{_fmt(cs.get('min_diagonal', math.nan) * 100, 2)}), mean off-diagonal "
                  f"{_fmt(cs['mean_off_diagonal'] * 100, 2)}, max off-diagonal "
                  f"{_fmt(cs['max_off_diagonal'] * 100, 2)}."]
    if hidden:
        lines.append(f"Classes without a test image (rows left out): {', '.join(hidden)}.")
    return [*lines, ""]


def _classification_lines(res: dict[str, Any]) -> list[str]:
    cls = res["classification"]
    lines = ["## Table 4: classification before and after masking", "",
             "Micro-averaged over (image, class) pairs; macro F1 = mean over classes. Clean images: logit >= 0; "
             "images multiplied by the method's aggregated mask: logit >= -1 (the paper's convention). A softmax "
             "classifier (loss.classification=ce) predicts its top-1 class instead.", "",
             "| images | rule | P | R | F1 | macro F1 |", "|---|---|---|---|---|---|"]
    rows = [("clean", cls["clean"])] + [(f"masked ({_title(n)})", v) for n, v in cls["masked"].items()]
    for name, v in rows:
        rule = v.get("rule", f"logit >= {v['threshold']:g}")
        lines.append(f"| {name} | {rule} | {_fmt(v['precision'] * 100, 1)} | "
                     f"{_fmt(v['recall'] * 100, 1)} | {_fmt(v['f1'] * 100, 1)} | {_fmt(v['macro_f1'] * 100, 1)} |")
    return [*lines, ""]


def _timing_lines(res: dict[str, Any]) -> list[str]:
    lines = ["## Table 3: time per image", "",
             "The method alone (the Explainer: one forward pass for all classes, no classifier), device "
             "synchronised, after one untimed warm-up call of the cheap methods; autograd off unless the method "
             "needs gradients. Per process; batch size "
             f"{res.get('settings', {}).get('batch_size')}.", "",
             "| method | ms / image | images | autograd | device |", "|---|---|---|---|---|"]
    for name, v in res["timing"].items():
        lines.append(f"| {_title(name)} | {_fmt(v['seconds_per_image'] * 1000, 2)} | {v['images']} | "
                     f"{'yes' if v['autograd'] else 'no'} | {v['device']} |")
    return [*lines, ""]


def _faithfulness_lines(res: dict[str, Any]) -> list[str]:
    faith = res.get("faithfulness")
    if not faith:
        return []
    st = faith["settings"]
    lines = ["## Faithfulness (beyond the paper)", "",
             f"Deletion / insertion AUC (Petsiuk et al. 2018), ours: every (image, ground-truth class) pair, pixels "
             f"in decreasing order of the class's map ({st['pixel_order']}), {st['steps']} equal steps; deletion "
             f"sets them to {st['deletion_value']}, insertion copies them into the blurred start "
             f"({st['insertion_start']}); the {st['probability']} probability, trapezoid rule. RISE protocol: "
             f"{st['rise']['classes']}, softmax, deletion {st['rise']['deletion']}, insertion "
             f"{st['rise']['insertion']}. Lower deletion and higher insertion are better.", "",
             f"Pointing game as TorchRay's benchmark: the map resized to the original image, a hit when its maximum "
             f"lies within {st['pointing_tolerance_px']:g} original px of the class's boxes (VOC XML; pairs whose "
             "boxes are all difficult skipped) or, beside it, of the class's segmentation pixels (void counted for "
             "no class). Headline: TorchRay's accuracy, the mean over all classes (a class without pairs scores 0); "
             "pooled = hits / pairs.", "",
             "| method | deletion AUC | insertion AUC | pairs | RISE deletion | RISE insertion | images | "
             "pointing (TorchRay) | against | pooled | pairs | skipped difficult | mask-based | mask pairs |",
             "|---" * 14 + "|"]
    for name, v in faith["methods"].items():
        mask = v["pointing_mask"]
        lines.append(f"| {_title(name)} | {_fmt(v['deletion_auc'])} | {_fmt(v['insertion_auc'])} | {v['pairs']} | "
                     f"{_fmt(v['rise_deletion_auc'])} | {_fmt(v['rise_insertion_auc'])} | {v['rise_pairs']} | "
                     f"{_fmt(v['pointing_accuracy'] * 100, 1)} | {v['pointing_annotation']} | "
                     f"{_fmt(v['pointing_accuracy_pooled'] * 100, 1)} | {v['pointing_pairs']} | "
                     f"{v['pointing_skipped_difficult']} | {_fmt(mask['accuracy_torchray'] * 100, 1)} | "
                     f"{mask['pairs']} |")
    return [*lines, ""]


def _localization_lines(res: dict[str, Any]) -> list[str]:
    """The WSOL table (explainer/wsol.py), in percent as the field reports it."""
    loc = res.get("localization")
    if not loc:
        return []
    st = loc["settings"]
    lines = ["## Localization (WSOL, Choe et al. 2020)", "",
             f"Every (image, ground-truth class) pair with boxes / a segmentation; the class's map min-max normalised "
             f"in the {st['frame']} frame ({st['frame_description']}); thresholds every {st['cam_curve_interval']:g}. "
             "MaxBoxAccV2: boxes of all contours, best threshold per IoU 30/50/70, their mean. MaxBoxAcc: largest "
             "contour, IoU 50 (= GT-known loc at its best threshold); top-1 loc: also the classifier's top-1 right "
             "(single-label data only). PxAP: area under the pixel precision-recall curve, void excluded. Percent.",
             "", "| method | MaxBoxAccV2 | IoU 30 | IoU 50 | IoU 70 | MaxBoxAcc (V1) | top-1 loc | box pairs | PxAP | "
             "pixel pairs |", "|---" * 10 + "|"]
    for name, v in loc["methods"].items():
        iou = v["maxboxacc_v2_iou"]
        lines.append(f"| {_title(name)} | {_fmt(v['maxboxacc_v2'], 1)} | {_fmt(iou['30'], 1)} | {_fmt(iou['50'], 1)} | "
                     f"{_fmt(iou['70'], 1)} | {_fmt(v['maxboxacc_v1'], 1)} | {_fmt(v['top1_loc'], 1)} | "
                     f"{v['box_pairs']} | {_fmt(v['pxap'], 1)} | {v['pixel_pairs']} |")
    return [*lines, ""]


def _scored_lines(res: dict[str, Any]) -> list[str]:
    """How many images each method scored and what the loader skipped (nothing silent)."""
    scored = res.get("scored")
    if not scored:
        return []
    lines = ["## Images scored", "", f"{scored['images']} images scored by every method; "
             f"{scored['skipped']} skipped by the loader.", ""]
    lines += [f"- {note}" for note in scored["problems"][:50]]
    if len(scored["problems"]) > 50:
        lines.append(f"- ... {len(scored['problems']) - 50} more in results.json")
    return [*lines, ""]


def markdown_report(res: dict[str, Any]) -> str:
    """The paper's four tables (in its numbering) and the faithfulness table, as markdown."""
    lines = _header_lines(res) + _segmentation_lines(res)
    for name, cs in res["class_specific"].items():
        lines += _class_specific_lines(name, cs)
    lines += _classification_lines(res) + _timing_lines(res) + _faithfulness_lines(res) + _localization_lines(res)
    lines += _scored_lines(res)
    if res.get("figures"):
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in res["figures"]] + [""]
    return "\n".join(lines)


def json_safe(obj: Any) -> Any:
    """`obj` with NaN and infinities as None (JSON has no NaN), through dicts, lists and tuples."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_outputs(res: dict[str, Any], evaluator: Evaluator, out: Path) -> dict[str, Any]:
    """results.json, report.md and the figures (rank 0 only)."""
    from explainer.figures import class_specific_heatmap, fig1_panel

    figures = []
    data = evaluator.figure_data()
    if data is not None:
        images, labels, maps = data
        fig1_panel(images, labels, maps, res["classes"], out / "figures" / "fig1.png")
        figures.append("figures/fig1.png")
    for name, cs in res["class_specific"].items():
        path = out / "figures" / f"class_specific_{name}.png"
        class_specific_heatmap(cs["table"], cs["targets"], cs["columns"], path,
                               title=f"class-specific masking ({name}), x100")
        figures.append(f"figures/class_specific_{name}.png")
    res["figures"] = figures
    write_text_atomic(out / "results.json", json.dumps(json_safe(res), indent=2))
    write_text_atomic(out / "report.md", markdown_report(res))
    from explainer.report_html import evaluate_html

    write_text_atomic(out / "report.html", evaluate_html(res, out, getattr(evaluator, "galleries", None)))
    return res


def wandb_tables(res: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Every report table as (columns, rows), for W&B (keys: eval/<table>)."""
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
    metrics = ["acc", "iou", "mae", "sal", "n"]
    tables["segmentation"] = (["row", *metrics], [[row, *(v[m] for m in metrics)]
                                                  for row, v in res["segmentation"].items()])
    for name, cs in res["class_specific"].items():
        tables[f"class_specific_{name}"] = (["target", *cs["columns"], "images"], [
            [t, *row, n] for t, row, n in zip(cs["targets"], cs["table"], cs["images_per_target"]) if n])
    cls = res["classification"]
    keys = ["threshold", "precision", "recall", "f1", "macro_f1"]
    tables["classification"] = (["images", *keys], [["clean", *(cls["clean"][k] for k in keys)]] + [
        [f"masked ({n})", *(v[k] for k in keys)] for n, v in cls["masked"].items()])
    tables["timing"] = (["method", "ms_per_image", "images", "autograd", "device"], [
        [n, v["seconds_per_image"] * 1000, v["images"], v["autograd"], v["device"]] for n, v in res["timing"].items()])
    if res.get("faithfulness"):
        keys = ["deletion_auc", "insertion_auc", "pairs", "rise_deletion_auc", "rise_insertion_auc", "rise_pairs",
                "pointing_accuracy", "pointing_annotation", "pointing_accuracy_pooled", "pointing_pairs"]
        tables["faithfulness"] = (["method", *keys], [[n, *(v[k] for k in keys)]
                                                      for n, v in res["faithfulness"]["methods"].items()])
    if res.get("localization"):
        keys = ["maxboxacc_v2", "maxboxacc_v1", "gt_known_loc", "top1_loc", "box_pairs", "pxap", "pixel_pairs"]
        tables["localization"] = (["method", *keys, "iou30", "iou50", "iou70"], [
            [n, *(v[k] for k in keys), *(v["maxboxacc_v2_iou"][i] for i in ("30", "50", "70"))]
            for n, v in res["localization"]["methods"].items()])
        methods = list(res["localization"]["methods"])
        per_class = [v["boxacc_50_per_class"] for v in res["localization"]["methods"].values()]
        names = [c for c in res["classes"] if any(c in p for p in per_class)]
        if names:
            tables["localization_per_class"] = (["class", *methods], [[c, *(p.get(c) for p in per_class)]
                                                                      for c in names])
    return tables


def log_to_wandb(res: dict[str, Any], out: Path, tracking: TrackingConfig, checkpoint: str | None) -> Path | None:
    """The report's tables (wandb.Table) and figures (wandb.Image) as a W&B run of the training run's project.

    Offline unless an API key is configured (`tracking.wandb_mode`, as training); the run files go to <out>/wandb
    (`wandb sync` uploads them). The run is grouped with the training run (its id, from the checkpoint's folder)
    and has job_type "evaluate". Returns the run folder, or None when W&B is disabled.
    """
    from explainer.tracking import RUN_ID_FILE, resolve_wandb_mode

    mode = resolve_wandb_mode(tracking.wandb_mode)
    if mode == "disabled":
        return None
    import wandb

    id_file = Path(checkpoint).parent / RUN_ID_FILE if checkpoint else None
    group = tracking.group or (id_file.read_text().strip() if id_file and id_file.is_file() else None)
    out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=tracking.project, entity=tracking.entity, group=group, job_type="evaluate",
                     tags=list(tracking.tags), dir=str(out), mode=mode, config=json_safe(res.get("settings", {})),
                     settings=wandb.Settings(silent=True))
    logged: dict[str, Any] = {}
    for name, (columns, rows) in wandb_tables(json_safe(res)).items():
        logged[f"eval/{name}"] = wandb.Table(columns=columns, data=rows)
    for figure in res.get("figures", []):
        logged[f"eval/figures/{Path(figure).stem}"] = wandb.Image(str(out / figure), caption=Path(figure).stem)
    run.log(logged)
    for row, v in res["segmentation"].items():
        if v["kind"] == "method":
            run.summary[f"eval/{row}/iou"] = v["iou"]
    folder = Path(run.dir).parent
    run.finish()
    return folder
