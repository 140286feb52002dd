"""Evaluate an Explainer and the baselines on the test split: the paper's Tables 1-4 and a Fig. 1 style panel.

    python -m explainer.evaluate --config X.yaml --checkpoint run/explainer.pt \
        [--classifier classifier.pt] [--methods explainer,gradcam,rise,ep,rtis] [--rtis-checkpoint rtis.pt] \
        [--max-images N] [--out DIR] [key=value ...]
    (also `explainer evaluate ...`, and under torchrun / accelerate launch with any number of processes)

Every process evaluates its own share of the test split (make_eval_loader splits by rank, each sample exactly once);
per-image scores are summed with their counts and all-reduced once at the end, so N processes give the numbers of
one. Written by rank 0 under --out (default: eval.output_dir, else <checkpoint folder>/eval):
    results.json    every number below plus the settings that produced it
    report.md       Table 2 (segmentation scores per method + sanity rows), Table 1 (class-specific masking),
                    Table 4 (classification clean vs Explainer-masked), Table 3 (time per image per method)
    figures/fig1.png, figures/class_specific_<method>.png

Protocol (docs/method.md#evaluation): masks are aggregated over each image's ground-truth classes (pixel-wise max) and
compared with the binary ground truth at the mask's resolution, void pixels excluded (the reference counted them as
foreground). Table 2 uses the images that have a segmentation and at least one class. Table 4 uses every image; its
masked column multiplies each image by the Explainer's aggregated mask (an image without classes gets m = 0, as in
training). Timing: the method alone (for the Explainer: its forward pass, no classifier), autograd off where the method
allows (Grad-CAM and Extremal Perturbations need it), device synchronised before and after, after one untimed warm-up
call of the cheap methods (Explainer, RTIS, Grad-CAM) on the first image.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from explainer import metrics as M
from explainer.atomic import write_text_atomic
from explainer.baselines import BASELINES, AttributionMethod, build_baseline
from explainer.config import (
    EvalConfig,
    ExplainerRunConfig,
    TrackingConfig,
    input_normalization,
    load_config,
    to_dict,
)
from explainer.logs import configure_logging, get_logger

MASK_METHODS = ("explainer", "rtis")
WARMUP_METHODS = ("explainer", "rtis", "gradcam")  # one untimed call first (lazy init, allocator); the others are
# hundreds of classifier passes per image already
ALL_METHODS = MASK_METHODS + BASELINES
METRICS = ("acc", "iou", "mae", "sal")

log = get_logger(__name__)


class MaskNetwork:
    """An Explainer-architecture network (ours or RTIS) as an attribution method: all class masks in one pass."""

    needs_grad = False

    def __init__(self, name: str, net: nn.Module) -> None:
        self.name, self.net = name, net.eval()

    def __call__(self, images: Tensor, wanted: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.sigmoid(self.net(images)).float()


def parse_methods(text: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown or empty {unknown or names!r}; choose from {', '.join(ALL_METHODS)}")
    return list(dict.fromkeys(names))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MethodExtras(Protocol):
    """Optional hook of an attribution method with numbers of its own for results.json (e.g. Extremal Perturbations:
    how often each area was chosen). Sums are all-reduced like every other total, so N processes give one's result."""

    def batch_totals(self) -> dict[str, Tensor]:
        """Sums over the images since the last call (the method then forgets them)."""
        ...

    def results(self, totals: dict[str, Tensor]) -> dict[str, Any]:
        """Top-level results.json entries from the all-reduced sums."""
        ...


