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

Protocol (SPEC 6): masks are aggregated over each image's ground-truth classes (pixel-wise max) and compared with the
binary ground truth at the mask's resolution, void pixels excluded (the reference counted them as foreground).
Table 2 uses the images that have a segmentation and at least one class. Table 4 uses every image; its masked column
multiplies each image by the Explainer's aggregated mask (an image without classes gets m = 0, as in training).
Timing: the method alone (for the Explainer: its forward pass, no classifier), autograd off where the method allows
(Grad-CAM and Extremal Perturbations need it), device synchronised before and after, after one untimed warm-up call
of the cheap methods (Explainer, RTIS, Grad-CAM) on the first image.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from explainer import metrics as M
from explainer.atomic import write_text_atomic
from explainer.baselines import BASELINES, AttributionMethod, build_baseline
from explainer.config import EvalConfig, ExplainerRunConfig, input_normalization, load_config, to_dict

MASK_METHODS = ("explainer", "rtis")
WARMUP_METHODS = ("explainer", "rtis", "gradcam")  # one untimed call first (lazy init, allocator); the others are
# hundreds of classifier passes per image already
ALL_METHODS = MASK_METHODS + BASELINES
METRICS = ("acc", "iou", "mae", "sal")


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


class Evaluator:
    """Accumulates every table over batches; `finish` all-reduces and turns sums into the results dict."""

    def __init__(self, classifier: nn.Module, methods: dict[str, AttributionMethod], classes: Sequence[str],
                 cfg: EvalConfig, device: torch.device, figure_images: int = 0) -> None:
        self.classifier, self.methods, self.classes, self.cfg, self.device = classifier, methods, list(classes), cfg, \
            device
        names = cfg.class_specific_classes or self.classes
        missing = [n for n in names if n not in self.classes]
        if missing:
            raise ValueError(f"eval.class_specific_classes: {missing} not among the classes {self.classes}")
        self.targets = [self.classes.index(n) for n in names]
        if not cfg.thresholds or any(not 0.0 <= t < 1.0 for t in cfg.thresholds):
            raise ValueError(f"eval.thresholds must be a non-empty list in [0, 1), got {cfg.thresholds}")
        self.totals = M.Totals()
        self.figure_images = figure_images
        self.figure: dict[str, Any] = {"images": [], "labels": [], "maps": {m: [] for m in methods}}
        self.warm = False

    # ------------------------------------------------------------------------------------------------------------------
    def update(self, batch: dict[str, Any]) -> None:
        x = batch["image"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device)
        b = x.shape[0]
        has_seg = torch.as_tensor(batch.get("has_seg", torch.zeros(b, dtype=torch.bool))).to(self.device).bool()
        rows = (has_seg & (labels.sum(1) > 0)).nonzero().flatten()
        seg = batch["seg"].to(self.device)[rows] if len(rows) else None
        wanted = labels > 0
        t = self.totals
        t.add("n/images", float(b))
        # order-free fingerprint of the keys seen: equal for 1 and N processes iff every sample is counted once
        t.add("n/key_checksum", float(sum(zlib.crc32(str(k).encode()) for k in batch.get("key", []))))
        t.add("n/seg_images", float(len(rows)))

        with torch.no_grad():
            clean = self.classifier(x)
        t.add("cls/clean", M.classification_counts(clean, labels, M.CLEAN_THRESHOLD))

        if seg is not None:
            for name, mask in M.sanity_masks(seg).items():
                self._segmentation(f"sanity/{name}", x[rows], mask, seg, labels[rows])

        if not self.warm:
            for name in WARMUP_METHODS:
                if name in self.methods:
                    self.methods[name](x[:1], wanted[:1])
            self.warm = True
        kept: dict[str, Tensor] = {}
        for name, method in self.methods.items():
            _sync(self.device)
            start = time.perf_counter()
            maps = method(x, wanted)
            _sync(self.device)
            t.add(f"time/{name}/seconds", time.perf_counter() - start)
            if name == "ep":  # how often each area was the smallest that kept the logit (all ranks)
                chosen = getattr(method, "chosen_areas", [])
                areas = list(getattr(method, "areas", []))
                t.add("ep/area_counts", torch.tensor([float(chosen.count(a)) for a in areas]))
                chosen.clear()
            t.add(f"time/{name}/images", float(b))
            maps = maps.detach().float()
            kept[name] = maps
            m = M.aggregate(maps, labels)
            if seg is not None:
                self._segmentation(f"method/{name}", x[rows], m[rows], seg, labels[rows])
            if name in MASK_METHODS:
                with torch.no_grad():
                    masked = self.classifier(x * m[:, None])
                t.add(f"cls/masked/{name}", M.classification_counts(masked, labels, M.MASKED_THRESHOLD))
                sums, counts = M.class_specific_sums(self.classifier, x, maps, labels, self.targets, self.targets,
                                                     self.cfg.thresholds)
                t.add(f"cs/{name}/sums", sums)
                t.add(f"cs/{name}/counts", counts)
        self._collect_figure(x, labels, kept)

    def _segmentation(self, key: str, x: Tensor, mask: Tensor, seg: Tensor, labels: Tensor) -> None:
        for metric, values in M.segmentation_scores(mask, seg).items():
            self.totals.add_values(f"{key}/{metric}", values)
        self.totals.add_values(f"{key}/sal", M.saliency_scores(self.classifier, x, mask, labels))

    def _collect_figure(self, x: Tensor, labels: Tensor, maps: dict[str, Tensor]) -> None:
        """Keep the first few images of this rank, with every method's maps (of their ground-truth classes)."""
        have = sum(len(i) for i in self.figure["images"])
        take = min(self.figure_images - have, len(x))
        if take <= 0:
            return
        from explainer.data.transforms import denormalize

        self.figure["images"].append(denormalize(x[:take]).cpu())
        self.figure["labels"].append(labels[:take].cpu())
        for name, m in maps.items():
            self.figure["maps"][name].append(m[:take].cpu())

    # ------------------------------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        t = self.totals
        t.all_reduce()
        zero = torch.zeros((), dtype=torch.float64)
        res: dict[str, Any] = {
            "n_images": int(t.get("n/images", zero)),
            "n_seg_images": int(t.get("n/seg_images", zero)),
            "key_checksum": int(t.get("n/key_checksum", zero)),
            "classes": self.classes,
        }
        seg: dict[str, Any] = {}
        for row in list(self.methods) + list(M.SANITY_ROWS):
            key = f"method/{row}" if row in self.methods else f"sanity/{row}"
            seg[row] = {metric: t.mean(f"{key}/{metric}") for metric in METRICS}
            seg[row]["n"] = t.count(f"{key}/acc")
            seg[row]["kind"] = "method" if row in self.methods else "sanity"
        res["segmentation"] = seg

        cs: dict[str, Any] = {}
        names = [self.classes[i] for i in self.targets]
        for name in self.methods:
            if name not in MASK_METHODS:
                continue
            sums = t.get(f"cs/{name}/sums", torch.zeros(len(names), len(names) + 1, dtype=torch.float64))
            counts = t.get(f"cs/{name}/counts", torch.zeros(len(names), dtype=torch.float64))
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
                "mean_off_diagonal": _nanmean(off),
                "max_off_diagonal": _nanmax(off),
            }
        res["class_specific"] = cs

        cls: dict[str, Any] = {"clean": {"threshold": M.CLEAN_THRESHOLD,
                                         **M.precision_recall_f1(t.get("cls/clean", torch.zeros(3, 1)))}}
        cls["masked"] = {name: {"threshold": M.MASKED_THRESHOLD,
                                **M.precision_recall_f1(t.get(f"cls/masked/{name}", torch.zeros(3, 1)))}
                         for name in self.methods if name in MASK_METHODS}
        res["classification"] = cls

        timing = {}
        for name, method in self.methods.items():
            seconds = float(t.get(f"time/{name}/seconds", zero))
            images = int(t.get(f"time/{name}/images", zero))
            timing[name] = {"seconds_per_image": seconds / images if images else math.nan, "images": images,
                            "autograd": bool(method.needs_grad), "device": str(self.device)}
        res["timing"] = timing
        if "ep" in self.methods:
            areas = list(getattr(self.methods["ep"], "areas", []))
            counts = t.get("ep/area_counts", torch.zeros(len(areas), dtype=torch.float64)).tolist()
            res["ep_chosen_areas"] = {str(a): int(n) for a, n in zip(areas, counts)}
        return res

    def figure_data(self) -> tuple[Tensor, Tensor, dict[str, Tensor]] | None:
        if not self.figure["images"]:
            return None
        return (torch.cat(self.figure["images"]), torch.cat(self.figure["labels"]),
                {k: torch.cat(v) for k, v in self.figure["maps"].items()})


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


