"""RISE (Petsiuk et al. 2018) through TorchRay, the library the paper's baselines came from (docs/method.md#baselines).

TorchRay's `rise` scores N random up-sampled binary masks (cells x cells grid, a cell kept with probability p, random
shift) with the SIGMOID of the classifier logits, for all classes at once, and averages the masks weighted by the
scores. Masked pixels become 0 in the normalised input, i.e. the dataset-mean colour, as in the explainer's training.
Each class map is then min-max normalised (docs/method.md#baselines). The mask set is seeded, so results are
reproducible. Paper settings: 8000 masks, 7x7 cells, p = 0.5 (EvalConfig.rise_*); the cost is N/batch classifier passes
per image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from explainer.baselines import missing_torchray
from explainer.baselines.common import minmax

try:
    from torchray.attribution.rise import rise
except ImportError as exc:  # the optional extra [baselines]
    raise missing_torchray("RISE", exc) from exc


class RISE:
    name = "rise"
    needs_grad = False

    def __init__(self, classifier: nn.Module, num_masks: int = 8000, cells: int = 7, p: float = 0.5,
                 batch_size: int = 100, seed: int = 0) -> None:
        if num_masks < 1 or cells < 1 or not 0.0 < p <= 1.0 or batch_size < 1:
            raise ValueError(f"RISE: need num_masks >= 1, cells >= 1, 0 < p <= 1, batch >= 1; got {num_masks}, "
                             f"{cells}, {p}, {batch_size}")
        self.classifier = classifier
        self.num_masks, self.cells, self.p, self.batch_size, self.seed = num_masks, cells, p, batch_size, seed

    def __call__(self, images: Tensor, wanted: Tensor) -> Tensor:
        with torch.no_grad():
            sal = rise(self.classifier, images, seed=self.seed, num_masks=self.num_masks, num_cells=self.cells,
                       filter_masks=None, batch_size=self.batch_size, p=self.p, resize=False)
        return minmax(sal.float())