class Evaluator:
    """Accumulates every table over batches; `finish` all-reduces and turns sums into the results dict.

    `update` adds per-batch sums (one helper per table); `finish` builds each table from the sums (one builder per
    table). A method may add numbers of its own through the `MethodExtras` hook.
    """

    def __init__(self, classifier: nn.Module, methods: dict[str, AttributionMethod], classes: Sequence[str],
                 cfg: EvalConfig, device: torch.device, figure_images: int = 0,
                 norm: dict[str, Sequence[float]] | None = None, softmax: bool = False) -> None:
        """`softmax`: a softmax classifier (loss.classification=ce): Table 4 predicts its top-1 class, and
        eval.faithfulness_prob=auto means softmax."""
        if cfg.faithfulness_prob == "auto":
            cfg = dataclasses.replace(cfg, faithfulness_prob="softmax" if softmax else "sigmoid")
        self.softmax = softmax
        self.classifier, self.methods, self.classes, self.cfg, self.device = classifier, methods, list(classes), cfg, \
            device
        names = cfg.class_specific_classes or self.classes
        missing = [n for n in names if n not in self.classes]
        if missing:
            raise ValueError(f"eval.class_specific_classes: {missing} not among the classes {self.classes}")
        self.targets = [self.classes.index(n) for n in names]
        if not cfg.thresholds or any(not 0.0 <= t < 1.0 for t in cfg.thresholds):
            raise ValueError(f"eval.thresholds must be a non-empty list in [0, 1), got {cfg.thresholds}")
        if cfg.faithfulness_steps < 0:
            raise ValueError(f"eval.faithfulness_steps must be >= 0 (0 = off), got {cfg.faithfulness_steps}")
        if cfg.faithfulness_prob not in M.FAITHFULNESS_PROBS:
            raise ValueError(f"eval.faithfulness_prob must be one of {M.FAITHFULNESS_PROBS}, got "
                             f"{cfg.faithfulness_prob!r}")
        if cfg.deletion_substrate not in M.DELETION_SUBSTRATES:
            raise ValueError(f"eval.deletion_substrate must be one of {M.DELETION_SUBSTRATES}, got "
                             f"{cfg.deletion_substrate!r}")
        if cfg.pointing_tolerance < 0:
            raise ValueError(f"eval.pointing_tolerance must be >= 0 px, got {cfg.pointing_tolerance}")
        self.totals = M.Totals()
        self.figure_images = figure_images
        self.figure: dict[str, Any] = {"images": [], "labels": [], "maps": {m: [] for m in methods}}
        self.norm = dict(norm or {})  # the classifier's mean/std, undone for the figures
        self.warm = False
        self.image_size: int | None = None

    # ------------------------------------------------------------------------------------------------------------------
    def update(self, batch: dict[str, Any]) -> None:
        x = batch["image"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device)
        b = x.shape[0]
        self.image_size = min(x.shape[-2:])
        has_seg = torch.as_tensor(batch.get("has_seg", torch.zeros(b, dtype=torch.bool))).to(self.device).bool()
        rows = (has_seg & (labels.sum(1) > 0)).nonzero().flatten()
        seg = batch["seg"].to(self.device)[rows] if len(rows) else None
        t = self.totals
        t.add("n/images", float(b))
        # order-free fingerprint of the keys seen: equal for 1 and N processes iff every sample is counted once
        t.add("n/key_checksum", float(sum(zlib.crc32(str(k).encode()) for k in batch.get("key", []))))
        t.add("n/seg_images", float(len(rows)))
        with torch.no_grad():
            clean = self.classifier(x)
        t.add("cls/clean", self._counts(clean, labels, M.CLEAN_THRESHOLD))
        if seg is not None:
            for name, mask in M.sanity_masks(seg).items():
                self._segmentation(f"sanity/{name}", x[rows], mask, seg, labels[rows])
        self._warm_up(x, labels > 0)
        start = M.insertion_start(x, *M.blur_taps(self.image_size)) if self.cfg.faithfulness_steps else None
        kept: dict[str, Tensor] = {}
        for name, method in self.methods.items():
            maps = self._timed_maps(name, method, x, labels > 0)
            kept[name] = maps
            m = M.aggregate(maps, labels)
            if seg is not None:
                self._segmentation(f"method/{name}", x[rows], m[rows], seg, labels[rows])
            if name in MASK_METHODS:
                self._masked_classification(name, x, m, labels)
                self._class_specific(name, x, maps, labels)
            if start is not None:
                self._deletion_insertion(name, x, maps, labels, start)
            self._pointing(name, maps, labels, batch, has_seg)
            self._method_extras(name, method)
        self._collect_figure(x, labels, kept)

    def _warm_up(self, x: Tensor, wanted: Tensor) -> None:
        if not self.warm:
            for name in WARMUP_METHODS:
                if name in self.methods:
                    self.methods[name](x[:1], wanted[:1])
            self.warm = True

    def _timed_maps(self, name: str, method: AttributionMethod, x: Tensor, wanted: Tensor) -> Tensor:
        _sync(self.device)
        start = time.perf_counter()
        maps = method(x, wanted)
        _sync(self.device)
        self.totals.add(f"time/{name}/seconds", time.perf_counter() - start)
        self.totals.add(f"time/{name}/images", float(x.shape[0]))
        return maps.detach().float()

    def _segmentation(self, key: str, x: Tensor, mask: Tensor, seg: Tensor, labels: Tensor) -> None:
        for metric, values in M.segmentation_scores(mask, seg).items():
            self.totals.add_values(f"{key}/{metric}", values)
        self.totals.add_values(f"{key}/sal", M.saliency_scores(self.classifier, x, mask, labels))

    def _counts(self, logits: Tensor, labels: Tensor, threshold: float) -> Tensor:
        """Table 4's [3, C] counts: a softmax classifier predicts its top-1 class; a multi-label one logit >= t."""
        if self.softmax:
            top1 = torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1.0)
            return M.classification_counts(top1, labels, 0.5)
        return M.classification_counts(logits, labels, threshold)

    def _rule(self, threshold: float) -> str:
        return "top-1 (softmax)" if self.softmax else f"logit >= {threshold:g}"

    def _masked_classification(self, name: str, x: Tensor, m: Tensor, labels: Tensor) -> None:
        with torch.no_grad():
            masked = self.classifier(x * m[:, None])
        self.totals.add(f"cls/masked/{name}", self._counts(masked, labels, M.MASKED_THRESHOLD))

    def _class_specific(self, name: str, x: Tensor, maps: Tensor, labels: Tensor) -> None:
        sums, counts = M.class_specific_sums(self.classifier, x, maps, labels, self.targets, self.targets,
                                             self.cfg.thresholds)
        self.totals.add(f"cs/{name}/sums", sums)
        self.totals.add(f"cs/{name}/counts", counts)

    def _deletion_insertion(self, name: str, x: Tensor, maps: Tensor, labels: Tensor, start: Tensor) -> None:
        """Per-class sums of the deletion / insertion AUC: every (image, ground-truth class) pair (ours) and, with
        eval.faithfulness_rise, every image's top-1 class (the RISE code's protocol)."""
        deletion, insertion, cls = M.deletion_insertion_auc(self.classifier, x, maps, labels,
                                                            self.cfg.faithfulness_steps, self.cfg.faithfulness_prob,
                                                            start, deletion_substrate=self.cfg.deletion_substrate)
        self._add_per_class(f"faith/{name}", cls, deletion=deletion, insertion=insertion,
                            pairs=torch.ones_like(deletion))
        if self.cfg.faithfulness_rise:
            deletion, insertion, cls = M.rise_deletion_insertion_auc(self.classifier, x, maps)
            self._add_per_class(f"rise/{name}", cls, deletion=deletion, insertion=insertion,
                                pairs=torch.ones_like(deletion))

    def _add_per_class(self, prefix: str, cls: Tensor, **values: Tensor) -> None:
        zeros = torch.zeros(len(self.classes), dtype=torch.float64)
        for key, v in values.items():
            self.totals.add(f"{prefix}/{key}", zeros.index_add(0, cls, v.double()))

    def _pointing(self, name: str, maps: Tensor, labels: Tensor, batch: dict[str, Any], has_seg: Tensor) -> None:
        """Pointing game (TorchRay's benchmark): per class, hits and pairs against the boxes and against the
        segmentation (each where the image has them), and the pairs skipped as all-difficult."""
        b, _, h, w = maps.shape
        sizes = batch.get("orig_size")
        sizes = torch.as_tensor(sizes) if sizes is not None else torch.tensor([[w, h]] * b)  # no original: as is
        seg = [batch["seg_classes"][i] if bool(has_seg[i]) else None for i in range(b)] \
            if "seg_classes" in batch else None
        res = M.pointing_game(maps, labels, sizes, self.cfg.pointing_tolerance, seg, batch.get("objects"))
        cls = res["cls"]
        self._add_per_class(f"point/{name}", cls, skipped=res["skipped"],
                            box_hits=res["box"] == 1, box_pairs=res["box"] >= 0,
                            mask_hits=res["mask"] == 1, mask_pairs=res["mask"] >= 0)

    def _method_extras(self, name: str, method: AttributionMethod) -> None:
        hook = getattr(method, "batch_totals", None)
        if hook is not None:
            for key, value in hook().items():
                self.totals.add(f"extra/{name}/{key}", value)

    def _collect_figure(self, x: Tensor, labels: Tensor, maps: dict[str, Tensor]) -> None:
        """Keep the first few images of this rank, with every method's maps (of their ground-truth classes)."""
        have = sum(len(i) for i in self.figure["images"])
        take = min(self.figure_images - have, len(x))
        if take <= 0:
            return
        from explainer.data.transforms import denormalize

        self.figure["images"].append(denormalize(x[:take], **self.norm).cpu())
        self.figure["labels"].append(labels[:take].cpu())
        for name, m in maps.items():
            self.figure["maps"][name].append(m[:take].cpu())

    # ------------------------------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """All-reduce the sums (collective: every rank calls it) and build every table."""
        t = self.totals
        t.all_reduce()
        zero = torch.zeros((), dtype=torch.float64)
        res: dict[str, Any] = {
            "n_images": int(t.get("n/images", zero)),
            "n_seg_images": int(t.get("n/seg_images", zero)),
            "key_checksum": int(t.get("n/key_checksum", zero)),
            "classes": self.classes,
            "segmentation": self._segmentation_table(),
            "class_specific": self._class_specific_tables(),
            "classification": self._classification_table(),
            "timing": self._timing_table(),
        }
        if self.cfg.faithfulness_steps or any(k.startswith("point/") for k in t.data):
            res["faithfulness"] = self._faithfulness_table()
        for name, method in self.methods.items():
            hook = getattr(method, "results", None)
            if hook is not None and hasattr(method, "batch_totals"):
                prefix = f"extra/{name}/"
                res.update(hook({k[len(prefix):]: v for k, v in t.data.items() if k.startswith(prefix)}))
        return res

    def _segmentation_table(self) -> dict[str, Any]:
        seg: dict[str, Any] = {}
        t = self.totals
        for row in list(self.methods) + list(M.SANITY_ROWS):
            key = f"method/{row}" if row in self.methods else f"sanity/{row}"
            seg[row] = {metric: t.mean(f"{key}/{metric}") for metric in METRICS}
            seg[row]["n"] = t.count(f"{key}/acc")
            seg[row]["kind"] = "method" if row in self.methods else "sanity"
        return seg

    def _class_specific_tables(self) -> dict[str, Any]:
        cs: dict[str, Any] = {}
        names = [self.classes[i] for i in self.targets]
        for name in self.methods:
            if name not in MASK_METHODS:
                continue
            sums = self.totals.get(f"cs/{name}/sums", torch.zeros(len(names), len(names) + 1, dtype=torch.float64))
            counts = self.totals.get(f"cs/{name}/counts", torch.zeros(len(names), dtype=torch.float64))
            table = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], torch.nan)
            diag = table[:, : len(names)].diagonal()
            off = table[:, : len(names)].clone()
            off.fill_diagonal_(torch.nan)
            cs[name] = {
                "targets": names,
                "columns": names + ["none"],
                "table": table.tolist(),
                "images_per_target": counts.tolist(),
                "thresholds": list(self.cfg.thresholds),
                "mean_diagonal": _nanmean(diag),
                "min_diagonal": _nanmin(diag),
                "mean_off_diagonal": _nanmean(off),
                "max_off_diagonal": _nanmax(off),
            }
        return cs

    def _classification_table(self) -> dict[str, Any]:
        t = self.totals
        cls: dict[str, Any] = {"clean": {"threshold": M.CLEAN_THRESHOLD, "rule": self._rule(M.CLEAN_THRESHOLD),
                                         **M.precision_recall_f1(t.get("cls/clean", torch.zeros(3, 1)))}}
        cls["masked"] = {name: {"threshold": M.MASKED_THRESHOLD, "rule": self._rule(M.MASKED_THRESHOLD),
                                **M.precision_recall_f1(t.get(f"cls/masked/{name}", torch.zeros(3, 1)))}
                         for name in self.methods if name in MASK_METHODS}
        return cls

    def _timing_table(self) -> dict[str, Any]:
        timing = {}
        zero = torch.zeros((), dtype=torch.float64)
        for name, method in self.methods.items():
            seconds = float(self.totals.get(f"time/{name}/seconds", zero))
            images = int(self.totals.get(f"time/{name}/images", zero))
            timing[name] = {"seconds_per_image": seconds / images if images else math.nan, "images": images,
                            "autograd": bool(method.needs_grad), "device": str(self.device)}
        return timing

    def _faithfulness_table(self) -> dict[str, Any]:
        """Deletion / insertion AUC (ours and the RISE code's protocol) and the pointing game per method, with every
        protocol setting that produced them."""
        out: dict[str, Any] = {"settings": self._faithfulness_settings(), "methods": {}}
        zeros = torch.zeros(len(self.classes), dtype=torch.float64)
        for name in self.methods:
            row: dict[str, Any] = {}
            for prefix, key in (("faith", ""), ("rise", "rise_")):
                pairs = self.totals.get(f"{prefix}/{name}/pairs", zeros)
                row[f"{key}pairs"] = int(pairs.sum())
                for kind in ("deletion", "insertion"):
                    sums = self.totals.get(f"{prefix}/{name}/{kind}", zeros)
                    row[f"{key}{kind}_auc"] = float(sums.sum() / pairs.sum()) if pairs.sum() > 0 else math.nan
                    row[f"{key}{kind}_auc_per_class"] = _per_class(sums, pairs, self.classes)
            row.update(self._pointing_row(name))
            out["methods"][name] = row
        return out

    def _pointing_row(self, name: str) -> dict[str, Any]:
        """Headline: TorchRay's accuracy (mean over all classes, 0 for a class without pairs) against the boxes when
        the data carries them (VOC), else against the segmentation; both tests and the pooled numbers beside it."""
        zeros = torch.zeros(len(self.classes), dtype=torch.float64)
        row: dict[str, Any] = {"pointing_skipped_difficult": int(self.totals.get(f"point/{name}/skipped",
                                                                               zeros).sum())}
        for ann in ("box", "mask"):
            hits = self.totals.get(f"point/{name}/{ann}_hits", zeros)
            tries = self.totals.get(f"point/{name}/{ann}_pairs", zeros)
            per_class = torch.where(tries > 0, hits / tries.clamp_min(1), torch.nan)
            row[f"pointing_{ann}"] = {
                "accuracy_torchray": M.torchray_accuracy(hits, tries) if tries.sum() > 0 else math.nan,
                "accuracy_class_mean": _nanmean(per_class),  # over the classes with pairs only
                "accuracy_pooled": float(hits.sum() / tries.sum()) if tries.sum() > 0 else math.nan,
                "pairs": int(tries.sum()), "per_class": _per_class(hits, tries, self.classes)}
        head = "box" if row["pointing_box"]["pairs"] else "mask"
        row.update(pointing_annotation=head, pointing_accuracy=row[f"pointing_{head}"]["accuracy_torchray"],
                   pointing_accuracy_pooled=row[f"pointing_{head}"]["accuracy_pooled"],
                   pointing_pairs=row[f"pointing_{head}"]["pairs"])
        return row

    def _faithfulness_settings(self) -> dict[str, Any]:
        size = self.image_size or M.REFERENCE_SIZE
        taps, sigma = M.blur_taps(size)
        blur = (f"RISE's gkern({taps}, {sigma:.3g}) (gkern(11, 5) at 224 px, scaled): scipy gaussian_filter of a "
                "delta, reflect mode; conv2d with zero padding on the normalised image")
        return {
            "steps": self.cfg.faithfulness_steps,
            "classes": "every ground-truth class of the image",
            "probability": self.cfg.faithfulness_prob,
            "deletion_value": ("0 in normalised space (the dataset-mean colour)" if self.cfg.deletion_substrate
                               == "zero" else "the insertion start (blurred copy)"),
            "deletion_substrate": self.cfg.deletion_substrate,
            "insertion_start": blur,
            "pixel_order": M.TIE_ORDER,
            "low_resolution_maps": "upsampled bilinearly (align_corners=False) to the image",
            "rise_protocol": self.cfg.faithfulness_rise,
            "rise": {"classes": "the classifier's top-1 class on the clean image", "probability": "softmax",
                     "deletion": f"to 0, {M.RISE_DELETION_STEP * size} px per step",
                     "insertion": f"from the blur, {M.RISE_INSERTION_STEP * size} px per step"},
            "pointing_tolerance_px": self.cfg.pointing_tolerance,
            "pointing_frame": "original image pixels (map resized bilinearly to the original W x H; orig_size)",
            "pointing_point": "first maximum in row-major order (torch argmax)",
            "pointing_annotations": "boxes from the VOC XML where the shards carry them (TorchRay's VOC test), "
                                    "segmentation masks mapped to the original size beside them",
            "pointing_void": "counted for no class",
            "pointing_difficult": "pairs whose objects of the class are all difficult are skipped",
            "pointing_headline": "TorchRay's accuracy: mean over all classes, a class without pairs scores 0",
            "image_size": size,
        }

    def figure_data(self) -> tuple[Tensor, Tensor, dict[str, Tensor]] | None:
        if not self.figure["images"]:
            return None
        return (torch.cat(self.figure["images"]), torch.cat(self.figure["labels"]),
                {k: torch.cat(v) for k, v in self.figure["maps"].items()})


