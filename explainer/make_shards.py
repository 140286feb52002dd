"""Turn VOC-2007, COCO-2014, your own labelled images or the embedded synthetic scenes into WebDataset shards
plus a manifest.

    python launch/make_shards.py voc --root /data/VOCdevkit/VOC2007 --out shards/voc2007
    python launch/make_shards.py coco --root /data/coco --out shards/coco2014
    python launch/make_shards.py synthetic --out shards/synthetic
    python launch/make_shards.py imagenet --root /data/imagenet --out shards/imagenet   (docs/imagenet.md)
    python launch/make_shards.py imagenet ... --num-parts 8 --part 3 --out shards/imagenet/part-3   (then merge:)
    python launch/make_shards.py merge shards/imagenet/part-* --out shards/imagenet
    python launch/make_shards.py folder --root /data/mine --labels /data/mine/labels.csv --out shards/mine
    python launch/make_shards.py folder --root /data/imagefolder --out shards/mine   (one folder per class)
    python launch/make_shards.py voc --root /data/VOCdevkit/VOC2007 --out s3://bucket/voc2007   (any fsspec URL)

Exit status: 0 done (skipped inputs are listed in the summary and the manifest), 1 `--strict` found problems (nothing
written) or shards could not be uploaded to an --out URL (rerun with --resume), 2 bad arguments or an unusable source
folder, 143 / 130 stopped by SIGTERM / SIGINT (the worker processes are stopped, complete shards are kept: rerun with
--resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from explainer.arguments import ArgumentParser, max_pixels_arg
from explainer.data import remote
from explainer.data.remote_shards import UploadError
from explainer.data.shards import ShardOptions, StrictError, summary
from explainer.data.transforms import DEFAULT_MAX_IMAGE_PIXELS
from explainer.logs import configure_logging
from explainer.signals import Interrupted, raise_on_signals


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _split_counts(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, _, count = part.partition("=")
        if not name or not count.isdigit():
            raise argparse.ArgumentTypeError(f"expected split=count[,split=count...], got {text!r}")
        out[name.strip()] = int(count)
    return out


def _out(text: str) -> Path | str:
    return text if remote.is_url(text) else Path(text)


def _out_args(common: argparse.ArgumentParser) -> None:
    common.add_argument("--out", type=_out,
                        help="output folder (default shards/<dataset>) or URL, e.g. s3://bucket/prefix: shards are "
                             "written locally (under TMPDIR) then uploaded; credentials from the environment")
    common.add_argument("--remote-timeout", type=float, default=60.0,
                        help="--out URL: seconds one request may take (default 60)")
    common.add_argument("--remote-retries", type=int, default=5,
                        help="--out URL: further tries of a failed request, with backoff (default 5)")


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog=prog, description=__doc__)
    common = ArgumentParser(add_help=False)
    _out_args(common)
    common.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="worker processes (default: CPU count, at most 8)")
    common.add_argument("--shard-maxcount", type=int, default=1000, help="samples per shard at most (default 1000)")
    common.add_argument("--shard-maxsize", type=_size, default=_size("512M"),
                        help="bytes per shard at most, e.g. 256M (default 512M)")
    common.add_argument("--resume", action="store_true", help="keep shards completed by an earlier run")
    common.add_argument("--strict", action="store_true",
                        help="any skipped or suspicious input: exit 1 before writing anything")
    common.add_argument("--verify-decode", action="store_true",
                        help="fully decode every image (default: header + end-marker check, much faster)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--max-image-pixels", type=max_pixels_arg, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="images declaring more pixels (W x H) are skipped unread, as bad inputs; 'none': no cap "
                             f"(default {DEFAULT_MAX_IMAGE_PIXELS}, PIL's)")
    sub = parser.add_subparsers(dest="dataset", required=True)

    voc = sub.add_parser("voc", parents=[common], help="PASCAL VOC layout (VOCdevkit/VOC2007)")
    voc.add_argument("--root", type=Path, required=True, help="VOCdevkit/VOC2007 (or VOCdevkit, or its parent)")
    voc.add_argument("--splits", default=None, help="comma-separated (default: those of train,val,test present)")
    voc.add_argument("--exclude-difficult", action="store_true",
                     help="ignore objects marked difficult when making labels (default: include, as the reference)")
    voc.add_argument("--classes-file", type=Path, default=None,
                     help="one class name per line (default: the 20 VOC classes)")

    coco = sub.add_parser("coco", parents=[common], help="COCO-2014 (train2014/, val2014/, annotations/)")
    coco.add_argument("--root", type=Path, required=True)
    coco.add_argument("--seed", type=int, default=0, help="seed of the train/val split and the seg subset")
    coco.add_argument("--val-fraction", type=float, default=0.1)
    coco.add_argument("--seg-subset", type=int, default=1000,
                      help="test images that get segmentation ground truth (default 1000)")

    folder = sub.add_parser("folder", parents=[common],
                            help="your own images: a labels file (CSV/JSONL) or the ImageFolder layout")
    folder.add_argument("--root", type=Path, required=True, help="folder the image (and mask) paths are relative to")
    folder.add_argument("--labels", type=Path, default=None,
                        help="CSV (header path,labels[,mask][,split]) or JSONL; labels `a|b` or a JSON list. "
                             "Without it: ImageFolder, ROOT/<class>/<image> or ROOT/<split>/<class>/<image>")
    folder.add_argument("--classes-file", type=Path, default=None,
                        help="one class name per line, in index order (default: the sorted names in the labels file)")
    folder.add_argument("--split-fractions", default="train=0.8,val=0.1,test=0.1",
                        help="seeded split of the rows without a split")
    folder.add_argument("--seed", type=int, default=0, help="seed of that split")
    folder.add_argument("--name", default="folder", help="dataset name in the manifest and default output folder")

    syn = sub.add_parser("synthetic", parents=[common], help="the embedded synthetic scenes (no download)")
    syn.add_argument("--num-classes", type=int, default=6)
    syn.add_argument("--image-size", type=int, default=64)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--counts", type=_split_counts, default=None,
                     help="split sizes, e.g. train=600,val=150,test=150 (the default)")
    syn.add_argument("--max-objects", type=int, default=3)
    syn.add_argument("--void-width", type=int, default=1)
    syn.add_argument("--cue-class", type=int, default=None, help="bias experiment: class index with a background cue")
    syn.add_argument("--cue-prob", type=float, default=0.0, help="probability of the cue (see synthetic.py)")
    syn.add_argument("--source-dir", type=Path, default=None, help="where the VOC layout goes (default <out>/source)")
    return _with_imagenet(parser, sub, common).parse_args(argv)


def _with_imagenet(parser: argparse.ArgumentParser, sub: Any,
                   common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` with `imagenet` (ILSVRC-2012 in any of its three layouts, optionally one part of N) and `merge`."""
    net = sub.add_parser("imagenet", parents=[common],
                         help="ImageNet-1k: ILSVRC/Kaggle, the official archives or torchvision's layout")
    net.add_argument("--root", type=Path, required=True, help="the folder holding ILSVRC/, or train/ and val/")
    net.add_argument("--val-per-class", type=int, default=10, help="train images per class held out as val")
    net.add_argument("--seed", type=int, default=0, help="seed of the hold-out and of the train order")
    net.add_argument("--real-labels", type=Path, default=None,
                     help="ImageNet-ReaL real.json: the test split (official val) becomes multi-label")
    net.add_argument("--synset-mapping", type=Path, default=None,
                     help="'n01440764 tench, Tinca tinca' lines (default: the one the layout has)")
    net.add_argument("--train-boxes", type=Path, default=None,
                     help="folder of <wnid>/<image>.xml train boxes (default: the layout's)")
    net.add_argument("--val-boxes", type=Path, default=None,
                     help="folder of <image>.xml val boxes (default: the layout's, e.g. ILSVRC2012_bbox_val_v3/val)")
    net.add_argument("--num-parts", type=int, default=1, help="cut the run into N parts (one per machine)")
    net.add_argument("--part", type=int, default=0, help="which part this process writes (0..N-1)")
    merge = sub.add_parser("merge", help="one manifest over the parts of a --num-parts run (no copying)")
    merge.add_argument("parts", nargs="+", type=Path, metavar="PART_DIR", help="the part folders, every part once")
    merge.add_argument("--out", type=Path, required=True, help="folder of the merged manifest")
    merge.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    configure_logging()
    if args.dataset == "merge":
        return _merge(args, ["launch/make_shards.py", *(argv if argv is not None else sys.argv[1:])])
    default_out = {"voc": "voc2007", "coco": "coco2014", "synthetic": "synthetic", "imagenet": "imagenet",
                   "folder": getattr(args, "name", "folder")}[args.dataset]
    out = args.out if args.out is not None else Path("shards") / default_out
    options = ShardOptions(out=Path(), maxcount=args.shard_maxcount, maxsize=args.shard_maxsize,
                           workers=args.workers, resume=args.resume, strict=args.strict,
                           progress=not args.no_progress, max_image_pixels=args.max_image_pixels)
    command = ["launch/make_shards.py", *(argv if argv is not None else sys.argv[1:])]
    try:
        with raise_on_signals():
            manifest = _build_into(args, options, out, command)
    except Interrupted as exc:
        print(f"make_shards: {exc}; the worker processes are stopped and the complete shards in {out} are kept: "
              "rerun the same command with --resume to continue", file=sys.stderr)
        return exc.status
    except (StrictError, UploadError, remote.RemoteError) as exc:
        print(exc, file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "imagenet" in manifest:
        from explainer.data.imagenet import imagenet_summary

        print(imagenet_summary(manifest))
    print(summary(manifest, out))
    return 0


def _merge(args: argparse.Namespace, command: list[str]) -> int:
    from explainer.data.parts import merge_parts

    try:
        manifest = merge_parts(args.parts, args.out, command)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {manifest['parts']['num_parts']} parts")
    print(summary(manifest, args.out))
    return 0


def _build_into(args: argparse.Namespace, options: ShardOptions, out: Path | str, command: list[str]) -> dict:
    """_build into a folder, or for a URL into a staging folder whose shards a BucketSink uploads."""
    if isinstance(out, Path):
        options.out = out
        return _build(args, options, command)
    from explainer.data.remote_shards import bucket_sink, check_out_url

    policy = remote.RemotePolicy(timeout=args.remote_timeout, retries=args.remote_retries)
    check_out_url(out, policy)
    sink = bucket_sink(out, policy, args.strict)
    options.out, options.sink = sink.staging, sink
    try:
        sink.begin()
        return _build(args, options, command)
    finally:
        sink.close()


def _build(args: argparse.Namespace, options: ShardOptions, command: list[str]) -> dict:
    """The chosen builder, called with the parsed arguments; returns the manifest."""
    if args.dataset == "voc":
        from explainer.data.folder import read_classes_file
        from explainer.data.voc import VOC_CLASSES, build_voc_shards

        classes = VOC_CLASSES
        if args.classes_file is not None:
            classes = tuple(read_classes_file(args.classes_file))
        splits = args.splits.split(",") if args.splits else None
        return build_voc_shards(args.root, options, splits=splits, classes=classes,
                                exclude_difficult=args.exclude_difficult, verify=args.verify_decode, command=command)
    if args.dataset == "coco":
        from explainer.data.coco import build_coco_shards

        return build_coco_shards(args.root, options, seed=args.seed, val_fraction=args.val_fraction,
                                 seg_subset=args.seg_subset, verify=args.verify_decode, command=command)
    if args.dataset == "imagenet":
        from explainer.data.imagenet import build_imagenet_shards

        return build_imagenet_shards(args.root, options, val_per_class=args.val_per_class, seed=args.seed,
                                     real_labels=args.real_labels, synset_mapping=args.synset_mapping,
                                     num_parts=args.num_parts, part=args.part, verify=args.verify_decode,
                                     command=command, boxes={"train": args.train_boxes, "val": args.val_boxes})
    if args.dataset == "folder":
        from explainer.data.folder import build_folder_shards, read_classes_file

        classes = None
        if args.classes_file is not None:
            classes = read_classes_file(args.classes_file)
        return build_folder_shards(args.root, options, labels=args.labels, classes=classes,
                                   fractions=args.split_fractions, seed=args.seed, verify=args.verify_decode,
                                   dataset=args.name, command=command)
    from explainer.data.synthetic import SyntheticSpec, build_synthetic_shards

    spec_kwargs = {"counts": args.counts} if args.counts else {}
    spec = SyntheticSpec(num_classes=args.num_classes, image_size=args.image_size, seed=args.seed,
                         max_objects=min(args.max_objects, args.num_classes), void_width=args.void_width,
                         cue_class=args.cue_class, cue_prob=args.cue_prob, **spec_kwargs)
    return build_synthetic_shards(spec, options, source_dir=args.source_dir, command=command)


if __name__ == "__main__":
    sys.exit(main())
