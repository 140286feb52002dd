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
                    Table 4 (classification clean vs Explainer-masked), Table 3 (time per image per method),
                    faithfulness, localization (WSOL as Choe et al. 2020: explainer/wsol.py)
    report.html     the same tables (sortable), the figures embedded, per-class galleries: one offline file
    figures/fig1.png, figures/class_specific_<method>.png

Protocol (docs/method.md#evaluation): masks are aggregated over each image's ground-truth classes (pixel-wise max) and
compared with the binary ground truth at the mask's resolution, void pixels excluded (the reference counted them as
foreground). Table 2 uses the images that have a segmentation and at least one class. Table 4 uses every image; its
masked column multiplies each image by the Explainer's aggregated mask (an image without classes gets m = 0, as in
training). Timing: the method alone (for the Explainer: its forward pass, no classifier), autograd off where the method
allows (Grad-CAM and Extremal Perturbations need it), device synchronised before and after, after one untimed warm-up
call of the cheap methods (Explainer, RTIS, Grad-CAM) on the first image.

This module is the driver (settings, loading, the loop over the test split) and the command line; the accumulation is
explainer/evaluator.py, the report explainer/eval_report.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainer import metrics as M
from explainer.baselines import AttributionMethod, build_baseline
from explainer.config import (
    EvalConfig,
    ExplainerRunConfig,
    input_normalization,
    load_config,
    resolve_run_paths,
    to_dict,
)
from explainer.eval_report import json_safe, log_to_wandb, markdown_report, wandb_tables, write_outputs
from explainer.evaluator import ALL_METHODS, MASK_METHODS, Evaluator, MaskNetwork, parse_methods
from explainer.logs import configure_logging, get_logger
from explainer.run_errors import DEBUG_HELP, InputError, exit_on_run_error, request_debug

__all__ = ["ALL_METHODS", "MASK_METHODS", "Evaluator", "MaskNetwork", "evaluate", "json_safe", "log_to_wandb",
           "main", "markdown_report", "parse_methods", "wandb_tables", "write_outputs"]  # the names tests and
# callers import from here; they are defined in explainer.evaluator / explainer.eval_report

log = get_logger(__name__)

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
    raise InputError(f"evaluate: nothing to evaluate: manifest {manifest.path} {why} (data.test_split)")