def _per_class(sums: Tensor, counts: Tensor, classes: Sequence[str]) -> dict[str, float]:
    """{class: sum / count} for the classes with a count (classes without test pairs are left out)."""
    return {name: float(s / n) for name, s, n in zip(classes, sums, counts) if n > 0}


def _nanmin(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.min()) if len(x) else math.nan


def _nanmean(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if len(x) else math.nan


def _nanmax(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.max()) if len(x) else math.nan


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


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
    lines += _classification_lines(res) + _timing_lines(res) + _faithfulness_lines(res) + _scored_lines(res)
    if res.get("figures"):
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in res["figures"]] + [""]
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
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
    write_text_atomic(out / "results.json", json.dumps(_json_safe(res), indent=2))
    write_text_atomic(out / "report.md", markdown_report(res))
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
                     tags=list(tracking.tags), dir=str(out), mode=mode, config=_json_safe(res.get("settings", {})),
                     settings=wandb.Settings(silent=True))
    logged: dict[str, Any] = {}
    for name, (columns, rows) in wandb_tables(_json_safe(res)).items():
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


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


def _state(timeout_min: float) -> Any:
    """accelerate's process state from the environment (torchrun, accelerate launch, SLURM); gloo without CUDA; the
    device choice and process-group timeout of explainer.distributed.make_state."""
    from explainer.distributed import make_state

    return make_state(timeout_min)


