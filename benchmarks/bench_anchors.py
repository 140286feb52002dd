"""Our evaluation metrics against ports of the anchors' own code on the same fixed toy inputs: deletion / insertion
against the RISE authors' CausalMetric (tests/_anchor_rise.py), the pointing game against TorchRay's benchmark
(tests/_anchor_torchray.py), WSOL localization (MaxBoxAccV2, MaxBoxAcc, PxAP) against wsolevaluation's evaluation.py
(tests/_anchor_wsol.py). Prints the table "ours vs the anchors' code" (docs/results.md#anchors) and writes it as
JSON.

    python benchmarks/bench_anchors.py                       # that table (seed 0, 8 images, 32 px, ~1 min CPU)
    python benchmarks/bench_anchors.py --images 2 --size 16  # a quick look

Inputs: a seeded float64 conv net (5 classes, softmax), Gaussian-noise images, and three kinds of maps: uniform
noise, noise with its peak on the image border, and 7 x 7 noise (upsampled inside our code; the anchors get the map
upsampled the same way, since their code takes full-resolution maps; bilinear upsampling repeats the edge values, so
these maps have tied pixels, which RISE's flipped argsort and our stable sort order differently). Pointing: random
original sizes, 1-3 boxes per class of which some are difficult, a blob segmentation, tolerance 15 px.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import _anchor_rise as rise  # noqa: E402
import _anchor_torchray as tr  # noqa: E402
import _anchor_wsol as wr  # noqa: E402

from explainer import metrics as M  # noqa: E402
from explainer import wsol as W  # noqa: E402

CLASSES = 5
KINDS = ("random", "border peak", "low resolution")


def toy_classifier(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, CLASSES)).double().eval()


def toy_maps(kind: str, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """[n, C, size, size] maps (the low-resolution kind stays 7 x 7: our code upsamples it)."""
    if kind == "low resolution":
        return torch.rand(n, CLASSES, 7, 7, generator=g, dtype=torch.float64)
    maps = torch.rand(n, CLASSES, size, size, generator=g, dtype=torch.float64)
    if kind == "border peak":
        for i in range(n):
            for c in range(CLASSES):
                edge = int(torch.randint(0, size, (1,), generator=g))
                maps[i, c, (0, size - 1, edge, edge)[c % 4], (edge, edge, 0, size - 1)[c % 4]] = 2.0
    return maps


def full_size(maps: torch.Tensor, size: int) -> torch.Tensor:
    return M.maps_at_image_size(maps, torch.zeros(1, 1, size, size))


def causal_rows(clf: nn.Module, images: torch.Tensor, maps: torch.Tensor) -> dict[str, np.ndarray]:
    """(ours, anchor) AUCs of both curves: the RISE protocol (top-1) and ours (every class, one row per step)."""
    n, _, s, _ = images.shape
    probs = lambda x: F.softmax(clf(x), dim=1)  # noqa: E731 - the notebook's nn.Sequential(model, Softmax)
    taps, sigma = M.blur_taps(s)
    blur = rise.blur_substrate(taps, sigma, torch.float64)
    deletion = rise.AnchorCausalMetric(probs, "del", 8 * s, torch.zeros_like)  # the notebook's batch evaluation
    insertion = rise.AnchorCausalMetric(probs, "ins", 8 * s, blur)
    del_each = rise.AnchorCausalMetric(probs, "del", s, torch.zeros_like)
    ins_each = rise.AnchorCausalMetric(probs, "ins", s, blur)
    big = full_size(maps, s)
    out: dict[str, list[float]] = {k: [] for k in ("rise_del", "rise_ins", "each_del", "each_ins")}
    for i in range(n):
        img, expl = images[i : i + 1], big[i].numpy()
        c = int(probs(img).argmax(1)[0])
        out["rise_del"].append(deletion.single_run(img, expl[c], c)[0])
        out["rise_ins"].append(insertion.single_run(img, expl[c], c)[0])
        for k in range(CLASSES):
            out["each_del"].append(del_each.single_run(img, expl[k], k)[0])
            out["each_ins"].append(ins_each.single_run(img, expl[k], k)[0])
    d, ins, _ = M.rise_deletion_insertion_auc(clf, images, maps)
    de, ie, _ = M.deletion_insertion_auc(clf, images, maps, torch.ones(n, CLASSES), steps=s, prob="softmax",
                                         start=M.insertion_start(images, taps, sigma))
    ours = {"rise_del": d, "rise_ins": ins, "each_del": de, "each_ins": ie}
    return {k: np.stack([ours[k].numpy(), np.asarray(v)]) for k, v in out.items()}


def toy_annotations(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                     list[torch.Tensor], torch.Tensor]:
    """Original sizes [n, 2] (W, H), objects per image [m, 6], blob segmentations [size, size], labels [n, C]."""
    sizes = torch.randint(size, 6 * size, (n, 2), generator=g)
    objects, segs = [], []
    labels = torch.zeros(n, CLASSES)
    for i in range(n):
        w, h = sizes[i].tolist()
        rows = []
        for c in range(CLASSES):
            if float(torch.rand((), generator=g)) < 0.4:
                continue
            labels[i, c] = 1
            for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
                x0, y0 = int(torch.randint(1, w, (1,), generator=g)), int(torch.randint(1, h, (1,), generator=g))
                x1 = min(w, x0 + int(torch.randint(0, w // 3 + 1, (1,), generator=g)))
                y1 = min(h, y0 + int(torch.randint(0, h // 3 + 1, (1,), generator=g)))
                rows.append([c, x0, y0, x1, y1, int(float(torch.rand((), generator=g)) < 0.3)])
        objects.append(torch.tensor(rows, dtype=torch.long).reshape(-1, 6))
        seg = torch.randint(0, CLASSES + 1, (size // 4, size // 4), generator=g, dtype=torch.uint8)
        segs.append(F.interpolate(seg[None, None].float(), size=(size, size), mode="nearest")[0, 0].to(torch.uint8))
    return sizes, objects, segs, labels


def pointing_rows(maps: torch.Tensor, sizes: torch.Tensor, objects: list[torch.Tensor], segs: list[torch.Tensor],
                  labels: torch.Tensor, tolerance: int = 15) -> dict[str, Any]:
    ours = M.pointing_game(maps, labels, sizes, float(tolerance), segs, objects)
    names = [f"c{k}" for k in range(CLASSES)]
    boxes_game, mask_game = tr.AnchorPointingGame(CLASSES, tolerance), tr.AnchorPointingGame(CLASSES, tolerance)
    theirs_box, theirs_mask = [], []
    for i, k in (labels > 0).nonzero().tolist():
        w, h = sizes[i].tolist()
        label = tr.voc_label(w, h, [(names[int(r[0])], *map(int, r[1:5]), int(r[5])) for r in objects[i]])
        point = tr.saliency_point(maps[i, k], w, h)
        outcome = tr.benchmark_outcome(boxes_game, label, names[k], point)
        boxes_game.record(outcome, k)
        theirs_box.append(outcome)
        mask = F.interpolate(segs[i][None, None].float(), size=(h, w), mode="nearest")[0, 0] == k + 1
        outcome = mask_game.test(mask, point) if outcome != tr.SKIP else tr.SKIP
        mask_game.record(outcome, k)
        theirs_mask.append(outcome)
    mine_box = [tr.SKIP if s else (tr.HIT if b == 1 else tr.MISS) for s, b in zip(ours["skipped"], ours["box"])]
    mine_mask = [tr.SKIP if s else (tr.HIT if b == 1 else tr.MISS) for s, b in zip(ours["skipped"], ours["mask"])]
    cls = ours["cls"]
    z = torch.zeros(CLASSES, dtype=torch.float64)
    acc = {ann: M.torchray_accuracy(z.index_add(0, cls, (ours[ann] == 1).double()),
                                    z.index_add(0, cls, (ours[ann] >= 0).double())) for ann in ("box", "mask")}
    return {"box": (mine_box, theirs_box, acc["box"], boxes_game.accuracy),
            "mask": (mine_mask, theirs_mask, acc["mask"], mask_game.accuracy)}


def wsol_rows(maps: torch.Tensor, sizes: torch.Tensor, objects: list[torch.Tensor], segs: list[torch.Tensor],
              labels: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """(our counts, the anchor's counts, pairs) for V2, V1 and the pixel histograms, reference frame (224)."""
    scorer, totals = W.WsolScorer(CLASSES), M.Totals()
    batch = {"image": torch.zeros(len(maps), 3, maps.shape[-1], maps.shape[-1]), "objects": objects,
             "orig_size": sizes, "seg_classes": torch.stack(segs), "has_seg": torch.ones(len(maps), dtype=torch.bool)}
    scorer.update(totals, "m", maps, labels, batch, torch.zeros(len(maps), dtype=torch.long))
    th = scorer.thresholds
    v2, v1, px = wr.BoxEvaluator(th, (30, 50, 70), True), wr.BoxEvaluator(th, (50,), False), wr.MaskEvaluator(th)
    pairs = (labels > 0).nonzero()
    big = F.interpolate(maps[pairs[:, 0], pairs[:, 1]][:, None], size=(224, 224), mode="bilinear",
                        align_corners=False)[:, 0].numpy()
    for p, (i, k) in enumerate(pairs.tolist()):
        cam = wr.normalize_scoremap(big[p])
        seg = F.interpolate(segs[i][None, None].float(), size=(224, 224), mode="nearest")[0, 0].numpy()
        px.accumulate(cam, np.where(seg == k + 1, 1, 0))
        mine = objects[i][objects[i][:, 0] == k]
        if len(mine) and not bool((mine[:, 5] > 0).all()):  # our pair rule: as the pointing game
            gt = np.array([wr.resize_bbox([v - 1 for v in r[1:5]], sizes[i].tolist(), (224, 224))
                           for r in mine.tolist()])
            v2.accumulate(cam, gt)
            v1.accumulate(cam, gt)
    ours = {"v2": totals.get("wsol/m/v2").numpy(), "v1": totals.get("wsol/m/v1").numpy(),
            "px": totals.get("wsol/m/pixel_hist").numpy()}
    theirs = {"v2": np.stack([v2.num_correct[t] for t in (30, 50, 70)]), "v1": v1.num_correct[50],
              "px": np.stack([px.pos, px.neg])}
    return {k: (ours[k], theirs[k], v2.cnt if k != "px" else len(pairs)) for k in ours}


def compare(seed: int = 0, images: int = 8, size: int = 32) -> list[dict[str, Any]]:
    """Every row of the table: what was compared, on how many pairs, our mean, the anchor's, the agreement."""
    g = torch.Generator().manual_seed(seed)
    clf = toy_classifier(seed)
    x = torch.randn(images, 3, size, size, generator=g, dtype=torch.float64)
    curves: dict[str, list[np.ndarray]] = {}
    pointing: dict[str, list[Any]] = {"box": [[], [], [], []], "mask": [[], [], [], []]}
    sizes, objects, segs, labels = toy_annotations(images, size, g)
    wsol: dict[str, list[Any]] = {"v2": [], "v1": [], "px": []}
    for kind in KINDS:
        maps = toy_maps(kind, images, size, g)
        group = "tied" if kind == "low resolution" else "tie-free"
        for key, pair in causal_rows(clf, x, maps).items():
            curves.setdefault((key, group), []).append(pair)
        for ann, (mine, theirs, acc, their_acc) in pointing_rows(maps, sizes, objects, segs, labels).items():
            pointing[ann][0] += mine
            pointing[ann][1] += theirs
            pointing[ann][2].append(acc)
            pointing[ann][3].append(their_acc)
        for key, triple in wsol_rows(maps, sizes, objects, segs, labels).items():
            wsol[key].append(triple)
    titles = {"rise_del": "deletion AUC, RISE protocol (top-1, 8 rows / step, to 0)",
              "rise_ins": "insertion AUC, RISE protocol (top-1, 8 rows / step, from gkern blur)",
              "each_del": "deletion AUC, every class, 1 row / step", "each_ins": "insertion AUC, every class"}
    rows = []
    for group, maps in (("tie-free", "noise and border-peak maps"), ("tied", "7 x 7 maps upsampled: tied pixels")):
        for key, title in titles.items():
            both = np.concatenate(curves[(key, group)], axis=1)
            rows.append({"check": f"{title}; {maps}", "group": group, "pairs": int(both.shape[1]),
                         "ours": float(both[0].mean()), "anchor": float(both[1].mean()),
                         "max_abs_diff": float(np.abs(both[0] - both[1]).max())})
    for ann, title in (("box", "pointing game vs boxes (TorchRay's VOC test), accuracy"),
                       ("mask", "pointing game vs segmentation, accuracy")):
        mine, theirs, acc, their_acc = pointing[ann]
        scored = sum(1 for t in theirs if t != tr.SKIP)
        rows.append({"check": title, "pairs": scored, "skipped": sum(1 for t in theirs if t == tr.SKIP),
                     "ours": float(np.mean(acc)), "anchor": float(np.mean(their_acc)),
                     "agree": f"{sum(a == b for a, b in zip(mine, theirs))}/{len(theirs)}",
                     "max_abs_diff": float(np.abs(np.array(acc) - np.array(their_acc)).max())})
    return rows + wsol_summary(wsol)


def wsol_summary(wsol: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Table rows from the per-kind counts: the headline number of ours and of the anchor over all kinds' pairs."""
    rows = []
    for key, title in (("v2", "MaxBoxAccV2 (IoU 30/50/70, all contours), wsolevaluation"),
                       ("v1", "MaxBoxAcc (largest contour, IoU 50), wsolevaluation"),
                       ("px", "PxAP (pixel histograms), wsolevaluation")):
        ours, theirs = sum(t[0] for t in wsol[key]), sum(t[1] for t in wsol[key])
        pairs = sum(t[2] for t in wsol[key])
        if key == "px":
            score = (W.pixel_ap(torch.from_numpy(ours)), float("nan"))
            anchor = wr.MaskEvaluator(np.zeros(ours.shape[1] - 2))
            anchor.pos, anchor.neg = theirs
            score = (score[0], anchor.compute())
        else:
            score = (float(np.mean((ours * 100 / pairs).max(-1))), float(np.mean((theirs * 100 / pairs).max(-1))))
        rows.append({"check": title + "; the maps above in its 224 frame", "group": "wsol", "pairs": int(pairs),
                     "ours": score[0], "anchor": score[1], "max_abs_diff": abs(score[0] - score[1]),
                     "agree": f"{int((ours == theirs).sum())}/{ours.size}"})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| check | pairs | ours | anchor's code | max abs diff | outcomes agree |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['pairs']} | {r['ours']:.6f} | {r['anchor']:.6f} | "
                     f"{r['max_abs_diff']:.1e} | {r.get('agree', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--out", default=".bench/anchors.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = compare(args.seed, args.images, args.size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
