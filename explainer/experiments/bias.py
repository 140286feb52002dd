"""Bias detection, measured: does the Explainer show that a classifier uses a spurious background cue?

The paper argues that an Explainer reveals what the classifier really uses (rails for "train"). Here the synthetic
generator draws a "rail tracks" band near the bottom of training images that contain the cue class K (never of the
others). In the biased variant the annotations of K also follow the band: a K object without the band is left
unlabelled in train/val with probability `relabel_uncued` (1.0 by default: the label K means "band", the object alone
does not), as when annotators of a real data set tag "train" where they see rails. A control classifier is trained on
the same kind of scenes without band and with honest labels. An Explainer is trained for each classifier. Both pairs
are measured on the SAME test scenes, where the band is drawn with probability 0.5 independently of the classes:

- share of the class-K mask mass on the band vs on the K object, on test images that contain both (per-image
  fractions of sum(s_K), averaged): the biased Explainer should put most of it on the band, the control one on the
  object;
- the classifier's actual reliance, for reference: K's logit with the object removed vs with the band removed
  (pixels set to the dataset mean, as the Explainer's masking does), recall and false positives with/without band.

Pure co-occurrence (`--relabel-uncued 0`: every K image has the band, labels honest) is the generator's plain cue
option; on these scenes the object is an equally perfect and easy predictor, and a tiny CNN then barely uses the band,
which the Explainer shows too (README "Bias detection", docs/results.md#bias).

    python -m explainer.bias --out runs/bias [--quick] [--relabel-uncued 1.0]

Everything trains through the project's trainers (`run_classifier`, `run`), each in a fresh spawned process (fresh
accelerate state), with the synthetic presets and small step counts. Writes OUT/bias.json, OUT/bias.md and
OUT/figures/bias.png.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
import torch

from explainer.config import ClassifierRunConfig, ExplainerRunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VARIANTS = ("biased", "control")


@dataclass
class BiasSettings:
    """Sizes of the experiment; `quick()` is the CPU test version."""

    num_classes: int = 4
    image_size: int = 64
    cue_class: int = 0
    train_cue_prob: float = 0.5  # share of train/val images with class K that carry the band (no other image does)
    relabel_uncued: float = 1.0  # biased variant: probability that a K object without the band is left unlabelled
    test_cue_prob: float = 0.5  # test: band independent of the classes
    counts: tuple[int, int, int] = (600, 100, 200)  # train, val, test scenes
    seed: int = 0
    classifier_steps: int = 600
    explainer_steps: int = 800
    batch_size: int = 16
    threads: int = 1  # intra-op threads per training process

    @classmethod
    def quick(cls) -> BiasSettings:
        return cls(image_size=48, counts=(320, 48, 96), classifier_steps=200, explainer_steps=300)


# ----------------------------------------------------------------------------------------------------------------------
# Data and training
# ----------------------------------------------------------------------------------------------------------------------


def _spec(s: BiasSettings, cue_prob: float) -> Any:
    from explainer.data.synthetic import SyntheticSpec

    train, val, test = s.counts
    return SyntheticSpec(num_classes=s.num_classes, image_size=s.image_size, seed=s.seed,
                         counts={"train": train, "val": val, "test": test},
                         max_objects=min(3, s.num_classes),
                         cue_class=s.cue_class if cue_prob > 0 else None, cue_prob=cue_prob)


def _relabel_uncued(root: Path, s: BiasSettings, spec: Any) -> int:
    """Annotation bias: drop class K from the XML of train/val scenes that show K without the band; returns how many.

    Which scenes have the band is known from the deterministic generator (render_scene). The choice is seeded per
    scene, so running it twice on the same folder changes nothing more.
    """
    import xml.etree.ElementTree as ET

    from explainer.data.synthetic import render_scene, scene_id

    name = spec.class_names[s.cue_class]
    changed = 0
    for split in ("train", "val"):
        for index in range(spec.counts[split]):
            _, mask, cue = render_scene(spec, split, index)
            if cue is not None or not (mask == s.cue_class + 1).any():
                continue
            if np.random.default_rng([s.seed, index, len(split)]).random() >= s.relabel_uncued:
                continue
            path = root / "Annotations" / f"{scene_id(split, index)}.xml"
            tree = ET.parse(path)
            objects = [o for o in tree.getroot().findall("object") if o.findtext("name") == name]
            for o in objects:
                tree.getroot().remove(o)
            if objects:
                tmp = path.with_name(f".{path.name}.tmp")
                tree.write(tmp)
                os.replace(tmp, path)
                changed += 1
    return changed


def make_shards(s: BiasSettings, variant: str, out: Path) -> tuple[Path, int]:
    """Shards of one variant through the data pipeline (VOC layout -> shards); returns the manifest and the number
    of relabelled scenes. Biased: band on K images of train/val and K's labels following it; control: no band."""
    from explainer.data.shards import ShardOptions
    from explainer.data.synthetic import write_voc_layout
    from explainer.data.voc import build_voc_shards

    spec = _spec(s, s.train_cue_prob if variant == "biased" else 0.0)
    source = write_voc_layout(spec, out / "source")
    changed = _relabel_uncued(source, s, spec) if variant == "biased" and s.relabel_uncued > 0 else 0
    options = ShardOptions(out=out, workers=1, progress=False)
    build_voc_shards(source, options, splits=list(spec.counts), classes=spec.class_names, dataset="synthetic",
                     seed=spec.seed, command=["explainer.bias", variant],
                     extra={"synthetic": spec.to_dict(), "bias": {"variant": variant, "relabelled": changed,
                                                                  "relabel_uncued": s.relabel_uncued}})
    return out / "manifest.json", changed


