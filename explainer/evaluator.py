"""Accumulation of the evaluation: every attribution method's maps scored per batch, summed, all-reduced once.

`Evaluator.update` adds one batch's per-table sums (one helper per table); `Evaluator.finish` all-reduces them and
builds each table of the results dict (one builder per table). The protocol is described in explainer/evaluate.py and
docs/method.md#evaluation; reporting (markdown, JSON, W&B, figures) is explainer/eval_report.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from explainer import metrics as M
from explainer.baselines import BASELINES, AttributionMethod
from explainer.config import EvalConfig
from explainer.models.explainer import class_logits
from explainer.run_errors import InputError
from explainer.wsol import WsolScorer

MASK_METHODS = ("explainer", "rtis")
WARMUP_METHODS = ("explainer", "rtis", "gradcam")  # one untimed call first (lazy init, allocator); the others are
# hundreds of classifier passes per image already
ALL_METHODS = MASK_METHODS + BASELINES
METRICS = ("acc", "iou", "mae", "sal")


class MaskNetwork:
    """An Explainer-architecture network (ours or RTIS) as an attribution method: all class maps in one pass, at the
    head's resolution; only the scored ones are upsampled (docs/method.md#head-resolution)."""

    needs_grad = False

    def __init__(self, name: str, net: nn.Module, scored: Sequence[int] | None = None) -> None:
        """`scored`: the classes some table reads on every image besides its wanted ones (None: every class)."""
        self.name, self.net = name, net.eval()
        self.scored = None if scored is None else sorted(set(scored))

    def __call__(self, images: Tensor, wanted: Tensor) -> Tensor:
        with torch.no_grad():
            out = class_logits(self.net(images), images.shape[-2:])
            b, classes = out.logits.shape[:2]
            if self.scored is None:
                return torch.sigmoid(out.full()).float()
            used = wanted.any(0).cpu()
            used[self.scored] = True
            if bool(used.all()):
                return torch.sigmoid(out.full()).float()
            cols = used.nonzero().flatten().to(out.logits.device)
            maps = torch.zeros(b, classes, *out.size, device=out.logits.device)  # the others stay 0 (the protocol)
            maps[:, cols] = torch.sigmoid(out.full(cols)).float()
            return maps


def parse_methods(text: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown or not names:
        raise InputError(f"--methods: unknown or empty {unknown or names!r}; choose from {', '.join(ALL_METHODS)}")
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
                 norm: dict[str, Sequence[float]] | None = None, softmax: bool = False, resize: str = "squash",
                 pointing_boxes: bool = True) -> None:
        """`softmax`: a softmax classifier (loss.classification=ce): Table 4 predicts its top-1 class, and
        eval.faithfulness_prob=auto means softmax. `resize`: data.resize, how images were fitted to the model's input
        (the pointing game maps the maps back onto the original image by its inverse; localization places boxes).
        `pointing_boxes`: the pointing game's box test on the shards' boxes (False for COCO: TorchRay's COCO test is
        mask-based; its boxes serve the localization table only)."""
        self.resize = resize
        if cfg.faithfulness_prob == "auto":
            cfg = dataclasses.replace(cfg, faithfulness_prob="softmax" if softmax else "sigmoid")
        self.softmax = softmax
        self.classifier, self.methods, self.classes, self.cfg, self.device = classifier, methods, list(classes), cfg, \
            device
        names = cfg.class_specific_classes or self.classes
        missing = [n for n in names if n not in self.classes]
        if missing:
            raise InputError(f"eval.class_specific_classes: {missing} not among the classes {self.classes}")
        self.targets = [self.classes.index(n) for n in names]
        if not cfg.thresholds or any(not 0.0 <= t < 1.0 for t in cfg.thresholds):
            raise InputError(f"eval.thresholds must be a non-empty list in [0, 1), got {cfg.thresholds}")
        if cfg.faithfulness_steps < 0:
            raise InputError(f"eval.faithfulness_steps must be >= 0 (0 = off), got {cfg.faithfulness_steps}")
        if cfg.faithfulness_prob not in M.FAITHFULNESS_PROBS:
            raise InputError(f"eval.faithfulness_prob must be one of {M.FAITHFULNESS_PROBS}, got "
                             f"{cfg.faithfulness_prob!r}")
        if cfg.deletion_substrate not in M.DELETION_SUBSTRATES:
            raise InputError(f"eval.deletion_substrate must be one of {M.DELETION_SUBSTRATES}, got "
                             f"{cfg.deletion_substrate!r}")
        if cfg.pointing_tolerance < 0:
            raise InputError(f"eval.pointing_tolerance must be >= 0 px, got {cfg.pointing_tolerance}")
        self.totals = M.Totals()
        self.pointing_boxes = pointing_boxes
        self.wsol = WsolScorer(len(self.classes), cfg.wsol_curve_interval, cfg.wsol_frame, resize) if cfg.wsol \
            else None
        self.figure_images = figure_images
        self.figure: dict[str, Any] = {"images": [], "labels": [], "maps": {m: [] for m in methods}}
        from explainer.report_html import Galleries

        self.galleries = Galleries(len(self.classes)) if figure_images > 0 else None  # report.html, rank 0
        self.norm = dict(norm or {})  # the classifier's mean/std, undone for the figures
        self.warm = False
        self.image_size: int | None = None
        for method in methods.values():  # RISE's top-1 class may be any class; else the class-specific table's ones
            if isinstance(method, MaskNetwork) and not cfg.faithfulness_rise and method.scored is None:
                method.scored = list(self.targets)

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
            if self.wsol is not None:
                self.wsol.update(t, name, maps, labels, batch, clean.argmax(1))
            self._method_extras(name, method)
        self._collect_figure(x, labels, kept)
        if self.galleries is not None and self.galleries.wants(labels):
            from explainer.data.transforms import denormalize

            self.galleries.add(denormalize(x, **self.norm), labels, kept)

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
        res = M.pointing_game(maps, labels, sizes, self.cfg.pointing_tolerance, seg,
                              batch.get("objects") if self.pointing_boxes else None, self.resize)
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
        if self.wsol is not None:
            res["localization"] = self.wsol.finish(t, list(self.methods), self.classes)
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
            "rise": {"protocol": M.RISE_PROTOCOL,
                     "classes": "the classifier's top-1 class on the clean image", "probability": "softmax",
                     "deletion": f"to 0, {M.RISE_STEP_ROWS * size} px per step",
                     "insertion": f"from the blur, {M.RISE_STEP_ROWS * size} px per step"},
            "pointing_tolerance_px": self.cfg.pointing_tolerance,
            "pointing_frame": f"original image pixels (orig_size): the part of the map that shows the image "
                              f"(data.resize={self.resize}) resized bilinearly onto the part of the image it shows",
            "pointing_point": "first maximum in row-major order (torch argmax)",
            "pointing_annotations": ("boxes from the VOC XML where the shards carry them (TorchRay's VOC test), "
                                     "segmentation masks mapped to the original size beside them")
            if self.pointing_boxes else "segmentation masks only (TorchRay's COCO test; the boxes serve localization)",
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