CLASS_SPECIFIC_ALL_UP_TO = 100  # Table 1 over every class up to this many (VOC 20, COCO 80): C x (C+1) passes
CLASS_SPECIFIC_SUBSET = 20  # above it, this many of the classes present in the evaluated images ...
CLASS_SPECIFIC_SEED = 0  # ... drawn with this seed


def default_class_specific(manifest: Any, split: str, limit: int | None) -> list[str] | None:
    """Table 1's default classes: None (all) up to CLASS_SPECIFIC_ALL_UP_TO classes; above, CLASS_SPECIFIC_SUBSET
    of the classes present in the first `limit` images of the split (the images evaluated), drawn with a fixed seed
    and kept in class order. At 1000 classes all of them cost ~9000 classifier passes per image."""
    import numpy as np

    from explainer.data.loader import iter_samples

    classes = list(manifest.classes)
    if len(classes) <= CLASS_SPECIFIC_ALL_UP_TO:
        return None
    present = np.zeros(len(classes), bool)
    for i, sample in enumerate(iter_samples(manifest, split)):  # labels only: nothing is decoded
        if limit is not None and i >= limit:
            break
        present |= np.asarray(json.loads(sample["json"])["labels"]) > 0
    candidates = np.flatnonzero(present)
    rng = np.random.default_rng(CLASS_SPECIFIC_SEED)
    chosen = rng.choice(candidates, size=min(CLASS_SPECIFIC_SUBSET, len(candidates)), replace=False)
    return [classes[k] for k in sorted(int(k) for k in chosen)]


