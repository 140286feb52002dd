"""Why a class channel of the Explainer dies: per-class mask statistics and per-term gradients over the first steps.

    python -m explainer.experiments.channel_dynamics --config configs/synthetic.yaml --steps 300 --every 5 \
        --out runs/diag/seed0 [key=value ...]

Runs the real trainer (`explainer.training_loop.fit`, same data order, initial weights and optimiser as
`explainer/train.py`) with a recipe that, every `--every` steps, also records on a fixed probe (the first 64
validation images; the training step itself is unchanged) for every class c:
  on_obj / off_obj   mean mask s_c on the pixels of c's objects / on the background, over the probe images with c
  absent             mean mask s_c over the images without c
  dead               share of c's object pixels with logit < -6 (sigmoid' < 0.0025: the mask is saturated at 0)
  owner              share of c's object pixels where s_c is the largest target channel (the max in m routes every
                     gradient of L_c, L_e, A(m), TV(m) to the largest target channel only)
  g_<term>           norm of the gradient of that weighted loss term w.r.t. channel c's logits on c's object pixels
  bias               the mask head's bias of channel c
Written as JSON lines to <out>/dynamics.jsonl, and summarised on stdout. A diagnostic, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from explainer.config import ExplainerRunConfig, load_config
from explainer.data.loader import make_eval_loader
from explainer.losses import (
    aggregate_masks,
    area,
    area_bound,
    class_specific_loss,
    classification_loss,
    draw_class,
    drawn_class_mask,
    negative_entropy,
    total_variation,
)
from explainer.models.explainer import class_logits
from explainer.models.model_files import unwrap
from explainer.recipes import ExplainerRecipe
from explainer.training_loop import StepResult, fit

DEAD_LOGIT = -6.0


class DynamicsRecipe(ExplainerRecipe):
    """The Explainer recipe with the same loss, plus per-class statistics every `every` steps."""

    def __init__(self, cfg: ExplainerRunConfig, every: int, out: Path) -> None:
        super().__init__(cfg)
        self.every, self.out, self.calls = every, out, 0
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / "dynamics.jsonl").open("w")

    def setup(self, accelerator: Any, manifest: Any) -> None:
        super().setup(accelerator, manifest)
        loader = make_eval_loader(self.cfg.data, manifest, self.cfg.data.val_split, rank=0, world_size=1)
        parts = [b for _, b in zip(range(4), loader)]  # a fixed probe of the first 64 validation images
        self.probe = {k: torch.cat([p[k] for p in parts]) for k in ("image", "labels", "seg_classes")}

    def train_step(self, model: torch.nn.Module, batch: dict[str, Any], accelerator: Any) -> StepResult:
        self.calls += 1
        if (self.calls - 1) % self.every == 0:
            probe = {k: v.to(batch["image"].device) for k, v in self.probe.items()}
            logits, masks, terms = self._terms(model, probe["image"], probe["labels"])
            self._record(unwrap(model), logits, masks, probe["labels"], probe["seg_classes"], terms)
        _, masks, terms = self._terms(model, batch["image"], batch["labels"].to(batch["image"].device))
        total = sum(terms.values())
        return StepResult(loss=total, terms={k: v.detach() for k, v in terms.items()}, masks=masks)

    def _terms(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[Any, Any, Any]:
        """The weighted terms of the WYSIWYC loss (the same functions as explainer.step), with graph."""
        cfg = self.cfg.loss
        logits = class_logits(model(images), images.shape[-2:]).full().float()  # every class: C is small here
        masks = torch.sigmoid(logits)
        m, n = aggregate_masks(masks, labels)
        passes, drawn = [images * m, images * (1 - m)], None
        if cfg.w_class_specific > 0:  # docs/method.md#class-specific-term (the loader's draws are not needed here)
            drawn = draw_class(labels, torch.rand(images.shape[0], device=images.device))
            passes.append(images * drawn_class_mask(masks, drawn))
        both = self.classifier(torch.cat(passes))
        b = images.shape[0]
        terms = {
            "classification": classification_loss(both[:b], labels).mean(),
            "entropy": cfg.lambda_e * negative_entropy(both[b:]).mean(),
            "tv": cfg.lambda_tv * (total_variation(m).mean() + total_variation(n).mean()),
            "bound": cfg.w_bound * area_bound(masks, labels, cfg.area_min, cfg.area_max, cfg.bound_reduction).mean(),
            "area_m": cfg.w_m * area(m).mean(),
            "area_n": cfg.w_n * area(n).mean(),
        }
        if drawn is not None:
            terms["class_specific"] = cfg.w_class_specific * class_specific_loss(both[2 * b:], drawn).mean()
        return logits, masks, terms

    def _record(self, model: torch.nn.Module, logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                seg_classes: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        grads = {k: torch.autograd.grad(v, logits, retain_graph=True)[0] for k, v in terms.items()}
        present = labels > 0.5
        target_masks = torch.where(present[:, :, None, None], masks, -1.0)
        owner = target_masks.argmax(1)  # [B,H,W]
        row: dict[str, Any] = {"step": self.calls - 1, **{k: float(v) for k, v in terms.items()}, "classes": {}}
        head = getattr(model, "head", None)
        for c in range(labels.shape[1]):
            with_c = present[:, c]
            obj = (seg_classes == c + 1) & with_c[:, None, None]
            bg = (seg_classes == 0) & with_c[:, None, None]
            stats: dict[str, float] = {}
            if bool(obj.any()):
                s, z = masks[:, c], logits[:, c].detach()
                stats.update(on_obj=float(s[obj].mean()), off_obj=float(s[bg].mean()) if bool(bg.any()) else 0.0,
                             dead=float((z[obj] < DEAD_LOGIT).float().mean()), owner=float((owner[obj] == c).float()
                                                                                             .mean()),
                             logit_obj=float(z[obj].mean()))
                for k, g in grads.items():
                    stats[f"g_{k}"] = float(g[:, c][obj].norm())
            if bool((~with_c).any()):
                stats["absent"] = float(masks[~with_c, c].mean())
            if head is not None and head.bias is not None:
                stats["bias"] = float(head.bias[c])
            row["classes"][str(c)] = stats
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out", default="runs/diag")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    out = Path(args.out)
    forced = [f"train.max_steps={args.steps}", f"train.output_dir={out / 'run'}", "tracking.wandb_mode=disabled",
              "train.image_log_every_steps=0"]
    cfg = load_config(ExplainerRunConfig, args.config, [*args.overrides, *forced])
    recipe = DynamicsRecipe(cfg, args.every, out)
    fit(recipe)
    recipe.log.close()
    print(summarise(out / "dynamics.jsonl"))
    return 0


def summarise(path: Path, keys: tuple[str, ...] = ("on_obj", "absent", "dead", "owner", "g_classification",
                                                     "g_bound", "g_area_n", "bias")) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    lines = []
    for c in sorted(rows[0]["classes"], key=int):
        lines.append(f"class {c}")
        lines.append("  step " + " ".join(f"{k:>16}" for k in keys))
        for row in rows[:: max(1, len(rows) // 12)]:
            s = row["classes"][c]
            lines.append(f"  {row['step']:4d} " + " ".join(f"{s.get(k, float('nan')):16.4g}" for k in keys))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
