"""Extremal Perturbations (Fong et al. 2019) through TorchRay, the library the paper's baselines came from
(docs/method.md#baselines).

For each wanted (image, class), TorchRay optimises one "preserve" mask per area (blur perturbation) jointly; as in
the EP paper, the map kept is the one of the SMALLEST area whose blurred-outside image scores a class logit at least as
high as the clean image's (a* = min{a : F(m_a * x) >= F(x)}), else the largest area's. Masks are already in [0,1].
Paper settings: areas 0.05/0.1/0.2/0.3, 800 iterations (EvalConfig.ep_*); costly (one optimisation per class).
TorchRay's mask parametrisation (grid step 7 px, smoothing sigma 21 px) is tuned for 224 px inputs; it is scaled with
the input size here (identical at 224), otherwise a 32-64 px image gets one blurry blob whatever the area.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from explainer.baselines import missing_torchray

try:
    from torchray.attribution.extremal_perturbation import BLUR_PERTURBATION, Perturbation, extremal_perturbation
except ImportError as exc:  # the optional extra [baselines]
    raise missing_torchray("Extremal Perturbations", exc) from exc

REF_SIZE, REF_STEP, REF_SIGMA = 224, 7, 21.0  # TorchRay's defaults, for 224 px inputs


class ExtremalPerturbation:
    name = "ep"
    needs_grad = True

    def __init__(self, classifier: nn.Module, areas: list[float] | tuple[float, ...] = (0.05, 0.1, 0.2, 0.3),
                 iterations: int = 800, step: int | None = None, sigma: float | None = None) -> None:
        if not areas or any(not 0.0 < a < 1.0 for a in areas) or iterations < 1:
            raise ValueError(f"Extremal Perturbations: areas must be in (0,1) and iterations >= 1; got {areas}, "
                             f"{iterations}")
        self.classifier = classifier
        self.areas = sorted(float(a) for a in areas)
        self.iterations = iterations
        self.step, self.sigma = step, sigma
        self.chosen_areas: list[float] = []  # the area picked for every map computed so far (for the report)

    def explain_one(self, image: Tensor, target: int) -> Tensor:
        """image [1,3,H,W] -> [H,W] mask of the smallest area that keeps the target logit."""
        size = min(image.shape[-2:])
        step = self.step if self.step is not None else max(1, round(REF_STEP * size / REF_SIZE))
        sigma = self.sigma if self.sigma is not None else REF_SIGMA * size / REF_SIZE
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)  # inside TorchRay
            masks, _ = extremal_perturbation(self.classifier, image, target, areas=self.areas,
                                             perturbation=BLUR_PERTURBATION, max_iter=self.iterations,
                                             step=step, sigma=sigma, resize=True, smooth=0)
        masks = masks.detach().clamp(0.0, 1.0)
        with torch.no_grad():
            reference = self.classifier(image)[0, target]
            kept = self.classifier(Perturbation(image, type=BLUR_PERTURBATION).apply(masks))[:, target]
        ok = (kept >= reference).nonzero().flatten()
        index = int(ok[0]) if len(ok) else len(self.areas) - 1
        self.chosen_areas.append(self.areas[index])
        return masks[index, 0]

    def batch_totals(self) -> dict[str, Tensor]:
        """Evaluator hook: how often each area was the smallest that kept the logit, since the last call."""
        counts = torch.tensor([float(self.chosen_areas.count(a)) for a in self.areas], dtype=torch.float64)
        self.chosen_areas.clear()
        return {"area_counts": counts}

    def results(self, totals: dict[str, Tensor]) -> dict[str, dict[str, int]]:
        """Evaluator hook: the all-reduced counts as results.json's `ep_chosen_areas`."""
        counts = totals.get("area_counts", torch.zeros(len(self.areas), dtype=torch.float64)).tolist()
        return {"ep_chosen_areas": {str(a): int(n) for a, n in zip(self.areas, counts)}}

    def __call__(self, images: Tensor, wanted: Tensor) -> Tensor:
        maps = torch.zeros(*wanted.shape, *images.shape[-2:], device=images.device)
        for i, k in wanted.nonzero().tolist():
            maps[i, k] = self.explain_one(images[i : i + 1], k)
        return maps
