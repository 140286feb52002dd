"""A port, in our own words, of the pointing game as TorchRay's benchmark scores VOC 2007
(torchray/benchmark/pointing_game.py: PointingGame, PointingGameBenchmark.evaluate; torchray/benchmark/datasets.py:
voc_as_mask; examples/attribution_benchmark.py: the saliency map resized to the image, its argmax as the point).

It is the anchor our explainer.metrics pointing game is checked against (tests/test_anchors.py,
benchmarks/bench_anchors.py), so it follows the original's structure (a drawn acceptance disc, a drawn box mask,
hit/miss counters per class) rather than ours (a box distance, windows), and it does not need TorchRay installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HIT, MISS, SKIP = 1, -1, 0


class AnchorPointingGame:
    """Hit and miss counters per class; a point hits when the disc of radius `tolerance` (strict) around it meets
    the object mask."""

    def __init__(self, num_classes: int, tolerance: int = 15) -> None:
        self.tolerance = tolerance
        self.hits = torch.zeros(num_classes, dtype=torch.float64)
        self.misses = torch.zeros(num_classes, dtype=torch.float64)

    def test(self, mask: torch.Tensor, point: tuple[int, int]) -> int:
        """mask [H, W] bool; point (u = column, v = row)."""
        rows = (torch.arange(mask.shape[0], dtype=torch.float32) - point[1]) ** 2
        cols = (torch.arange(mask.shape[1], dtype=torch.float32) - point[0]) ** 2
        disc = (rows[:, None] + cols[None, :]) < self.tolerance**2
        return HIT if bool((mask & disc).any()) else MISS

    def record(self, outcome: int, cls: int) -> None:
        if outcome == HIT:
            self.hits[cls] += 1
        elif outcome == MISS:
            self.misses[cls] += 1

    @property
    def accuracy(self) -> float:
        """Mean over every class of hits / max(hits + misses, 1): a class never scored counts as 0."""
        return float((self.hits / (self.hits + self.misses).clamp(min=1)).mean())


def voc_label(width: int, height: int, objects: list[tuple[str, int, int, int, int, int]]) -> dict:
    """A label shaped like torchvision's VOCDetection target: strings, as parsed from the XML."""
    return {"annotation": {"size": {"width": str(width), "height": str(height)}, "object": [
        {"name": name, "difficult": str(difficult),
         "bndbox": {"xmin": str(x0), "ymin": str(y0), "xmax": str(x1), "ymax": str(y1)}}
        for name, x0, y0, x1, y1, difficult in objects]}}


def boxes_mask(label: dict, name: str) -> torch.Tensor:
    """Every box of the class drawn into an H x W boolean mask (1-based inclusive XML coordinates)."""
    size = label["annotation"]["size"]
    mask = torch.zeros(int(size["height"]), int(size["width"]), dtype=torch.bool)
    for obj in label["annotation"]["object"]:
        if obj["name"] != name:
            continue
        box = obj["bndbox"]
        mask[int(box["ymin"]) - 1 : int(box["ymax"]), int(box["xmin"]) - 1 : int(box["xmax"])] = True
    return mask


def benchmark_outcome(game: AnchorPointingGame, label: dict, name: str, point: tuple[int, int]) -> int:
    """PointingGameBenchmark.evaluate on VOC: SKIP when every object of the class is difficult, else the box test."""
    mine = [obj for obj in label["annotation"]["object"] if obj["name"] == name]
    if all(bool(int(obj["difficult"])) for obj in mine):
        return SKIP
    return game.test(boxes_mask(label, name), point)


def saliency_point(saliency: torch.Tensor, width: int, height: int) -> tuple[int, int]:
    """The benchmark's point: the [h, w] map resized to the image (bilinear, align_corners=False), first argmax."""
    big = F.interpolate(saliency[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    flat = int(torch.argmax(big.reshape(1, -1), dim=1))
    return flat % width, flat // width