def markdown_report(res: dict[str, Any]) -> str:
    """The four tables as markdown, in the paper's numbering."""
    from explainer.figures import METHOD_TITLES

    title = lambda n: METHOD_TITLES.get(n, n)  # noqa: E731
    lines = ["# Evaluation report", ""]
    info = res.get("settings", {})
    lines += [f"- explainer checkpoint: `{info.get('checkpoint')}`", f"- classifier: `{info.get('classifier')}`",
              f"- data: `{info.get('manifest')}` split `{info.get('split')}`: {res['n_images']} images, "
              f"{res['n_seg_images']} with segmentation; {info.get('world_size', 1)} process(es) on "
              f"{info.get('device')}", f"- date: {info.get('date')}", ""]

    lines += ["## Table 2: segmentation scores of the aggregated mask", "",
              "Mask = pixel-wise max over the image's ground-truth classes, compared with the binary ground truth; "
              "void pixels excluded (the reference counted them as foreground). Acc, IoU higher is better; MAE, Sal "
              "lower is better.", "",
              "| method | Acc | IoU | MAE | Sal | images |", "|---|---|---|---|---|---|"]
    for row, s in res["segmentation"].items():
        name = title(row) if s["kind"] == "method" else f"*{row}*"
        lines.append(f"| {name} | {_fmt(s['acc'])} | {_fmt(s['iou'])} | {_fmt(s['mae'])} | {_fmt(s['sal'], 2)} | "
                     f"{s['n']} |")
    lines.append("")

    for name, cs in res["class_specific"].items():
        lines += [f"## Table 1: class-specific masking ({title(name)})", "",
                  "Softmax probability (x100) of the target class (row) when the image is multiplied by the "
                  f"thresholded mask of the column class, averaged over thresholds {cs['thresholds']} and the test "
                  "images containing the target; \"none\" = unmasked. Good: high diagonal, low off-diagonal.", "",
                  "| target \\ mask | " + " | ".join(cs["columns"]) + " | images |",
                  "|---" * (len(cs["columns"]) + 2) + "|"]
        for target, row, n in zip(cs["targets"], cs["table"], cs["images_per_target"]):
            cells = [("**" + _fmt(v * 100, 2) + "**") if j == cs["targets"].index(target) else _fmt(v * 100, 2)
                     for j, v in enumerate(row)]
            lines.append(f"| {target} | " + " | ".join(cells) + f" | {int(n)} |")
        lines += ["", f"Mean diagonal {_fmt(cs['mean_diagonal'] * 100, 2)}, mean off-diagonal "
                      f"{_fmt(cs['mean_off_diagonal'] * 100, 2)}, max off-diagonal "
                      f"{_fmt(cs['max_off_diagonal'] * 100, 2)}.", ""]

    cls = res["classification"]
    lines += ["## Table 4: classification before and after masking", "",
              "Micro-averaged over (image, class) pairs; macro F1 = mean over classes. Clean images: logit >= 0; "
              "images multiplied by the method's aggregated mask: logit >= -1 (the paper's convention).", "",
              "| images | threshold | P | R | F1 | macro F1 |", "|---|---|---|---|---|---|"]
    rows = [("clean", cls["clean"])] + [(f"masked ({title(n)})", v) for n, v in cls["masked"].items()]
    for name, v in rows:
        lines.append(f"| {name} | logit >= {v['threshold']:g} | {_fmt(v['precision'] * 100, 1)} | "
                     f"{_fmt(v['recall'] * 100, 1)} | {_fmt(v['f1'] * 100, 1)} | {_fmt(v['macro_f1'] * 100, 1)} |")
    lines.append("")

    lines += ["## Table 3: time per image", "",
              "The method alone (the Explainer: one forward pass for all classes, no classifier), device "
              "synchronised, after one untimed warm-up call of the cheap methods; autograd off unless the method "
              "needs gradients. Per process; batch size "
              f"{info.get('batch_size')}.", "",
              "| method | ms / image | images | autograd | device |", "|---|---|---|---|---|"]
    for name, v in res["timing"].items():
        lines.append(f"| {title(name)} | {_fmt(v['seconds_per_image'] * 1000, 2)} | {v['images']} | "
                     f"{'yes' if v['autograd'] else 'no'} | {v['device']} |")
    lines.append("")
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


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