def scored_summary(res: dict[str, Any], batches: Any, stop_on_bad_shard: bool = False) -> dict[str, Any]:
    """Images scored (per method) and what the loader skipped or found wrong, gathered over all ranks; an
    evaluation where no image could be scored fails, and so does one where a shard could not be read whole with
    data.on_bad_shard=stop (every rank alike: the counts and notes are gathered)."""
    import torch.distributed as dist

    from explainer.data.loader import bad_shard_error

    problems = list(getattr(batches, "problems", []))
    bad = list(getattr(batches, "bad_shards", []))
    skipped = torch.tensor(float(getattr(batches, "corrupt_samples", 0)), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[tuple[list[str], list[tuple[str, str]]]] = [([], []) for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, (problems, bad))
        problems = [p for part, _ in gathered for p in part]
        bad = [pair for _, part in gathered for pair in part]
        totals = M.Totals()
        totals.add("skipped", skipped)
        totals.all_reduce()
        skipped = totals.get("skipped")
    if stop_on_bad_shard and bad:
        raise bad_shard_error(bad, "in the test split; no results written")
    out = {"images": res["n_images"], "skipped": int(skipped), "problems": problems,
           "per_method": {name: v["images"] for name, v in res["timing"].items()}}
    if res["n_images"] == 0:
        raise InputError(f"evaluate: no test image could be scored ({out['skipped']} skipped: "
                         f"{'; '.join(problems[:5]) or 'none listed'})")
    return out


def load_eval_classifier(cfg: ExplainerRunConfig, classes: Sequence[str], device: torch.device,
                         checkpoint: str | None = None, where: str = "the data") -> tuple[nn.Module, str]:
    """The frozen Explanandum from any source (explainer.models.explanandum) and how reports name it;
    `checkpoint` (--classifier) replaces classifier.checkpoint."""
    from explainer.models.explanandum import load_explanandum, source_kind

    if source_kind(cfg.classifier) == "checkpoint" and (checkpoint or cfg.classifier.checkpoint) is None:
        raise InputError("no classifier: pass --classifier or set classifier.checkpoint (or classifier.torchvision, "
                         "classifier.factory, classifier.torchscript) in the config")
    explanandum = load_explanandum(cfg.classifier, classes, cfg.data.image_size, map_location=device,
                                   checkpoint=checkpoint, where=where)
    return explanandum.model, explanandum.source


def build_methods(names: Sequence[str], cfg: ExplainerRunConfig, clf: nn.Module, classes: list[str],
                  device: torch.device, checkpoint: str | None, rtis_checkpoint: str | None
                  ) -> dict[str, AttributionMethod]:
    """Each named method, ready to call: the mask networks loaded from their checkpoints (checked against the data's
    classes, with a note when size or resize differ from training), the baselines built around the classifier."""
    from explainer.models import load_explainer

    built: dict[str, AttributionMethod] = {}
    for name in names:
        if name in MASK_METHODS:
            path = checkpoint if name == "explainer" else rtis_checkpoint
            if path is None:
                flag = "--checkpoint" if name == "explainer" else "--rtis-checkpoint"
                raise InputError(f"method {name!r} needs {flag}")
            net, meta = load_explainer(path, map_location=device, num_classes=len(classes))
            if list(meta["classes"]) != classes:
                raise InputError(f"{path}: explainer classes {meta['classes']} differ from the data's {classes}")
            if int(meta["image_size"]) != cfg.data.image_size:
                log.warning("note: %s was trained at %s px, evaluating at %d px (data.image_size)", path,
                            meta["image_size"], cfg.data.image_size)
            if meta.get("extra", {}).get("resize", "squash") != cfg.data.resize:
                log.warning("note: %s was trained with data.resize=%s, evaluating with %s", path,
                            meta["extra"].get("resize", "squash"), cfg.data.resize)
            built[name] = MaskNetwork(name, net)
        else:
            built[name] = build_baseline(name, clf, cfg.eval)
    return built


def evaluate(cfg: ExplainerRunConfig, checkpoint: str | None, *, classifier: str | None = None,
             methods: Sequence[str] | None = None, rtis_checkpoint: str | None = None, max_images: int | None = None,
             out: str | None = None, figure_images: int = 4, progress: bool = True,
             batches: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Evaluate on cfg.data's test split (or on `batches`, for callers that bring their own); returns the results
    on every rank and writes them from rank 0."""
    from tqdm import tqdm

    from explainer.data.loader import make_eval_loader, read_data_manifest

    state = _state(cfg.eval.process_group_timeout_min)
    device = state.device if state.device.type != "cpu" else torch.device("cpu")  # accelerate says cpu:0 under gloo
    names = parse_methods(methods or cfg.eval.methods)
    manifest = read_data_manifest(cfg.data)
    classes = list(manifest.classes)
    clf, clf_path = load_eval_classifier(cfg, classes, device, classifier, where=str(manifest.path))

    built = build_methods(names, cfg, clf, classes, device, checkpoint, rtis_checkpoint)

    limit = max_images if max_images is not None else cfg.eval.max_images
    if batches is None:
        check_test_split(manifest, cfg.data.test_split, limit)
        batches = make_eval_loader(cfg.data, manifest, cfg.data.test_split, rank=state.process_index,
                                   world_size=state.num_processes, max_images=limit, **input_normalization(cfg))
    ev = eval_settings(cfg, manifest, limit)
    evaluator = Evaluator(clf, built, classes, ev, device, figure_images=figure_images if state.is_main_process else 0,
                          norm=input_normalization(cfg), softmax=cfg.loss.classification == "ce",
                          resize=cfg.data.resize, pointing_boxes=not manifest.dataset.startswith("coco"))
    for batch in tqdm(batches, desc=f"evaluate[{state.process_index}]", unit="batch",
                      disable=not (progress and state.is_main_process)):
        evaluator.update(batch)
    res = evaluator.finish()
    res["scored"] = scored_summary(res, batches, getattr(cfg.data, "on_bad_shard", "skip") == "stop")
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
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def run_args(args: argparse.Namespace) -> int:
    cfg = resolve_run_paths(load_config(ExplainerRunConfig, args.config, args.overrides), Path(args.config).parent)
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
    args = build_parser(prog).parse_intermixed_args(argv)
    request_debug(args.debug)
    return exit_on_run_error(lambda: run_args(args))  # bad input: one line, exit 2; bugs keep their traceback


if __name__ == "__main__":
    sys.exit(main())
