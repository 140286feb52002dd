"""Numeric precision of a training run: autocast, loss scaling and the parameter dtype, in one place.

accelerate does bf16 autocast on CPU and CUDA and fp16 autocast + GradScaler on CUDA, but silently ignores fp16 on
CPU (no autocast, no scaler). There we do it ourselves: `torch.autocast("cpu", float16)` and
`torch.amp.GradScaler("cpu")`, whose state (scale, growth tracker) the trainer keeps in the checkpoint's meta.json,
so a resumed fp16 run continues with exactly the scale it had (no pickle to load).

`dtype` float64 is for equivalence tests: models and batches in float64 make 1-process vs N-process comparisons
independent of the BLAS code path (docs in the README's Training section).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate import Accelerator

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Precision:
    """Autocast context, backward with loss scaling, and the optimizer step of one run."""

    def __init__(self, mixed_precision: str, accelerator: Accelerator | None, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"train.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if dtype != "float32" and mixed_precision != "no":
            raise ValueError(f"train.dtype={dtype} needs train.mixed_precision=no, got {mixed_precision!r}")
        self.mixed_precision = mixed_precision
        self.accelerator = accelerator
        self.dtype = DTYPES[dtype]
        device = accelerator.device.type if accelerator is not None else "cpu"
        self.own_fp16 = mixed_precision == "fp16" and device == "cpu"  # the case accelerate leaves out
        self.scaler = torch.amp.GradScaler("cpu") if self.own_fp16 else None

    def autocast(self) -> Any:
        """Context for the forward passes (both networks, once)."""
        if self.own_fp16:
            return torch.autocast("cpu", dtype=torch.float16)
        if self.accelerator is None:
            if self.mixed_precision == "bf16":
                return torch.autocast("cpu", dtype=torch.bfloat16)
            return contextlib.nullcontext()
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        loss = self.scaler.scale(loss) if self.scaler is not None else loss
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true size (before clipping); a no-op without our scaler."""
        if self.scaler is not None:
            self.scaler.unscale_(_inner(optimizer))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step; with our scaler it is skipped on inf/nan gradients and the scale is updated."""
        if self.scaler is not None:
            self.scaler.step(_inner(optimizer))
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any] | None:
        """JSON-able scaler state (None without our scaler)."""
        if self.scaler is None:
            return None
        return {k: (float(v) if k == "scale" else v) for k, v in self.scaler.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is None or state is None:
            return
        self.scaler.load_state_dict(state)

    def describe(self) -> str:
        parts = [f"mixed_precision={self.mixed_precision}"]
        if self.own_fp16:
            parts.append("(fp16 autocast + GradScaler on CPU by the trainer)")
        if self.dtype != torch.float32:
            parts.append(f"dtype={str(self.dtype).removeprefix('torch.')}")
        return " ".join(parts)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (GradScaler keys its per-optimizer state on the object)."""
    return getattr(optimizer, "optimizer", optimizer)