def _state(timeout_min: float) -> Any:
    """accelerate's process state from the environment (torchrun, accelerate launch, SLURM); gloo without CUDA; the
    device choice and process-group timeout of explainer.distributed.make_state."""
    from explainer.distributed import make_state

    return make_state(timeout_min)


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
                print(f"[evaluate] note: {path} was trained at {meta['image_size']} px, evaluating at "
                      f"{cfg.data.image_size} px (data.image_size)", file=sys.stderr)
            built[name] = MaskNetwork(name, net)
        else:
            built[name] = build_baseline(name, clf, cfg.eval)

    limit = max_images if max_images is not None else cfg.eval.max_images
    if batches is None:
        batches = make_eval_loader(cfg.data, manifest, cfg.data.test_split, rank=state.process_index,
                                   world_size=state.num_processes, max_images=limit, **input_normalization(cfg))
    evaluator = Evaluator(clf, built, classes, cfg.eval, device,
                          figure_images=figure_images if state.is_main_process else 0)
    for batch in tqdm(batches, desc=f"evaluate[{state.process_index}]", unit="batch",
                      disable=not (progress and state.is_main_process)):
        evaluator.update(batch)
    res = evaluator.finish()
    res["settings"] = {
        "checkpoint": checkpoint, "rtis_checkpoint": rtis_checkpoint, "classifier": clf_path,
        "manifest": str(manifest.path), "split": cfg.data.test_split, "max_images": limit,
        "methods": names, "world_size": state.num_processes, "device": str(device),
        "batch_size": cfg.data.batch_size, "image_size": cfg.data.image_size,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": sys.argv, "eval": to_dict(cfg.eval),
    }
    out_dir = Path(out or cfg.eval.output_dir or (Path(checkpoint).parent / "eval" if checkpoint else "eval"))
    if state.is_main_process:
        write_outputs(res, evaluator, out_dir)
        print(f"[evaluate] wrote {out_dir / 'results.json'} and {out_dir / 'report.md'}")
    res["output_dir"] = str(out_dir)
    state.wait_for_everyone()
    return res


def build_parser(prog: str = "python -m explainer.evaluate") -> argparse.ArgumentParser:
    from explainer.cli_args import HelpFormatter

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
    evaluate(cfg, args.checkpoint, classifier=args.classifier, methods=args.methods,
             rtis_checkpoint=args.rtis_checkpoint, max_images=args.max_images, out=args.out,
             figure_images=args.figure_images, progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m explainer.evaluate") -> int:
    return run_args(build_parser(prog).parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