def eval_settings(cfg: ExplainerRunConfig, manifest: Any, limit: int | None) -> EvalConfig:
    """cfg.eval with the defaults that depend on the data and the classifier filled in, and said: Table 1's classes
    above CLASS_SPECIFIC_ALL_UP_TO classes, faithfulness_prob=auto (softmax for loss.classification=ce)."""
    ev = cfg.eval
    if ev.faithfulness_prob == "auto":
        ev = dataclasses.replace(ev, faithfulness_prob="softmax" if cfg.loss.classification == "ce" else "sigmoid")
    if not ev.class_specific_classes:
        chosen = default_class_specific(manifest, cfg.data.test_split, limit)
        if chosen is not None:
            log.info("evaluate: Table 1 (class-specific masking) on %d of %d classes, drawn with seed %d from those in "
                     "the evaluated '%s' images (set eval.class_specific_classes to choose): %s", len(chosen),
                     len(manifest.classes), CLASS_SPECIFIC_SEED, cfg.data.test_split, ", ".join(chosen))
            ev = dataclasses.replace(ev, class_specific_classes=chosen)
    return ev


def check_test_split(manifest: Any, split: str, limit: int | None) -> None:
    """An evaluation over no image is an error, not a report of dashes."""
    info = manifest.splits.get(split)
    total = info.total if info is not None else 0
    if info is not None and total > 0 and (limit is None or limit > 0):
        return
    why = (f"has no split {split!r}" if info is None else f"lists 0 samples in split {split!r}" if total == 0
           else f"split {split!r}: max_images={limit}")
    raise ValueError(f"evaluate: nothing to evaluate: manifest {manifest.path} {why} (data.test_split)")


