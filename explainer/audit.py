"""Per-class audit: where does each class's mask lie, and is the classifier's evidence on the object or around it?

    explainer audit --checkpoint RUN/explainer.pt [--split test] [--config RUN/config.yaml] [--classifier C]
        [--max-images N] [--out DIR] [--top 3] [key=value ...]
    (also python -m explainer.audit, and under torchrun with any number of processes)

The paper's bias detection (an Explainer shows what the classifier really uses) applied to a data set's own classes.
For every (image, ground-truth class) pair whose class has boxes (else a segmentation), the object region R is the
union of the class's boxes (or its pixels) in the model's input, and with the class's mask m:
- energy inside: sum(m * R) / sum(m), the energy-based pointing game of Score-CAM (Wang et al. 2020); outside is
  the rest; pairs with an all-zero mask are counted as empty and left out of the energies;
- object area: the share of the image R covers, so that the energy outside can be read against what a uniform mask
  would give (1 - area); **excess outside** = energy outside - (1 - object area): 0 for a uniform mask, negative
  when the mask sits on the object, positive when it avoids it. Classes are ranked by it (most context first);
- mask area: the mask's mean;
- deletion: the classifier's probability of the class on the image, with R removed and with everything but R
  removed (pixels set to 0 in normalised space, the dataset mean, as the Explainer's masking does); "evidence
  outside" is the share of pairs where removing the background drops the class more than removing the object.

Written by rank 0 under --out (default <checkpoint folder>/audit): audit.json, report.md, report.html and
figures/audit_<rank>_<class>.png: for each of the --top classes, the 4 images whose masks lie most outside the
object. Sums are all-reduced, so N processes give the numbers of one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainer import metrics as M
from explainer.models.explainer import class_logits, upsample
from explainer.wsol import frame_boxes

GALLERY = 4  # images per class in the figure
KEYS = ("pairs", "empty", "inside", "area", "mask_area", "p_clean", "p_no_object", "p_no_background",
        "evidence_outside")


def object_regions(batch: dict[str, Any], pairs: Tensor, size: int, resize: str) -> list[Tensor | None]:
    """Per pair the class's region [S, S] bool in the model input: its boxes (difficult ones included) mapped as
    data.resize placed the image, else its segmentation pixels, else None (the pair is not audited)."""
    objects, sizes = batch.get("objects"), batch.get("orig_size")
    has_seg = batch.get("has_seg")
    out: list[Tensor | None] = []
    for i, k in pairs.tolist():
        region = None
        objs = objects[i] if objects is not None else None
        if objs is not None and len(objs) and bool((objs[:, 0] == k).any()) and sizes is not None:
            mine = objs[objs[:, 0] == k].numpy()
            region = torch.zeros(size, size, dtype=torch.bool)
            for x0, y0, x1, y1 in frame_boxes(mine[:, 1:5], tuple(int(v) for v in sizes[i].tolist()), size, resize,
                                              size):
                region[y0 : y1 + 1, x0 : x1 + 1] = True
        elif has_seg is not None and bool(has_seg[i]):
            region = batch["seg_classes"][i] == k + 1
        out.append(region if region is not None and bool(region.any()) else None)
    return out


class Audit:
    """Per-class sums over batches (`update`), all-reduced and ranked (`finish`); the gallery candidates per class."""

    def __init__(self, classifier: nn.Module, explainer: nn.Module, classes: Sequence[str], resize: str = "squash",
                 softmax: bool = False, device: torch.device | None = None) -> None:
        self.classifier, self.explainer, self.classes = classifier, explainer, list(classes)
        self.resize, self.softmax = resize, softmax
        self.device = device or torch.device("cpu")
        self.totals = M.Totals()
        self.gallery: dict[int, list[tuple[float, str, Tensor, Tensor, Tensor]]] = {}

    def _probability(self, x: Tensor, rows: Tensor, cls: Tensor) -> Tensor:
        with torch.no_grad():
            logits = self.classifier(x)
        p = logits.softmax(1) if self.softmax else logits.sigmoid()
        return p[torch.arange(len(cls)), cls].double().cpu()

    @torch.no_grad()
    def update(self, batch: dict[str, Any], display: Tensor | None = None) -> None:
        """One batch: masks, regions, energies and the two deletions for every auditable pair."""
        x = batch["image"].to(self.device)
        labels = batch["labels"]
        size = int(x.shape[-1])
        self.totals.add("n/images", float(len(x)))
        pairs = (labels > 0).nonzero().cpu()
        regions = object_regions(batch, pairs, size, self.resize)
        keep = [p for p, r in enumerate(regions) if r is not None]
        if not keep:
            return
        pairs = pairs[keep]
        region = torch.stack([regions[p] for p in keep]).to(self.device)
        out = class_logits(self.explainer(x), x.shape[-2:])  # head resolution: upsample only the pairs' classes
        index = pairs.to(out.logits.device)
        masks = torch.sigmoid(upsample(out.logits[index[:, 0], index[:, 1]][:, None], out.size)).float()
        if masks.shape[-1] != size:
            masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        m = masks[:, 0].double()
        r = region.double()
        energy = m.flatten(1).sum(1)
        inside = torch.where(energy > 0, (m * r).flatten(1).sum(1) / energy.clamp_min(1e-300), torch.nan)
        xs, cls = x[pairs[:, 0]], pairs[:, 1].to(self.device)
        values = {"pairs": torch.ones(len(pairs)), "empty": (energy <= 0).double().cpu(),
                  "inside": torch.nan_to_num(inside).cpu(), "area": r.flatten(1).mean(1).cpu(),
                  "mask_area": m.flatten(1).mean(1).cpu(), "p_clean": self._probability(xs, pairs, cls),
                  "p_no_object": self._probability(xs * (1 - region[:, None].float()), pairs, cls),
                  "p_no_background": self._probability(xs * region[:, None].float(), pairs, cls)}
        values["evidence_outside"] = ((values["p_clean"] - values["p_no_background"])
                                      > (values["p_clean"] - values["p_no_object"])).double()
        values["energy_pairs"] = (energy > 0).double().cpu()
        zeros = torch.zeros(len(self.classes), dtype=torch.float64)
        for key, v in values.items():
            self.totals.add(f"audit/{key}", zeros.index_add(0, pairs[:, 1], v.double()))
        self._keep_gallery(batch, pairs, inside.cpu(), m.float().cpu(), region.cpu(), display)

    def _keep_gallery(self, batch: dict[str, Any], pairs: Tensor, inside: Tensor, m: Tensor, region: Tensor,
                      display: Tensor | None) -> None:
        """Per class the GALLERY pairs with the least energy inside (the most telling for context), kept small."""
        images = display if display is not None else batch["image"]
        keys = batch.get("key", [str(i) for i in range(len(images))])
        for p, (i, k) in enumerate(pairs.tolist()):
            if math.isnan(float(inside[p])):
                continue
            entry = (1.0 - float(inside[p]), str(keys[i]), images[i].cpu(), m[p], region[p])
            kept = sorted([*self.gallery.get(k, []), entry], key=lambda e: (-e[0], e[1]))[:GALLERY]
            self.gallery[k] = kept

    def finish(self) -> dict[str, Any]:
        """All-reduce (collective) and build the per-class table, ranked by excess energy outside."""
        self.totals.all_reduce()
        self._gather_gallery()
        zeros = torch.zeros(len(self.classes), dtype=torch.float64)
        t = {k: self.totals.get(f"audit/{k}", zeros) for k in (*KEYS, "energy_pairs")}
        rows = []
        for k, name in enumerate(self.classes):
            n, ne = float(t["pairs"][k]), float(t["energy_pairs"][k])
            if n == 0:
                continue
            inside = float(t["inside"][k]) / ne if ne else math.nan
            area = float(t["area"][k]) / n
            row = {"class": name, "pairs": int(n), "empty_masks": int(t["empty"][k]), "energy_inside": inside,
                   "energy_outside": 1 - inside, "object_area": area, "excess_outside": (1 - inside) - (1 - area),
                   "mask_area": float(t["mask_area"][k]) / n, "p_clean": float(t["p_clean"][k]) / n,
                   "p_object_removed": float(t["p_no_object"][k]) / n,
                   "p_background_removed": float(t["p_no_background"][k]) / n,
                   "evidence_outside": float(t["evidence_outside"][k]) / n}
            rows.append(row)
        rows.sort(key=lambda r: (-(r["excess_outside"] if not math.isnan(r["excess_outside"]) else -math.inf),
                                 r["class"]))
        for rank, row in enumerate(rows, start=1):
            row["rank"] = rank
        return {"classes": rows, "n_images": int(float(self.totals.get("n/images", torch.zeros(()))))}

    def _gather_gallery(self) -> None:
        """Every rank's candidates to all ranks (rank 0 draws them): the best GALLERY per class overall."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.gallery)
        merged: dict[int, list[Any]] = {}
        for part in parts:
            for k, entries in part.items():
                merged[k] = sorted([*merged.get(k, []), *entries], key=lambda e: (-e[0], e[1]))[:GALLERY]
        self.gallery = merged


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def _pct(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


AUDIT_COLUMNS = [("rank", "rank"), ("class", "class"), ("pairs", "pairs"), ("excess_outside", "excess outside"),
                 ("energy_inside", "energy inside"), ("object_area", "object area"), ("mask_area", "mask area"),
                 ("p_clean", "p clean"), ("p_object_removed", "p object removed"),
                 ("p_background_removed", "p background removed"), ("evidence_outside", "evidence outside")]


def audit_markdown(res: dict[str, Any]) -> str:
    info = res.get("settings", {})
    lines = ["# Per-class audit: where does each class's mask lie?", "",
             f"- explainer: `{info.get('checkpoint')}`", f"- classifier: `{info.get('classifier')}`",
             f"- data: `{info.get('manifest')}` split `{info.get('split')}`: {res['n_images']} images", "",
             "Per (image, ground-truth class) pair with boxes (else a segmentation): energy inside = the mask's "
             "energy on the object (Score-CAM's energy-based pointing game); excess outside = energy outside minus "
             "what a uniform mask would put there (1 - object area): > 0 means the mask avoids the object. p: the "
             "classifier's probability of the class, clean / object removed / background removed; evidence outside "
             "= share of pairs where removing the background drops the class more than removing the object. "
             "Ranked by excess outside (most context first). Percent.", "",
             "| " + " | ".join(title for _, title in AUDIT_COLUMNS) + " |", "|---" * len(AUDIT_COLUMNS) + "|"]
    for row in res["classes"]:
        cells = [str(row[k]) if k in ("rank", "class", "pairs") else _pct(row[k]) for k, _ in AUDIT_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if res.get("figures"):
        lines += ["", "## The images that show it most", ""] + [f"![{Path(f).stem}]({f})" for f in res["figures"]]
    return "\n".join(lines) + "\n"


def gallery_figure(entries: Sequence[Any], name: str, path: Path) -> Path:
    """One row: the 4 pairs of a class whose masks lie most outside the object (box / region outlined)."""
    from explainer.figures import plt, save_figure

    fig, axes = plt.subplots(1, len(entries), figsize=(2.2 * len(entries), 2.4), squeeze=False)
    for ax, (score, key, image, m, region) in zip(axes[0], entries):
        img = image.float().clamp(0, 1).permute(1, 2, 0).numpy()
        ax.imshow(img * m.numpy()[..., None])
        ax.contour(region.numpy().astype(float), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(f"{key[:18]}\noutside {100 * score:.0f}%", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{name}: image x mask, object outlined", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_audit(res: dict[str, Any], audit: Audit, out: Path, top: int) -> None:
    """audit.json, report.md, report.html and the gallery figures (rank 0)."""
    from explainer.atomic import write_text_atomic
    from explainer.eval_report import json_safe

    figures = []
    for row in res["classes"][:top]:
        k = audit.classes.index(row["class"])
        if audit.gallery.get(k):
            rel = f"figures/audit_{row['rank']}_{_slug(row['class'])}.png"
            gallery_figure(audit.gallery[k], row["class"], out / rel)
            figures.append(rel)
    res["figures"] = figures
    write_text_atomic(out / "audit.json", json.dumps(json_safe(res), indent=2))
    write_text_atomic(out / "report.md", audit_markdown(res))
    from explainer.report_html import audit_html

    write_text_atomic(out / "report.html", audit_html(res, out))


def log_audit_to_wandb(res: dict[str, Any], out: Path, tracking: Any, checkpoint: str) -> Path | None:
    """The class table (wandb.Table) and the figures as a W&B run (job_type "audit") grouped with the training run,
    offline unless an API key is configured, as explainer.eval_report.log_to_wandb; None when W&B is disabled."""
    from explainer.eval_report import json_safe
    from explainer.tracking import RUN_ID_FILE, resolve_wandb_mode

    mode = resolve_wandb_mode(tracking.wandb_mode)
    if mode == "disabled":
        return None
    import wandb

    id_file = Path(checkpoint).parent / RUN_ID_FILE
    group = tracking.group or (id_file.read_text().strip() if id_file.is_file() else None)
    run = wandb.init(project=tracking.project, entity=tracking.entity, group=group, job_type="audit",
                     tags=list(tracking.tags), dir=str(out), mode=mode, config=json_safe(res.get("settings", {})),
                     settings=wandb.Settings(silent=True))
    keys = [k for k, _ in AUDIT_COLUMNS]
    logged: dict[str, Any] = {"audit/classes": wandb.Table(columns=keys, data=[[r[k] for k in keys]
                                                                               for r in json_safe(res["classes"])])}
    for figure in res.get("figures", []):
        logged[f"audit/figures/{Path(figure).stem}"] = wandb.Image(str(out / figure), caption=Path(figure).stem)
    run.log(logged)
    folder = Path(run.dir).parent
    run.finish()
    return folder


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:40]


# ----------------------------------------------------------------------------------------------------------------------
# Driver and command line
# ----------------------------------------------------------------------------------------------------------------------


def run_audit(cfg: Any, checkpoint: str, *, split: str | None = None, classifier: str | None = None,
              max_images: int | None = None, out: str | None = None, top: int = 3) -> dict[str, Any]:
    """Audit cfg.data's split with the Explainer at `checkpoint`; every rank returns the results, rank 0 writes."""
    from explainer.config import input_normalization, to_dict
    from explainer.data.loader import make_eval_loader, read_data_manifest
    from explainer.data.transforms import denormalize
    from explainer.evaluate import _state, build_methods, check_test_split, load_eval_classifier

    state = _state(cfg.eval.process_group_timeout_min)
    device = state.device if state.device.type != "cpu" else torch.device("cpu")
    manifest = read_data_manifest(cfg.data)
    classes = list(manifest.classes)
    split = split or cfg.data.test_split
    check_test_split(manifest, split, max_images)
    clf, clf_path = load_eval_classifier(cfg, classes, device, classifier, where=str(manifest.path))
    net = build_methods(["explainer"], cfg, clf, classes, device, checkpoint, None)["explainer"].net
    audit = Audit(clf, net, classes, cfg.data.resize, cfg.loss.classification == "ce", device)
    norm = input_normalization(cfg)
    for batch in make_eval_loader(cfg.data, manifest, split, rank=state.process_index,
                                  world_size=state.num_processes, max_images=max_images, **norm):
        audit.update(batch, display=denormalize(batch["image"], **norm))
    res = audit.finish()
    res["settings"] = {"checkpoint": checkpoint, "classifier": clf_path, "manifest": str(manifest.path),
                       "split": split, "max_images": max_images, "world_size": state.num_processes,
                       "resize": cfg.data.resize, "image_size": cfg.data.image_size, "data": to_dict(cfg.data),
                       "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    out_dir = Path(out or Path(checkpoint).parent / "audit")
    if state.is_main_process:
        write_audit(res, audit, out_dir, top)
        log_audit_to_wandb(res, out_dir, cfg.tracking, checkpoint)
    res["output_dir"] = str(out_dir)
    state.wait_for_everyone()
    return res


def build_parser(prog: str = "python -m explainer.audit") -> argparse.ArgumentParser:
    from explainer.arguments import HelpFormatter

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="explainer checkpoint or its run folder")
    parser.add_argument("--config", default=None, help="the run's config (default: config.yaml beside the checkpoint)")
    parser.add_argument("--split", default=None, help="split to audit (default: data.test_split)")
    parser.add_argument("--classifier", default=None, help="classifier checkpoint (default: classifier.checkpoint)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/audit)")
    parser.add_argument("--top", type=int, default=3, help="classes shown in the figures")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m explainer.audit") -> int:
    from explainer.config import ExplainerRunConfig, load_config
    from explainer.logs import configure_logging
    from explainer.models.model_files import model_file
    from explainer.run_errors import UserError, exit_on_run_error

    args = build_parser(prog).parse_intermixed_args(argv)
    configure_logging()

    def body() -> dict[str, Any]:
        try:
            checkpoint = model_file(args.checkpoint, "explainer")
        except FileNotFoundError as exc:
            raise UserError(f"audit: {exc}") from None
        config = Path(args.config) if args.config else checkpoint.parent / "config.yaml"
        if not config.is_file():
            raise UserError(f"audit: no config: {config} does not exist (pass --config)")
        cfg = load_config(ExplainerRunConfig, config, args.overrides)
        return run_audit(cfg, str(checkpoint), split=args.split, classifier=args.classifier,
                         max_images=args.max_images, out=args.out, top=args.top)

    exit_on_run_error(body)
    from explainer.distributed import close_process_group

    close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
