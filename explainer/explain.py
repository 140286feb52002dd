"""Explain images with a trained Explainer alone (no classifier): per-class masks, overlays, a top-k grid, scores.

    explainer explain --checkpoint run/explainer.pt photos/ more/*.jpg one.png --out explained/

For every input image, under OUT/<name>/:
    masks/<k>_<class>.png   8-bit mask of class k at the image's original size (255 = fully kept)
    aggregated.png          pixel-wise max over all classes (no labels at inference: absent classes should be empty)
    overlay.png             the aggregated mask as a heat map over the image
    topk.png                the image and the k classes with the highest average mask activation, each as an overlay
    scores.json             average mask activation per class and the ranking
and OUT/index.json lists the images written and the files skipped (with the reason). A file that cannot be decoded
is reported by name and skipped, the others are still written; the exit status is then 1.

`--export torchscript|onnx` also writes the Explainer for deployment and checks that the exported model gives the same
masks as the eager one on the first batch (TorchScript needs nothing extra; ONNX needs `pip install '.[export]'`).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

from explainer.arguments import HelpFormatter, max_pixels_arg
from explainer.atomic import write_atomic
from explainer.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, decode_rgb, normalize_batch, open_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
EXPORT_TOLERANCE = 1e-4  # max |mask difference| accepted between the exported and the eager model


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
                raise FileNotFoundError(f"pattern {item!r} matches no file")
            files += matches
        else:
            raise FileNotFoundError(f"input {item!r} is not a file, a folder or a glob pattern that matches files")
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


def decode(path: Path, size: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Decoded:
    """Read one image the way the training loader does (decode_rgb); any failure is returned, not raised. An image
    over the pixel cap is refused from its header (ImageTooLarge), before anything is decoded."""
    try:
        data = path.read_bytes()
        resized = decode_rgb(data, size, max_pixels)
        with open_image(data, max_pixels) as im:
            original = im.convert("RGB")
        return Decoded(path, original, resized)
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises for a broken file, the file is skipped
        return Decoded(path, None, None, f"{type(exc).__name__}: {exc}")


class _Files(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], size: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.files, self.size, self.max_pixels = files, size, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Decoded:
        return decode(self.files[i], self.size, self.max_pixels)


def batches(files: list[Path], size: int, batch_size: int, workers: int,
            max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[list[Decoded]]:
    loader = torch.utils.data.DataLoader(_Files(files, size, max_pixels), batch_size=batch_size, num_workers=workers,
                                         collate_fn=list, shuffle=False)
    yield from loader


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


def save_png(image: Image.Image, path: Path) -> None:
    write_atomic(path, lambda h: image.save(h, format="PNG"))


def save_json(payload: Any, path: Path) -> None:
    write_atomic(path, lambda h: h.write(json.dumps(payload, indent=2).encode()))


def to_8bit(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """[S,S] float mask in [0,1] -> 8-bit 'L' image resized (bilinear) to size = (W, H)."""
    im = Image.fromarray(np.round(np.clip(mask, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    return im if im.size == size else im.resize(size, Image.BILINEAR)


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


def write_outputs(item: Decoded, masks: np.ndarray, classes: list[str], out: Path, top_k: int) -> dict[str, Any]:
    """All files of one image from its [C,S,S] masks; returns its scores record."""
    assert item.original is not None
    size = item.original.size
    scores = masks.reshape(len(classes), -1).mean(1)
    order = np.argsort(-scores, kind="stable")
    mask_images = {}
    for k, name in enumerate(classes):
        mask_images[k] = to_8bit(masks[k], size)
        save_png(mask_images[k], out / "masks" / f"{k:02d}_{safe_name(name)}.png")
    agg = to_8bit(masks.max(0), size)
    save_png(agg, out / "aggregated.png")
    save_png(heat_overlay(item.original, agg), out / "overlay.png")
    top = [(classes[k], float(scores[k]), dimmed(item.original, mask_images[int(k)])) for k in order[:top_k]]
    save_png(topk_grid(item.original, top), out / "topk.png")
    record = {
        "file": str(item.path),
        "size": list(size),
        "scores": {name: float(scores[k]) for k, name in enumerate(classes)},
        "ranking": [[classes[k], float(scores[k])] for k in order],
    }
    save_json(record, out / "scores.json")
    return record


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------


def export_model(model: nn.Module, example: torch.Tensor, fmt: str, path: Path) -> float:
    """Write the explainer as TorchScript or ONNX to `path`, reload it, and return max |mask difference| vs eager."""
    model = model.eval()
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
            raise RuntimeError("--export onnx needs onnx, onnxruntime and onnxscript: pip install -c "
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
        raise ValueError(f"unknown export format {fmt!r}; choose torchscript or onnx")
    return float((exported - eager).abs().max())


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def explain(checkpoint: str, inputs: Sequence[str], out: str, *, batch_size: int = 8, device: str = "auto",
            top_k: int = 5, workers: int = 0, export: str | None = None, export_path: str | None = None,
            progress: bool = True, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """Run the explainer over the inputs and write everything; returns the index (written, skipped, export)."""
    from explainer.models import load_explainer

    dev = pick_device(device)
    model, meta = load_explainer(checkpoint, map_location=dev)
    classes, size = list(meta["classes"]), int(meta["image_size"])
    extra = meta.get("extra", {})  # the classifier's input normalisation the Explainer was trained with
    norm = {k: tuple(extra[k]) for k in ("mean", "std") if k in extra}
    files = expand_inputs(inputs)
    if not files:
        raise FileNotFoundError(f"no image files found in {list(inputs)}")
    out_dir = Path(out)
    names = unique_dirs(files)
    index: dict[str, Any] = {"checkpoint": str(checkpoint), "classes": classes, "image_size": size, "images": [],
                             "skipped": []}
    top_k = max(1, min(top_k, len(classes)))
    bar = tqdm(total=len(files), desc="explain", unit="img", disable=not progress)
    for batch in batches(files, size, batch_size, workers, max_pixels):
        good = [d for d in batch if d.error is None]
        for d in batch:
            if d.error is not None:
                print(f"[explainer] skipped {d.path}: {d.error}", file=sys.stderr)
                index["skipped"].append({"file": str(d.path), "reason": d.error})
        if good:
            x = normalize_batch(np.stack([d.resized for d in good]), **norm).to(dev)
            if export is not None and "export" not in index:
                target = Path(export_path or out_dir / f"explainer.{'onnx' if export == 'onnx' else 'ts'}")
                diff = export_model(model, x, export, target)
                if diff > EXPORT_TOLERANCE:
                    raise RuntimeError(f"exported {export} model at {target} differs from the eager explainer by "
                                       f"{diff:.2e} (> {EXPORT_TOLERANCE}) on the first batch")
                index["export"] = {"format": export, "path": str(target), "max_abs_mask_diff": diff}
            with torch.no_grad():
                masks = torch.sigmoid(model(x)).float().cpu().numpy()
            for d, m in zip(good, masks):
                folder = out_dir / names[d.path]
                write_outputs(d, m, classes, folder, top_k)
                index["images"].append({"file": str(d.path), "output": str(folder)})
        bar.update(len(batch))
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
    parser.add_argument("--top-k", type=int, default=5, help="classes shown in topk.png")
    parser.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    parser.add_argument("--export", choices=["torchscript", "onnx"], default=None,
                        help="also export the explainer and check it gives the same masks")
    parser.add_argument("--export-path", default=None, help="default: OUT/explainer.ts or OUT/explainer.onnx")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--max-image-pixels", type=max_pixels_arg, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="larger images (W x H) are skipped unread, with an error naming the file; 'none': no "
                             f"cap (default {DEFAULT_MAX_IMAGE_PIXELS}, PIL's)")
    return parser


def run_args(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    index = explain(args.checkpoint, args.inputs, args.out, batch_size=args.batch_size, device=args.device,
                    top_k=args.top_k, workers=args.workers, export=args.export, export_path=args.export_path,
                    progress=not args.no_progress, max_pixels=args.max_image_pixels)
    print(f"[explainer] wrote {len(index['images'])} image(s) to {args.out}"
          + (f"; skipped {len(index['skipped'])}" if index["skipped"] else ""))
    if "export" in index:
        e = index["export"]
        print(f"[explainer] exported {e['format']} to {e['path']} (max |mask diff| {e['max_abs_mask_diff']:.1e})")
    return 1 if index["skipped"] else 0


def main(argv: Sequence[str] | None = None, prog: str = "explainer explain") -> int:
    return run_args(build_parser(prog).parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
