"""A port, in our own words, of the RISE authors' evaluation code (eclique/RISE, evaluation.py: gkern, auc,
CausalMetric.single_run) and of the substrates their notebook uses (insertion: conv2d with gkern(11, 5) and zero
padding; deletion: zeros).

It is the anchor our explainer.metrics deletion / insertion is checked against (tests/test_anchors.py,
benchmarks/bench_anchors.py), so it follows the original's structure (numpy argsort flipped for the order, a fixed
number of pixels per step, the curve built one classifier call per step, a 3 x 3-channel diagonal kernel) rather than
ours, and it needs no scipy: scipy.ndimage.gaussian_filter's "reflect" mode is numpy's "symmetric" padding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_filter_reflect(image: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(image, sigma) for a 2-D float64 array: one 1-D correlation per axis with the
    normalised Gaussian of radius int(truncate * sigma + 0.5), the input extended by half-sample reflection."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 / sigma**2 * x**2)
    taps /= taps.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="symmetric")
        moved = np.moveaxis(padded, axis, 0)
        acc = sum(taps[j] * moved[j : j + out.shape[axis]] for j in range(2 * radius + 1))
        out = np.moveaxis(acc, 0, axis)
    return out


def gkern(klen: int, nsig: float) -> torch.Tensor:
    """RISE's gkern: a delta in a klen x klen array, Gaussian-smoothed, as a [3, 3, klen, klen] float32 conv weight
    that blurs each channel on its own."""
    delta = np.zeros((klen, klen))
    delta[klen // 2, klen // 2] = 1
    k = gaussian_filter_reflect(delta, nsig)
    kern = np.zeros((3, 3, klen, klen))
    for c in range(3):
        kern[c, c] = k
    return torch.from_numpy(kern.astype("float32"))


def blur_substrate(klen: int, nsig: float,
                   dtype: torch.dtype = torch.float32) -> Callable[[torch.Tensor], torch.Tensor]:
    """The notebook's insertion substrate: conv2d with gkern and zero padding (the float32 kernel cast to dtype)."""
    kern = gkern(klen, nsig).to(dtype)
    return lambda x: F.conv2d(x, kern, padding=klen // 2)


def auc(curve: np.ndarray) -> float:
    return float((curve.sum() - curve[0] / 2 - curve[-1] / 2) / (curve.shape[0] - 1))


class AnchorCausalMetric:
    """CausalMetric.single_run for one image: `model` returns probabilities (the notebook wraps it with a softmax);
    the class is the model's top-1 on the image unless `cls` is given."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], mode: str, step: int,
                 substrate_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        assert mode in ("del", "ins")
        self.model, self.mode, self.step, self.substrate_fn = model, mode, step, substrate_fn

    def single_run(self, img: torch.Tensor, explanation: np.ndarray, cls: int | None = None) -> tuple[float, int]:
        """img [1, 3, H, W]; explanation [H, W] -> (AUC, class scored)."""
        h, w = img.shape[-2:]
        hw = h * w
        with torch.no_grad():
            c = int(self.model(img).argmax(1)[0]) if cls is None else cls
            n_steps = (hw + self.step - 1) // self.step
            if self.mode == "del":
                start, finish = img.clone(), self.substrate_fn(img)
            else:
                start, finish = self.substrate_fn(img), img.clone()
            scores = np.empty(n_steps + 1)
            order = np.flip(np.argsort(explanation.reshape(-1, hw), axis=1), axis=-1)
            for i in range(n_steps + 1):
                scores[i] = float(self.model(start)[0, c])
                if i < n_steps:
                    coords = order[:, self.step * i : self.step * (i + 1)]
                    flat_start = start.numpy().reshape(1, 3, hw)
                    flat_start[0, :, coords] = finish.numpy().reshape(1, 3, hw)[0, :, coords]
                    start = torch.from_numpy(flat_start.reshape(1, 3, h, w))
        return auc(scores), c
