"""Explain images with a trained Explainer: per-class masks of the classes that matter, overlays, a top-k grid, scores.

    explainer explain --checkpoint run/explainer.pt photos/ more/*.jpg one.png --out explained/

Which classes are written: by default the top k (--top-k, 5) by the classifier's probability (the run's config.yaml
next to the checkpoint, or --config, names the classifier; sigmoid, or softmax with loss.classification=ce), so 1000
classes do not mean 1000 files per image. --classes NAME (repeatable) writes those, --all-classes every class;
--rank-by mask ranks by the average mask activation instead (no classifier needed; also the fallback when no config
is found). Images are fitted to the explainer's input as in its training (data.resize, recorded in the checkpoint).

For every input image, under OUT/<name>/:
    masks/<k>_<class>.png   8-bit mask of class k on the original image (255 = fully kept), for the classes written;
                            k zero-padded to the digits of the largest class index, so names sort by k
    aggregated.png          pixel-wise max over all classes (no labels at inference: absent classes should be empty),
                            taken at the explainer head's resolution, then upsampled
    overlay.png             the aggregated mask as a heat map over the image
    topk.png                the image and the top k classes of the ranking, each as the image seen through its mask
    scores.json             per class the average mask activation at the head's resolution (and the classifier's
                            probability), the ranking,
                            the classes written
and OUT/index.json lists the images written and the files skipped (with the reason). A file that cannot be decoded
is reported by name and skipped, the others are still written; the exit status is then 1.

`--export torchscript|onnx` also writes the Explainer for deployment and checks that the exported model gives the same
masks as the eager one on the first batch (TorchScript needs nothing extra; ONNX needs `pip install '.[export]'`).
The exported model outputs the class logits at the head's resolution (HeadLogits: 1/8 of the input for DeepLabV3):
upsample a class's map bilinearly to the input size and take its sigmoid for its mask (docs/method.md#head-resolution).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

from explainer.arguments import HelpFormatter, max_pixels_arg
from explainer.atomic import write_atomic
from explainer.data.transforms import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGENET_MEAN,
    RESIZE_MODES,
    decode_rgb,
    mask_to_original,
    mean_fill,
    normalize_batch,
    open_image,
)
from explainer.models.explainer import ClassLogits, class_logits, upsample
from explainer.run_errors import DEBUG_HELP, InputError, MissingInput, UserError, exit_on_run_error, request_debug

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
EXPORT_TOLERANCE = 1e-4  # max |mask difference| accepted between the exported and the eager model
RANK_BY = ("auto", "probability", "mask")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (their images, recursively, sorted) and glob patterns -> unique files in the given order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise MissingInput(f"pattern {item!r} matches no file")
            files += matches
        else:
            raise MissingInput(f"input {item!r} is not a file, a folder or a glob pattern that matches files")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


@dataclass
class Decoded:
    path: Path
    original: Image.Image | None  # RGB at its own size
    resized: np.ndarray | None  # uint8 [S,S,3], the model input before normalisation
    error: str | None = None


@dataclass(frozen=True)
class Fit:
    """How an image becomes the model input (data.resize of the training run), the letterbox fill colour, and the
    pixel cap checked from the header before decoding."""

    size: int
    resize: str = "squash"
    fill: tuple[int, int, int] = (0, 0, 0)
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS


def decode(path: Path, fit: Fit) -> Decoded:
    """Read one image the way the training loader does (decode_rgb); any failure is returned, not raised. An image
    over the pixel cap is refused from its header (ImageTooLarge), before anything is decoded."""
    try:
        data = path.read_bytes()
        resized = decode_rgb(data, fit.size, fit.resize, fit.fill, max_pixels=fit.max_pixels)
        with open_image(data, fit.max_pixels) as im:
            original = im.convert("RGB")
        return Decoded(path, original, resized)
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises for a broken file, the file is skipped
        return Decoded(path, None, None, f"{type(exc).__name__}: {exc}")


class _Files(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], fit: Fit) -> None:
        self.files, self.fit = files, fit

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Decoded:
        return decode(self.files[i], self.fit)


def batches(files: list[Path], fit: Fit, batch_size: int, workers: int) -> Iterator[list[Decoded]]:
    loader = torch.utils.data.DataLoader(_Files(files, fit), batch_size=batch_size, num_workers=workers,
                                         collate_fn=list, shuffle=False)
    yield from loader


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


def save_png(image: Image.Image, path: Path) -> None:
    write_atomic(path, lambda h: image.save(h, format="PNG"))


def save_json(payload: Any, path: Path) -> None:
    write_atomic(path, lambda h: h.write(json.dumps(payload, indent=2).encode()))


def heat_overlay(image: Image.Image, mask: Image.Image, alpha: float = 0.5) -> Image.Image:
    """Blend a red-yellow heat map of an 8-bit mask over the image (the mask's strength sets the blending)."""
    m = np.asarray(mask, dtype=np.float32) / 255.0
    heat = np.stack([np.ones_like(m), m, np.zeros_like(m)], -1) * 255.0
    base = np.asarray(image, dtype=np.float32)
    w = alpha * m[..., None]
    return Image.fromarray(np.clip(base * (1 - w) + heat * w, 0, 255).astype(np.uint8), mode="RGB")


def dimmed(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with the masked-out part darkened (how the classifier sees x * m, for the top-k grid)."""
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    base = np.asarray(image, dtype=np.float32)
    return Image.fromarray(np.clip(base * (0.15 + 0.85 * m), 0, 255).astype(np.uint8), mode="RGB")


def topk_grid(image: Image.Image, tiles: list[tuple[str, float, Image.Image]], tile: int = 160) -> Image.Image:
    """One row: the image, then one tile per top class with its name and average activation."""
    label_h = 16
    grid = Image.new("RGB", (tile * (1 + len(tiles)), tile + label_h), "white")
    draw = ImageDraw.Draw(grid)
    grid.paste(image.resize((tile, tile), Image.BILINEAR), (0, label_h))
    draw.text((4, 2), "image", fill="black")
    for i, (name, score, im) in enumerate(tiles, start=1):
        grid.paste(im.resize((tile, tile), Image.BILINEAR), (i * tile, label_h))
        draw.text((i * tile + 4, 2), f"{name} {score:.3f}", fill="black")
    return grid


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "image"


def unique_dirs(files: list[Path]) -> dict[Path, str]:
    """Output folder names: the file stem, suffixed where two inputs share one (a/x.jpg, b/x.png)."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    for f in files:
        base = safe_name(f.stem)
        name, n = base, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        names[f] = name
    return names


def mask_file_name(k: int, name: str, num_classes: int) -> str:
    """`<k>_<class>.png`, k zero-padded to the digits of the largest index (at least 2), so files sort by k."""
    return f"{k:0{max(2, len(str(num_classes - 1)))}d}_{safe_name(name)}.png"


@dataclass
class Ranked:
    """One image's class maps and how its classes rank: `values` are probabilities (by = 'probability') or average
    mask activations (by = 'mask', at the head's resolution); `written` the class indices whose masks are written,
    best first. Only the written classes are upsampled to the input size (docs/method.md#head-resolution)."""

    logits: torch.Tensor  # [C, h, w] at the explainer head's resolution
    size: tuple[int, int]  # (S, S): the explainer's input
    activation: np.ndarray  # [C] average mask activation
    probability: np.ndarray | None  # [C] the classifier's probability, if a classifier ranks
    order: np.ndarray  # class indices, best first
    written: list[int]

    def mask(self, k: int) -> torch.Tensor:
        """Class k's mask [S, S] in [0, 1]: the same numbers as when the model upsampled every class."""
        return torch.sigmoid(upsample(self.logits[k:k + 1][None], self.size)[0, 0])

    def aggregated(self) -> torch.Tensor:
        """max over the classes [S, S]: the upsampled max of the head-resolution masks (no C full-size maps)."""
        return torch.sigmoid(upsample(self.logits.amax(0)[None, None], self.size)[0, 0])

    @property
    def by(self) -> str:
        return "mask" if self.probability is None else "probability"

    def value(self, k: int) -> float:
        return float((self.activation if self.probability is None else self.probability)[k])


def write_outputs(item: Decoded, ranked: Ranked, classes: list[str], out: Path, top_k: int,
                  resize: str = "squash") -> dict[str, Any]:
    """All files of one image; only the written classes' masks are mapped to full resolution. Returns its record."""
    assert item.original is not None
    size = item.original.size
    full = {k: mask_to_original(ranked.mask(k).numpy(), size, resize) for k in ranked.written}
    for k, im in full.items():
        save_png(im, out / "masks" / mask_file_name(k, classes[k], len(classes)))
    agg = mask_to_original(ranked.aggregated().numpy(), size, resize)
    save_png(agg, out / "aggregated.png")
    save_png(heat_overlay(item.original, agg), out / "overlay.png")
    shown = ranked.written[:top_k]
    top = [(classes[k], ranked.value(k), dimmed(item.original, full[k])) for k in shown]
    save_png(topk_grid(item.original, top), out / "topk.png")
    record: dict[str, Any] = {
        "file": str(item.path),
        "size": list(size),
        "resize": resize,
        "ranked_by": ranked.by,
        "scores": {name: float(ranked.activation[k]) for k, name in enumerate(classes)},
        "ranking": [[classes[k], ranked.value(int(k))] for k in ranked.order],
        "written": [classes[k] for k in ranked.written],
    }
    if ranked.probability is not None:
        record["probabilities"] = {name: float(ranked.probability[k]) for k, name in enumerate(classes)}
    save_json(record, out / "scores.json")
    return record


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------


class HeadLogits(nn.Module):
    """What an export holds: image [B,3,S,S] -> class logits [B,C,h,w] at the head's resolution (S/8 for DeepLabV3
    and LR-ASPP, S for tiny U-Net). A class's mask is sigmoid of its map upsampled bilinearly to S x S
    (align_corners=False), as `explain` does for the classes it writes (docs/method.md#head-resolution)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def export_model(model: nn.Module, example: torch.Tensor, fmt: str, path: Path) -> float:
    """Write the explainer (HeadLogits) as TorchScript or ONNX to `path`, reload it, and return max |mask difference|
    vs eager."""
    model = HeadLogits(model.eval()).eval()
    with torch.no_grad():
        eager = torch.sigmoid(model(example)).float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            try:  # scripting keeps shape logic (any batch and image size); tracing would freeze it
                compiled = torch.jit.script(model)
            except Exception:  # noqa: BLE001 - an architecture TorchScript cannot compile: trace it instead
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                compiled = torch.jit.trace(model, example[:1], check_trace=False)
            write_atomic(path, lambda h: torch.jit.save(compiled, h))
            loaded = torch.jit.load(str(path), map_location=example.device)
        with torch.no_grad():
            exported = torch.sigmoid(loaded(example)).float().cpu()
    elif fmt == "onnx":
        try:
            import onnxruntime as ort
            import onnxscript  # noqa: F401 - torch's torch.export-based exporter needs it
        except ImportError as exc:
            raise UserError("--export onnx needs onnx, onnxruntime and onnxscript: pip install -c "
                               "requirements/constraints.txt '.[export]' (or use --export torchscript)") from exc
        cpu_model, x = model.to("cpu"), example.cpu()
        # torch's current exporter (torch.export graph -> ONNX); the batch dimension stays free, the image size is
        # the one the explainer was trained at (explain resizes every input to it).
        program = torch.onnx.export(cpu_model, (x[:1],), None, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), dynamo=True, verbose=False)
        proto = program.model_proto.SerializeToString()  # one file: explainer weights are far below protobuf's 2 GB
        write_atomic(path, lambda handle: handle.write(proto))
        model.to(example.device)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        exported = torch.sigmoid(torch.from_numpy(session.run(None, {"image": x.numpy()})[0])).float()
    else:
        raise InputError(f"unknown export format {fmt!r}; choose torchscript or onnx")
    return float((exported - eager).abs().max())


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Ranker:
    """The classifier whose probabilities choose the classes (None: rank by average mask activation)."""

    model: nn.Module | None = None
    softmax: bool = False
    source: str = ""

    def probabilities(self, x: torch.Tensor) -> np.ndarray | None:
        if self.model is None:
            return None
        with torch.no_grad():
            logits = self.model(x).float()
        return (logits.softmax(1) if self.softmax else logits.sigmoid()).cpu().numpy()


def load_ranker(rank_by: str, config: str | None, checkpoint: Path, classes: list[str], size: int,
                device: torch.device) -> Ranker:
    """The run's classifier (--config, else config.yaml next to the checkpoint) for rank_by auto/probability."""
    if rank_by not in RANK_BY:
        raise InputError(f"--rank-by must be one of {RANK_BY}, got {rank_by!r}")
    if rank_by == "mask":
        return Ranker()
    path = Path(config) if config else checkpoint.parent / "config.yaml"
    if not path.is_file():
        if rank_by == "probability" or config:
            raise MissingInput(f"--rank-by probability needs the run's config (classifier section): {path} "
                                    "does not exist; pass --config")
        print(f"[explainer] no {path}: ranking classes by average mask activation (pass --config RUN/config.yaml "
              "to rank by the classifier's probability)", file=sys.stderr)
        return Ranker()
    from explainer.config import ExplainerRunConfig, load_config, resolve_run_paths
    from explainer.evaluate import load_eval_classifier

    cfg = resolve_run_paths(load_config(ExplainerRunConfig, path), path.parent)  # a run's paths, from any directory
    try:
        model, source = load_eval_classifier(cfg, classes, device, where=str(checkpoint))
    except InputError as exc:
        kind = MissingInput if isinstance(exc, FileNotFoundError) else InputError
        raise kind(f"{exc} (the classifier of {path}, which ranks the classes; --rank-by mask ranks by mask "
                   "activation without it)") from exc
    return Ranker(model, cfg.loss.classification == "ce", source)


def choose(ranked_order: np.ndarray, top_k: int, wanted: list[int] | None, all_classes: bool) -> list[int]:
    """The classes whose masks are written, best first: all, the wanted ones, or the top k."""
    if all_classes:
        return [int(k) for k in ranked_order]
    if wanted:
        keep = set(wanted)
        return [int(k) for k in ranked_order if int(k) in keep]
    return [int(k) for k in ranked_order[:top_k]]


def class_indices(names: Sequence[str] | None, classes: list[str]) -> list[int] | None:
    """--classes values -> indices; a value is a class name, or else an index; unknown ones are an error."""
    if not names:
        return None
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for name in names:
        if name in index:
            out.append(index[name])
        elif name.isdigit() and int(name) < len(classes):
            out.append(int(name))
        else:
            shown = ", ".join(repr(c) for c in classes[:8]) + (", ..." if len(classes) > 8 else "")
            raise InputError(f"--classes {name!r} is neither a class of the explainer nor an index < "
                             f"{len(classes)} (the classes are {shown})")
    return out


def _fit(meta: dict[str, Any], resize: str | None) -> tuple[Fit, dict[str, tuple[float, ...]]]:
    """The input geometry and normalisation the explainer was trained with (checkpoint extra; squash before)."""
    extra = meta.get("extra", {})  # the classifier's input normalisation the Explainer was trained with
    norm = {k: tuple(extra[k]) for k in ("mean", "std") if k in extra}
    mode = resize or extra.get("resize", "squash")
    if mode not in RESIZE_MODES:
        raise InputError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    return Fit(int(meta["image_size"]), mode, mean_fill(norm.get("mean", IMAGENET_MEAN))), norm


def _rank(out: ClassLogits, probs: np.ndarray | None, i: int, top_k: int, wanted: list[int] | None,
          all_classes: bool) -> Ranked:
    logits = out.logits[i]
    activation = torch.sigmoid(logits).flatten(1).mean(1).double().numpy()  # every class, at the head's resolution
    values = activation if probs is None else probs[i]
    order = np.argsort(-values, kind="stable")
    return Ranked(logits, out.size, activation, None if probs is None else probs[i], order,
                  choose(order, top_k, wanted, all_classes))


def _export_once(index: dict[str, Any], model: nn.Module, x: torch.Tensor, export: str, target: Path) -> None:
    diff = export_model(model, x, export, target)
    if diff > EXPORT_TOLERANCE:
        raise RuntimeError(f"exported {export} model at {target} differs from the eager explainer by "
                           f"{diff:.2e} (> {EXPORT_TOLERANCE}) on the first batch")
    index["export"] = {"format": export, "path": str(target), "max_abs_mask_diff": diff}


def explain(checkpoint: str, inputs: Sequence[str], out: str, *, batch_size: int = 8, device: str = "auto",
            top_k: int = 5, classes: Sequence[str] | None = None, all_classes: bool = False, rank_by: str = "auto",
            config: str | None = None, resize: str | None = None, workers: int = 0, export: str | None = None,
            export_path: str | None = None, progress: bool = True,
            max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """Run the explainer over the inputs and write everything; returns the index (written, skipped, export)."""
    from explainer.models import load_explainer
    from explainer.models.model_files import model_file

    dev = pick_device(device)
    model, meta = load_explainer(checkpoint, map_location=dev)
    names, (fit, norm) = list(meta["classes"]), _fit(meta, resize)
    fit = replace(fit, max_pixels=max_pixels)
    wanted = class_indices(classes, names)
    files = expand_inputs(inputs)
    if not files:
        raise MissingInput(f"no image files found in {list(inputs)}")
    ranker = load_ranker(rank_by, config, model_file(checkpoint, "explainer"), names, fit.size, dev)  # a run folder too
    out_dir = Path(out)
    dirs = unique_dirs(files)
    index: dict[str, Any] = {"checkpoint": str(checkpoint), "classes": names, "image_size": fit.size,
                             "resize": fit.resize, "ranked_by": "mask" if ranker.model is None else "probability",
                             "classifier": ranker.source or None, "images": [], "skipped": []}
    top_k = max(1, min(top_k, len(names)))
    bar = tqdm(total=len(files), desc="explain", unit="img", disable=not progress)
    for batch in batches(files, fit, batch_size, workers):
        good = [d for d in batch if d.error is None]
        for d in batch:
            if d.error is not None:
                print(f"[explainer] skipped {d.path}: {d.error}", file=sys.stderr)
                index["skipped"].append({"file": str(d.path), "reason": d.error})
                bar.update(1)
        if not good:
            continue
        x = normalize_batch(np.stack([d.resized for d in good]), **norm).to(dev)
        if export is not None and "export" not in index:
            target = Path(export_path or out_dir / f"explainer.{'onnx' if export == 'onnx' else 'ts'}")
            _export_once(index, model, x, export, target)
        with torch.no_grad():  # head resolution: [B, C, S, S] would be 1.6 GB at 1000 classes, 224 px
            out = class_logits(model(x), x.shape[-2:])
            out = ClassLogits(out.logits.float().cpu(), out.size)
        probs = ranker.probabilities(x)
        for i, d in enumerate(good):  # the bar moves per image: writing is the slow part
            folder = out_dir / dirs[d.path]
            write_outputs(d, _rank(out, probs, i, top_k, wanted, all_classes), names, folder, top_k, fit.resize)
            index["images"].append({"file": str(d.path), "output": str(folder)})
            bar.update(1)
    bar.close()
    save_json(index, out_dir / "index.json")
    return index


def build_parser(prog: str = "explainer explain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--checkpoint", required=True, help="explainer checkpoint (explainer.pt of a training run)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--top-k", type=int, default=5,
                        help="masks written per image: the k classes ranked highest (and shown in topk.png)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--classes", action="append", default=None, metavar="NAME",
                        help="write this class's mask (a class name or an index; repeat the flag for more)")
    chosen.add_argument("--all-classes", action="store_true", help="write every class's mask")
    parser.add_argument("--rank-by", choices=RANK_BY, default="auto",
                        help="probability: the classifier's (needs the run's config); mask: average mask "
                             "activation; auto: probability when a config is found")
    parser.add_argument("--config", default=None,
                        help="the training run's config.yaml, for its classifier (default: next to --checkpoint)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default=None,
                        help="how images are fitted to the explainer's input (default: as in its training)")
    parser.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    parser.add_argument("--export", choices=["torchscript", "onnx"], default=None,
                        help="also export the explainer and check it gives the same masks")
    parser.add_argument("--export-path", default=None, help="default: OUT/explainer.ts or OUT/explainer.onnx")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--max-image-pixels", type=max_pixels_arg, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="larger images (W x H) are skipped unread, with an error naming the file; 'none': no "
                             f"cap (default {DEFAULT_MAX_IMAGE_PIXELS}, PIL's)")
    return parser


def run_args(args: argparse.Namespace) -> int:
    index = explain(args.checkpoint, args.inputs, args.out, batch_size=args.batch_size, device=args.device,
                    top_k=args.top_k, classes=args.classes, all_classes=args.all_classes, rank_by=args.rank_by,
                    config=args.config, resize=args.resize, workers=args.workers, export=args.export,
                    export_path=args.export_path, progress=not args.no_progress, max_pixels=args.max_image_pixels)
    print(f"[explainer] wrote {len(index['images'])} image(s) to {args.out} (classes ranked by "
          f"{index['ranked_by']})" + (f"; skipped {len(index['skipped'])}" if index["skipped"] else ""))
    if "export" in index:
        e = index["export"]
        print(f"[explainer] exported {e['format']} to {e['path']} (max |mask diff| {e['max_abs_mask_diff']:.1e})")
    return 1 if index["skipped"] else 0


def main(argv: Sequence[str] | None = None, prog: str = "explainer explain") -> int:
    parser = build_parser(prog)
    args = parser.parse_intermixed_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--top-k", args.top_k)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    request_debug(args.debug)
    return exit_on_run_error(lambda: run_args(args))  # bad input: one line, exit 2; bugs keep their traceback


if __name__ == "__main__":
    sys.exit(main())