def scored_summary(res: dict[str, Any], batches: Any) -> dict[str, Any]:
    """Images scored (per method) and what the loader skipped or found wrong, gathered over all ranks; an
    evaluation where no image could be scored fails (every rank alike: the counts are all-reduced)."""
    import torch.distributed as dist

    problems = list(getattr(batches, "problems", []))
    skipped = torch.tensor(float(getattr(batches, "corrupt_samples", 0)), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, problems)
        problems = [p for part in gathered for p in part]
        totals = M.Totals()
        totals.add("skipped", skipped)
        totals.all_reduce()
        skipped = totals.get("skipped")
    out = {"images": res["n_images"], "skipped": int(skipped), "problems": problems,
           "per_method": {name: v["images"] for name, v in res["timing"].items()}}
    if res["n_images"] == 0:
        raise ValueError(f"evaluate: no test image could be scored ({out['skipped']} skipped: "
                         f"{'; '.join(problems[:5]) or 'none listed'})")
    return out


def load_eval_classifier(cfg: ExplainerRunConfig, classes: Sequence[str], device: torch.device,
                         checkpoint: str | None = None, where: str = "the data") -> tuple[nn.Module, str]:
    """The frozen Explanandum from any source (explainer.models.explanandum) and how reports name it;
    `checkpoint` (--classifier) replaces classifier.checkpoint."""
    from explainer.models.explanandum import load_explanandum, source_kind

    if source_kind(cfg.classifier) == "checkpoint" and (checkpoint or cfg.classifier.checkpoint) is None:
        raise ValueError("no classifier: pass --classifier or set classifier.checkpoint (or classifier.torchvision, "
                         "classifier.factory, classifier.torchscript) in the config")
    explanandum = load_explanandum(cfg.classifier, classes, cfg.data.image_size, map_location=device,
                                   checkpoint=checkpoint, where=where)
    return explanandum.model, explanandum.source