def _common(s: BiasSettings, manifest: Path, out: Path, steps: int) -> list[str]:
    return [f"data.manifest={manifest}", f"data.image_size={s.image_size}", f"data.batch_size={s.batch_size}",
            "data.num_workers=0", "data.shuffle_buffer=64", f"train.output_dir={out}", f"train.max_steps={steps}",
            f"train.val_every_steps={max(1, steps // 4)}", "tracking.wandb_mode=disabled", f"train.seed={s.seed}",
            "train.early_stop_patience=100"]


def _train_worker(kind: str, cfg: Any, threads: int, queue: Any) -> None:
    torch.set_num_threads(threads)
    try:
        if kind == "classifier":
            from explainer.train_classifier import run_classifier

            summary = run_classifier(cfg)
        else:
            from explainer.train import run

            summary = run(cfg)
        queue.put(("ok", summary))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def train(kind: str, cfg: Any, threads: int) -> dict[str, Any]:
    """Run the project's trainer in a fresh spawned process (accelerate keeps process-wide state)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_train_worker, args=(kind, cfg, threads, queue))
    proc.start()
    status, payload = "error", "the training process died without a result (see its output above)"
    while True:
        try:
            status, payload = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive():
                break
    proc.join()
    if status != "ok" or proc.exitcode != 0:
        raise RuntimeError(f"training the {kind} in {cfg.train.output_dir} failed (exit code {proc.exitcode}): "
                           f"{payload}")
    return payload


def train_variant(s: BiasSettings, variant: str, out: Path) -> dict[str, Any]:
    manifest, relabelled = make_shards(s, variant, out / "shards")
    clf_cfg = load_config(ClassifierRunConfig, CONFIGS / "classifier" / "synthetic.yaml",
                          _common(s, manifest, out / "classifier", s.classifier_steps))
    clf_summary = train("classifier", clf_cfg, s.threads)
    clf_path = Path(clf_summary["checkpoint"])
    exp_cfg = load_config(ExplainerRunConfig, CONFIGS / "synthetic.yaml",
                          [*_common(s, manifest, out / "explainer", s.explainer_steps),
                           f"classifier.checkpoint={clf_path}"])
    exp_summary = train("explainer", exp_cfg, s.threads)
    return {"manifest": manifest, "classifier": clf_path, "explainer": Path(exp_summary["checkpoint"]),
            "relabelled": relabelled}


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TestScenes:
    images: torch.Tensor  # [N,3,S,S] normalised, decoded the way the loader decodes
    masks: np.ndarray  # [N,S,S] class indices (0 bg, k+1, 255 void)
    cues: np.ndarray  # [N,S,S] bool band (empty where no band was drawn)
    has_cue: np.ndarray  # [N] bool


def render_test_scenes(s: BiasSettings) -> TestScenes:
    from explainer.data.synthetic import render_scene
    from explainer.data.transforms import decode_rgb, normalize_batch

    spec = _spec(s, s.test_cue_prob)
    images, masks, cues, has = [], [], [], []
    for i in range(s.counts[2]):
        image, mask, cue = render_scene(spec, "test", i)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        images.append(decode_rgb(buf.getvalue(), s.image_size))
        masks.append(mask)
        cues.append(cue if cue is not None else np.zeros(mask.shape, bool))
        has.append(cue is not None)
    return TestScenes(normalize_batch(np.stack(images)), np.stack(masks), np.stack(cues), np.asarray(has))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


@torch.no_grad()
def measure(scenes: TestScenes, classifier_path: Path, explainer_path: Path, cue_class: int) -> dict[str, Any]:
    """Where class K's mask goes and how the classifier treats the band."""
    from explainer.models import load_classifier, load_explainer
    from explainer.models.explainer import class_logits

    clf, _ = load_classifier(classifier_path)
    expl, meta = load_explainer(explainer_path)
    def logits_of(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([clf(x) for x in images.split(64)])

    logits = logits_of(scenes.images)
    obj_t = torch.from_numpy(scenes.masks == cue_class + 1).float()[:, None]
    cue_t = torch.from_numpy(scenes.cues).float()[:, None]
    without_object = logits_of(scenes.images * (1 - obj_t))[:, cue_class].numpy()
    without_band = logits_of(scenes.images * (1 - cue_t))[:, cue_class].numpy()
    cue = torch.tensor([cue_class])  # only the cue class's map is upsampled
    s_k = torch.cat([torch.sigmoid(class_logits(expl(x), x.shape[-2:]).full(cue))[:, 0]
                     for x in scenes.images.split(64)]).numpy().astype(np.float64)
    pred = (logits[:, cue_class] >= 0).numpy()
    present = np.array([(m == cue_class + 1).any() for m in scenes.masks])
    frac_cue, frac_obj, mean_cue, mean_obj, mean_cue_absent = [], [], [], [], []
    for i in range(len(s_k)):
        cue, obj, s = scenes.cues[i], scenes.masks[i] == cue_class + 1, s_k[i]
        if present[i] and scenes.has_cue[i] and cue.any() and obj.any():
            total = s.sum()
            if total > 0:
                frac_cue.append(float((s * cue).sum() / total))
                frac_obj.append(float((s * obj).sum() / total))
            mean_cue.append(float(s[cue].mean()))
            mean_obj.append(float(s[obj].mean()))
        if not present[i] and scenes.has_cue[i] and cue.any():
            mean_cue_absent.append(float(s[cue].mean()))
    groups = {
        "with_k_with_cue": present & scenes.has_cue,
        "with_k_no_cue": present & ~scenes.has_cue,
        "no_k_with_cue": ~present & scenes.has_cue,
        "no_k_no_cue": ~present & ~scenes.has_cue,
    }
    band_area = float(scenes.cues[scenes.has_cue].mean()) if scenes.has_cue.any() else None
    both = groups["with_k_with_cue"]
    clean_k = logits[:, cue_class].numpy()
    return {
        "class": meta["classes"][cue_class],
        "images": {k: int(v.sum()) for k, v in groups.items()},
        "mask_mass_on_cue": _mean(frac_cue),
        "mask_mass_on_object": _mean(frac_obj),
        "mean_mask_on_cue": _mean(mean_cue),
        "mean_mask_on_object": _mean(mean_obj),
        "mean_mask_on_cue_without_k": _mean(mean_cue_absent),
        "cue_band_area": band_area,
        "recall_k_with_cue": float(pred[groups["with_k_with_cue"]].mean()) if groups["with_k_with_cue"].any() else None,
        "recall_k_without_cue": float(pred[groups["with_k_no_cue"]].mean()) if groups["with_k_no_cue"].any() else None,
        "false_positive_rate_k_with_cue": (float(pred[groups["no_k_with_cue"]].mean())
                                           if groups["no_k_with_cue"].any() else None),
        "false_positive_rate_k_without_cue": (float(pred[groups["no_k_no_cue"]].mean())
                                              if groups["no_k_no_cue"].any() else None),
        "logit_k_both": float(clean_k[both].mean()) if both.any() else None,
        "logit_k_object_removed": float(without_object[both].mean()) if both.any() else None,
        "logit_k_band_removed": float(without_band[both].mean()) if both.any() else None,
        "_s_k": s_k,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def _f(v: float | None, scale: float = 100.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def _rows(k: str) -> list[tuple[str, str]]:
    return [
        (f"share of the '{k}' mask on the band (images with both)", "mask_mass_on_cue"),
        (f"share of the '{k}' mask on the object (images with both)", "mask_mass_on_object"),
        ("mean mask on the band (images with both)", "mean_mask_on_cue"),
        ("mean mask on the object (images with both)", "mean_mask_on_object"),
        (f"mean '{k}' mask on the band, images WITHOUT '{k}'", "mean_mask_on_cue_without_k"),
        (f"classifier recall of '{k}' without the band", "recall_k_without_cue"),
        (f"classifier recall of '{k}' with the band", "recall_k_with_cue"),
        (f"classifier false positives of '{k}' with the band, no '{k}'", "false_positive_rate_k_with_cue"),
        (f"classifier false positives of '{k}' without the band", "false_positive_rate_k_without_cue"),
    ]


def _range(values: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    kept = [v for v in values if v is not None]
    if not kept:
        return "-"
    lo, hi = min(kept) * scale, max(kept) * scale
    return f"{lo:.{digits}f}" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{lo:.{digits}f} to {hi:.{digits}f}"


def seeds_markdown(by_seed: dict[int, dict[str, Any]]) -> str:
    """Every row of the bias table as min-max over seeds (each seed: its own scenes, classifiers and Explainers)."""
    first = next(iter(by_seed.values()))
    k = first["variants"]["biased"]["class"]
    seeds = ", ".join(str(x) for x in by_seed)
    lines = [f"# Bias detection over seeds {seeds}: min-max of each number (%)", "",
             f"Each seed draws its own scenes and trains its own classifiers and Explainers ({len(by_seed)} runs of "
             "`python -m explainer.bias` with these settings); per-seed tables in seed<N>/bias.md.", "",
             "| | biased | control |", "|---|---|---|"]
    for label, key in _rows(k):
        lines.append(f"| {label} | {_range([r['variants']['biased'][key] for r in by_seed.values()])} | "
                     f"{_range([r['variants']['control'][key] for r in by_seed.values()])} |")
    lines += ["", f"Classifier logit of '{k}' on test images with both (as is / object removed / band removed):", ""]
    for v in VARIANTS:
        cells = [_range([r["variants"][v][key] for r in by_seed.values()], 1, 2)
                 for key in ("logit_k_both", "logit_k_object_removed", "logit_k_band_removed")]
        lines.append(f"- {v}: " + " / ".join(cells))
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any]) -> str:
    r = results["variants"]
    k = r["biased"]["class"]
    lines = [
        "# Bias detection: what does the classifier use for class " + f"'{k}'?", "",
        f"Biased: {results['settings']['train_cue_prob']:.0%} of the training images containing '{k}' carry a "
        f"rail-tracks band, and '{k}' objects without it are unlabelled with probability "
        f"{results['settings']['relabel_uncued']} ({results['relabelled']} scenes); control: no band, honest labels. "
        f"Both are measured on the same {results['settings']['counts'][2]} test scenes, where the band appears with "
        f"probability {results['settings']['test_cue_prob']} independently of the classes. Values in %.", "",
        "| | biased | control |", "|---|---|---|",
    ]
    for label, key in _rows(k):
        lines.append(f"| {label} | {_f(r['biased'][key])} | {_f(r['control'][key])} |")
    lines += ["", f"Classifier logit of '{k}' on test images with both (mean): as is / object removed / band "
                  "removed (pixels set to the dataset mean):", ""]
    for v in VARIANTS:
        lines.append(f"- {v}: {_f(r[v]['logit_k_both'], 1, 2)} / {_f(r[v]['logit_k_object_removed'], 1, 2)} / "
                     f"{_f(r[v]['logit_k_band_removed'], 1, 2)}")
    lines += ["", f"The band covers {_f(r['biased']['cue_band_area'])} % of an image. Images per group (biased "
                  f"run): {r['biased']['images']}.", "", "![bias](figures/bias.png)", ""]
    return "\n".join(lines)


def figure(scenes: TestScenes, maps: dict[str, np.ndarray], cue_class: int, path: Path, rows: int = 4) -> None:
    """Test images with class K and the band: the image, then x * s_K of the biased and the control Explainer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from explainer.data.transforms import denormalize
    from explainer.figures import save_figure

    picks = [i for i in range(len(scenes.masks))
             if scenes.has_cue[i] and (scenes.masks[i] == cue_class + 1).any()][:rows]
    if not picks:
        return
    fig, axes = plt.subplots(len(picks), 3, figsize=(6, 2 * len(picks)), squeeze=False)
    for r, i in enumerate(picks):
        img = denormalize(scenes.images[i]).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[r, 0].imshow(img)
        for c, variant in enumerate(VARIANTS, start=1):
            axes[r, c].imshow(img * maps[variant][i][..., None])
            if r == 0:
                axes[r, c].set_title(f"{variant} explainer", fontsize=9)
        if r == 0:
            axes[r, 0].set_title("image (band + object)", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)


def run_bias(out: str | os.PathLike, settings: BiasSettings | None = None) -> dict[str, Any]:
    """Train both variants, measure, write bias.json / bias.md / figures/bias.png; return the results."""
    s = settings or BiasSettings()
    out = Path(out)
    start = time.time()
    paths = {v: train_variant(s, v, out / v) for v in VARIANTS}
    scenes = render_test_scenes(s)
    measured = {v: measure(scenes, paths[v]["classifier"], paths[v]["explainer"], s.cue_class) for v in VARIANTS}
    maps = {v: measured[v].pop("_s_k") for v in VARIANTS}
    results = {"settings": asdict(s), "variants": measured, "relabelled": paths["biased"]["relabelled"],
               "checkpoints": {v: {k: str(paths[v][k]) for k in ("manifest", "classifier", "explainer")}
                               for v in VARIANTS},
               "seconds": round(time.time() - start, 1)}
    figure(scenes, maps, s.cue_class, out / "figures" / "bias.png")
    from explainer.atomic import write_text_atomic
    from explainer.eval_report import json_safe

    write_text_atomic(out / "bias.json", json.dumps(json_safe(results), indent=2))
    write_text_atomic(out / "bias.md", markdown(results))
    return results


def main(argv: list[str] | None = None, prog: str = "python -m explainer.bias") -> int:
    from explainer.arguments import HelpFormatter

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="small CPU version (48 px, fewer scenes and steps)")
    parser.add_argument("--cue-class", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run once per seed into <out>/seed<N> and write <out>/bias_seeds.md: every number as "
                             "its min-max over the seeds (overrides --seed)")
    parser.add_argument("--relabel-uncued", type=float, default=None,
                        help="probability that a K object without the band is unlabelled (default 1.0; 0 = plain "
                             "co-occurrence, every K training image with the band)")
    args = parser.parse_args(argv)
    s = BiasSettings.quick() if args.quick else BiasSettings()
    s = replace(s, cue_class=args.cue_class, seed=args.seed)
    if args.relabel_uncued is not None:
        if not 0.0 <= args.relabel_uncued <= 1.0:
            parser.error("--relabel-uncued must be in [0, 1]")
        s = replace(s, relabel_uncued=args.relabel_uncued,
                    train_cue_prob=1.0 if args.relabel_uncued == 0 else s.train_cue_prob)
    if args.seeds:
        from explainer.atomic import write_text_atomic

        by_seed = {seed: run_bias(Path(args.out) / f"seed{seed}", replace(s, seed=seed))
                   for seed in dict.fromkeys(args.seeds)}
        table = seeds_markdown(by_seed)
        write_text_atomic(Path(args.out) / "bias_seeds.md", table)
        print(table)
        print(f"[bias] wrote {Path(args.out) / 'bias_seeds.md'}")
        return 0
    results = run_bias(args.out, s)
    print(markdown(results))
    print(f"[bias] wrote {Path(args.out) / 'bias.md'} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