def evaluate(cfg: ExplainerRunConfig, checkpoint: str | None, *, classifier: str | None = None,
             methods: Sequence[str] | None = None, rtis_checkpoint: str | None = None, max_images: int | None = None,
             out: str | None = None, figure_images: int = 4, progress: bool = True,
             batches: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Evaluate on cfg.data's test split (or on `batches`, for callers that bring their own); returns the results
    on every rank and writes them from rank 0."""
    from tqdm import tqdm

    from explainer.data.loader import make_eval_loader, read_data_manifest
    from explainer.models import load_explainer

    state = _state(cfg.eval.process_group_timeout_min)
    device = state.device if state.device.type != "cpu" else torch.device("cpu")  # accelerate says cpu:0 under gloo
    names = parse_methods(methods or cfg.eval.methods)
    manifest = read_data_manifest(cfg.data)
    classes = list(manifest.classes)
    clf, clf_path = load_eval_classifier(cfg, classes, device, classifier, where=str(manifest.path))

    built: dict[str, AttributionMethod] = {}
    for name in names:
        if name in MASK_METHODS:
            path = checkpoint if name == "explainer" else rtis_checkpoint
            if path is None:
                flag = "--checkpoint" if name == "explainer" else "--rtis-checkpoint"
                raise ValueError(f"method {name!r} needs {flag}")
            net, meta = load_explainer(path, map_location=device, num_classes=len(classes))
            if list(meta["classes"]) != classes:
                raise ValueError(f"{path}: explainer classes {meta['classes']} differ from the data's {classes}")
            if int(meta["image_size"]) != cfg.data.image_size:
                log.warning("note: %s was trained at %s px, evaluating at %d px (data.image_size)", path,
                            meta["image_size"], cfg.data.image_size)
            if meta.get("extra", {}).get("resize", "squash") != cfg.data.resize:
                log.warning("note: %s was trained with data.resize=%s, evaluating with %s", path,
                            meta["extra"].get("resize", "squash"), cfg.data.resize)
            built[name] = MaskNetwork(name, net)
        else:
            built[name] = build_baseline(name, clf, cfg.eval)

    limit = max_images if max_images is not None else cfg.eval.max_images
    if batches is None:
        check_test_split(manifest, cfg.data.test_split, limit)
        batches = make_eval_loader(cfg.data, manifest, cfg.data.test_split, rank=state.process_index,
                                   world_size=state.num_processes, max_images=limit, **input_normalization(cfg))
    ev = eval_settings(cfg, manifest, limit)
    evaluator = Evaluator(clf, built, classes, ev, device, figure_images=figure_images if state.is_main_process else 0,
                          norm=input_normalization(cfg), softmax=cfg.loss.classification == "ce")
    for batch in tqdm(batches, desc=f"evaluate[{state.process_index}]", unit="batch",
                      disable=not (progress and state.is_main_process)):
        evaluator.update(batch)
    res = evaluator.finish()
    res["scored"] = scored_summary(res, batches)
    res["settings"] = {
        "checkpoint": checkpoint, "rtis_checkpoint": rtis_checkpoint, "classifier": clf_path,
        "manifest": str(manifest.path), "split": cfg.data.test_split, "max_images": limit,
        "methods": names, "world_size": state.num_processes, "device": str(device),
        "batch_size": cfg.data.batch_size, "image_size": cfg.data.image_size,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": sys.argv, "eval": to_dict(ev), "classification": cfg.loss.classification,
    }
    out_dir = Path(out or cfg.eval.output_dir or (Path(checkpoint).parent / "eval" if checkpoint else "eval"))
    if state.is_main_process:
        write_outputs(res, evaluator, out_dir)
        log.info("evaluate: wrote %s and %s", out_dir / "results.json", out_dir / "report.md")
        run_dir = log_to_wandb(res, out_dir, cfg.tracking, checkpoint)
        if run_dir is not None:
            log.info("evaluate: W&B run %s", run_dir)
    res["output_dir"] = str(out_dir)
    state.wait_for_everyone()
    return res


def build_parser(prog: str = "python -m explainer.evaluate") -> argparse.ArgumentParser:
    from explainer.arguments import HelpFormatter

    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="the explainer run's config YAML (data, classifier, eval)")
    parser.add_argument("--checkpoint", default=None, help="explainer checkpoint (needed for method 'explainer')")
    parser.add_argument("--classifier", default=None, help="classifier checkpoint (default: classifier.checkpoint)")
    parser.add_argument("--methods", default=None, help=f"comma list of {','.join(ALL_METHODS)} "
                                                        "(default: eval.methods)")
    parser.add_argument("--rtis-checkpoint", default=None, help="explainer checkpoint trained with loss.kind=rtis")
    parser.add_argument("--max-images", type=int, default=None, help="first N test images (default: eval.max_images)")
    parser.add_argument("--out", default=None, help="output folder (default: eval.output_dir or <checkpoint>/../eval)")
    parser.add_argument("--figure-images", type=int, default=4, help="images in the Fig. 1 panel")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def run_args(args: argparse.Namespace) -> int:
    cfg = load_config(ExplainerRunConfig, args.config, args.overrides)
    configure_logging()
    if args.checkpoint:  # a run folder means its explainer.pt (and <run>/eval is the default output)
        from explainer.models.model_files import model_file

        args.checkpoint = str(model_file(args.checkpoint, "explainer"))
    evaluate(cfg, args.checkpoint, classifier=args.classifier, methods=args.methods,
             rtis_checkpoint=args.rtis_checkpoint, max_images=args.max_images, out=args.out,
             figure_images=args.figure_images, progress=not args.no_progress)
    from explainer.distributed import close_process_group

    close_process_group()
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m explainer.evaluate") -> int:
    return run_args(build_parser(prog).parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
