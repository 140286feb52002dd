"""The training step: same loss and gradients as the paper-structured step, one classifier pass, grads only on E."""

import contextlib

import pytest
import torch

from explainer.config import LossConfig
from explainer.models import build_classifier, build_explainer, freeze
from explainer.models.explainer import ClassLogits
from explainer.step import explainer_forward_loss, reference_forward_loss

NUM_CLASSES = 4
# one class, several classes, no class, all classes
LABELS = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])


def _models(dtype=torch.float32):
    torch.manual_seed(0)
    explainer = build_explainer("tiny_unet", NUM_CLASSES).to(dtype)
    classifier = freeze(build_classifier("tiny_cnn", NUM_CLASSES).to(dtype))
    return explainer, classifier


class StridedExplainer(torch.nn.Module):
    """DeepLabV3's shape in a few hundred weights: logits at 1/8 of the input (ClassLogits), for float64 tests."""

    def __init__(self, classes: int, zero_head: bool = False) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.Tanh())
        self.head = torch.nn.Conv2d(8, classes, 1)
        if zero_head:
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return ClassLogits(self.head(self.body(x)), (x.shape[-2], x.shape[-1]))


def _images(dtype=torch.float32, size=32):
    return torch.randn(len(LABELS), 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.numerics
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fast_step_equals_reference_step(reduction):
    explainer, classifier = _models(torch.float64)
    explainer.eval()  # BN on running stats: both steps see identical explainer outputs
    images = _images(torch.float64)
    cfg = LossConfig(lambda_e=3.0, lambda_tv=1.0, w_bound=0.8, w_m=0.01, w_n=0.3, bound_reduction=reduction)
    fast = explainer_forward_loss(explainer, classifier, images, LABELS, cfg)
    fast_grads = torch.autograd.grad(fast.loss, list(explainer.parameters()))
    slow = reference_forward_loss(explainer, classifier, images, LABELS, cfg)
    slow_grads = torch.autograd.grad(slow.loss, list(explainer.parameters()))
    assert fast.terms.keys() == slow.terms.keys()
    for key in fast.terms:
        assert fast.terms[key].item() == pytest.approx(slow.terms[key].item(), rel=1e-10, abs=1e-12), key
    for a, b in zip(fast_grads, slow_grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert torch.allclose(fast.m, slow.m) and torch.allclose(fast.logits_masked, slow.logits_masked)


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda mod, inputs, output: calls.append(inputs[0]))
    return calls, handle


@pytest.mark.numerics
def test_one_classifier_call_on_the_concatenation():
    explainer, classifier = _models()
    images = _images()
    calls, handle = _count_calls(classifier)
    out = explainer_forward_loss(explainer, classifier, images, LABELS, LossConfig())
    assert len(calls) == 1 and calls[0].shape == (2 * len(LABELS), 3, 32, 32)
    # first half x * m, second half x * (1 - m), on the normalised image
    m = out.m.detach()
    assert torch.allclose(calls[0][: len(LABELS)], images * m)
    assert torch.allclose(calls[0][len(LABELS):], images * (1 - m))
    calls.clear()
    reference_forward_loss(explainer, classifier, images, LABELS, LossConfig())
    assert len(calls) == 2  # the paper code's two passes
    handle.remove()


@pytest.mark.numerics
def test_class_specific_term_adds_one_block_to_the_same_classifier_call():
    explainer, classifier = _models()
    images = _images()
    calls, handle = _count_calls(classifier)
    cfg = LossConfig(w_class_specific=1.0)
    draws = torch.tensor([0.1, 0.9, 0.5, 0.6])
    out = explainer_forward_loss(explainer, classifier, images, LABELS, cfg, draws=draws)
    handle.remove()
    batch = len(LABELS)
    assert len(calls) == 1 and calls[0].shape == (3 * batch, 3, 32, 32)
    assert torch.allclose(calls[0][: 2 * batch], torch.cat([images * out.m.detach(), images * (1 - out.m.detach())]))
    for i, k in enumerate([0, 2, None, 2]):  # image 1: the second of {1, 2}; image 3: the third of {0, 1, 2, 3}
        if k is None:  # no class: a blank block, and no L_s
            assert (calls[0][2 * batch + i] == 0).all()
        else:
            assert torch.allclose(calls[0][2 * batch + i], images[i] * out.masks[i, k].detach())
    assert "class_specific" in out.terms and out.terms["class_specific"] > 0
    without = explainer_forward_loss(explainer, classifier, images, LABELS, LossConfig())
    assert out.loss.item() == pytest.approx(without.loss.item() + out.terms["class_specific"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="reference"):
        reference_forward_loss(explainer, classifier, images, LABELS, cfg)


@pytest.mark.numerics
def test_gradients_only_on_the_explainer():
    explainer, classifier = _models()
    out = explainer_forward_loss(explainer, classifier, _images(), LABELS, LossConfig())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in explainer.parameters())
    assert all(p.grad is None for p in classifier.parameters())
    assert out.masks.shape == (len(LABELS), NUM_CLASSES, 32, 32) and out.m.shape == (len(LABELS), 1, 32, 32)
    assert out.terms["loss"].item() == out.loss.item() and not out.terms["loss"].requires_grad


def test_an_unfrozen_classifier_is_refused():
    explainer, _ = _models()
    classifier = build_classifier("tiny_cnn", NUM_CLASSES)
    with pytest.raises(RuntimeError, match="freeze"):
        explainer_forward_loss(explainer, classifier, _images(), LABELS, LossConfig())


@pytest.mark.numerics
def test_channels_last_input_gives_the_same_loss_and_stays_channels_last():
    explainer, classifier = _models()
    explainer.eval()
    images = _images()
    plain = explainer_forward_loss(explainer, classifier, images, LABELS, LossConfig())
    explainer_cl = explainer.to(memory_format=torch.channels_last)
    classifier_cl = classifier.to(memory_format=torch.channels_last)
    calls, handle = _count_calls(classifier_cl)
    cl = explainer_forward_loss(
        explainer_cl, classifier_cl, images.contiguous(memory_format=torch.channels_last), LABELS, LossConfig()
    )
    handle.remove()
    assert calls[0].is_contiguous(memory_format=torch.channels_last)
    assert cl.loss.item() == pytest.approx(plain.loss.item(), rel=1e-5)


@pytest.mark.numerics
def test_bf16_autocast_entered_once_and_loss_in_fp32():
    explainer, classifier = _models()
    explainer.eval()
    images = _images()
    full = explainer_forward_loss(explainer, classifier, images, LABELS, LossConfig())
    entered = []

    @contextlib.contextmanager
    def single_use_autocast():  # like accelerator.autocast(): a generator context, usable once
        entered.append(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield

    mixed = explainer_forward_loss(explainer, classifier, images, LABELS, LossConfig(), single_use_autocast())
    assert entered == [1]
    assert mixed.loss.dtype == torch.float32 and mixed.masks.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in mixed.terms.values())
    assert mixed.loss.item() == pytest.approx(full.loss.item(), rel=0.05)
    mixed.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in explainer.parameters())


@pytest.mark.numerics
@pytest.mark.parametrize("alternative", ["blur", "noise"])
def test_rtis_step(alternative):
    explainer, classifier = _models()
    images = _images(size=48)
    calls, handle = _count_calls(classifier)
    cfg = LossConfig(kind="rtis", rtis_alternative=alternative)
    out = explainer_forward_loss(explainer, classifier, images, LABELS, cfg)
    handle.remove()
    assert set(out.terms) == {"loss", "tv", "area_m", "preserver", "destroyer"}
    assert len(calls) == 1 and calls[0].shape[0] == 2 * len(LABELS)
    # removed pixels are replaced by the alternative image, not the mean colour: x_m != x * m
    assert not torch.allclose(calls[0][: len(LABELS)], images * out.m.detach())
    out.loss.backward()
    assert all(p.grad is not None for p in explainer.parameters())
    with pytest.raises(ValueError, match="WYSIWYC"):
        reference_forward_loss(explainer, classifier, images, LABELS, cfg)


@pytest.mark.parametrize(("mode", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_both_networks_in_low_precision_and_the_loss_in_fp32(mode, dtype):
    """The dtype seen INSIDE the fused classifier pass (a hook on its convolutions), not a call count; fp16 is the
    trainer's own CPU autocast + GradScaler (accelerate ignores fp16 on CPU)."""
    from explainer.precision import Precision

    explainer, classifier = _models()
    precision = Precision(mode, None)
    seen = {"classifier": [], "explainer": []}
    hooks = [conv.register_forward_hook(lambda mod, inputs, output, name=name: seen[name].append(output.dtype))
             for name, net in (("classifier", classifier), ("explainer", explainer))
             for conv in net.modules() if isinstance(conv, torch.nn.Conv2d)]
    out = explainer_forward_loss(explainer, classifier, _images(), LABELS, LossConfig(), precision.autocast())
    for hook in hooks:
        hook.remove()
    assert seen["classifier"] and set(seen["classifier"]) == {dtype}
    assert seen["explainer"] and set(seen["explainer"]) == {dtype}
    assert out.loss.dtype == torch.float32 and out.masks.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.terms.values()), {k: v.dtype for k, v in out.terms.items()}
    precision.backward(out.loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in explainer.parameters())
    if mode == "fp16":  # the gradients carry the loss scale until unscale_
        assert precision.scaler.get_scale() == 65536.0


# ----------------------------------------------------------------------------------------------------------------------
# Class-sparse step (docs/method.md#class-sparse) against the dense one it replaced
# ----------------------------------------------------------------------------------------------------------------------


def _dense_step_loss(explainer, classifier, images, labels, cfg):
    """The step as it was before the class-sparse loss: all C masks, the dense m / n and the bound over B x C."""
    from explainer.losses import (
        _dense_aggregate_masks,
        _dense_area_bound,
        area,
        classification_loss,
        combine_terms,
        negative_entropy,
        total_variation,
    )

    masks = torch.sigmoid(explainer(images).full())  # every class at full resolution, as the model used to return
    m, n = _dense_aggregate_masks(masks, labels)
    logits = classifier(torch.cat([images * m, images * (1 - m)]))
    batch = len(images)
    bound = _dense_area_bound(masks, labels, cfg.area_min, cfg.area_max, cfg.bound_reduction)
    return combine_terms(cfg, classification=classification_loss(logits[:batch], labels).mean(),
                         entropy=negative_entropy(logits[batch:]).mean(), tv_m=total_variation(m).mean(),
                         tv_n=total_variation(n).mean(), bound=bound.mean(), area_m=area(m).mean(),
                         area_n=area(n).mean())


@pytest.mark.numerics
@pytest.mark.parametrize(("arch", "head_init", "cfg"), [
    ("tiny_unet", "random", LossConfig()),
    ("tiny_unet", "zero", LossConfig(bound_reduction="mean", lambda_e=3.0, w_bound=0.8, w_m=0.01)),
    # head at 1/8 of the input: only the K ground-truth maps and n are upsampled, n streamed over class slices
    ("strided", "random", LossConfig(w_n=3.0, non_target_max="exact")),
    ("strided", "zero", LossConfig(bound_reduction="mean", w_n=3.0, non_target_max="exact")),
])
def test_class_sparse_step_equals_the_dense_step_in_float64(monkeypatch, arch, head_init, cfg):
    """Same loss, terms and explainer gradients as the dense step (every class upsampled to full resolution, as the
    model did before), for images with one, several, no and every class; at the zero-head start every mask is 0.5
    and both maxima are all ties (the even split the zero head relies on). CLASS_CHUNK 3: the absent-class max spans
    two slices of the 4 classes."""
    from explainer import losses

    monkeypatch.setattr(losses, "CLASS_CHUNK", 3)
    torch.manual_seed(0)
    if arch == "strided":
        explainer = StridedExplainer(NUM_CLASSES, zero_head=head_init == "zero").double()
    else:
        explainer = build_explainer(arch, NUM_CLASSES, head_init=head_init).double().eval()
    classifier = freeze(build_classifier("tiny_cnn", NUM_CLASSES).double())
    images = _images(torch.float64, size=16 if arch == "tiny_unet" else 40)
    sparse = explainer_forward_loss(explainer, classifier, images, LABELS, cfg)
    assert sparse.mask_logits.shape[-1] == (16 if arch == "tiny_unet" else 5)  # what the head emits
    sparse_grads = torch.autograd.grad(sparse.loss, list(explainer.parameters()))
    dense_loss, dense_terms = _dense_step_loss(explainer, classifier, images, LABELS, cfg)
    dense_grads = torch.autograd.grad(dense_loss, list(explainer.parameters()))
    for key in dense_terms:
        assert sparse.terms[key].item() == pytest.approx(dense_terms[key].item(), rel=1e-13, abs=1e-15), key
    for a, b in zip(sparse_grads, dense_grads):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-15), (a - b).abs().max()
    if head_init == "zero":
        assert torch.equal(sparse.masks, torch.full_like(sparse.masks, 0.5))


@pytest.mark.numerics
def test_head_resolution_n_is_an_upper_bound_equal_where_the_head_is_at_full_resolution():
    """loss.non_target_max=head: n from the upsampled head-resolution max. Bilinear weights are a convex combination,
    so it is >= the exact n everywhere; m, the bound and every term but those of n are the exact form's; on a
    full-resolution head (tiny U-Net: the demo) both forms are the same numbers."""
    from explainer.losses import split_classes

    torch.manual_seed(0)
    logits = torch.randn(4, NUM_CLASSES, 5, 6, dtype=torch.float64)
    exact = split_classes(logits, LABELS, logits=True, size=(40, 48))
    head = split_classes(logits, LABELS, logits=True, size=(40, 48), non_target="head")
    assert torch.equal(head.m, exact.m) and torch.equal(head.present, exact.present)
    assert (head.n >= exact.n - 1e-15).all() and (head.n > exact.n + 1e-3).any()  # random logits: a loose bound
    same = [split_classes(logits, LABELS, logits=True, size=(5, 6), non_target=k) for k in ("exact", "head")]
    assert torch.equal(same[0].n, same[1].n) and torch.equal(same[0].m, same[1].m)
    with pytest.raises(ValueError, match="non_target_max"):
        split_classes(logits, LABELS, logits=True, size=(40, 48), non_target="dense")


def test_the_loss_reads_its_shape_from_the_cpu_labels_without_reading_the_device():
    """The class-sparse loss's K comes from the loader's CPU labels (host_labels), not from the labels on the device:
    on the meta device (no data: any read of a device value raises, as a host sync would wait on a GPU) the whole
    step runs through, with the cap and without; the same labels on the CPU give the same loss as without them."""
    explainer, classifier = _models()
    images = _images()
    for cap in (None, 4):
        cfg = LossConfig(max_classes_per_image=cap, w_class_specific=1.0)
        with torch.device("meta"):
            meta_explainer = StridedExplainer(NUM_CLASSES)  # logits at 1/8: the upsampling path
            meta_classifier = freeze(build_classifier("tiny_cnn", NUM_CLASSES))
        meta = explainer_forward_loss(meta_explainer, meta_classifier, images.to("meta"), LABELS.to("meta"), cfg,
                                      draws=torch.rand(4, device="meta"), host_labels=LABELS)
        assert meta.loss.shape == () and meta.m.shape == (4, 1, 32, 32)
        with pytest.raises(RuntimeError, match="meta"):  # what the loss did before: read K from the device labels
            explainer_forward_loss(meta_explainer, meta_classifier, images.to("meta"), LABELS.to("meta"), cfg,
                                   draws=torch.rand(4, device="meta"))
        draws = torch.rand(4, generator=torch.Generator().manual_seed(0))
        with_host = explainer_forward_loss(explainer, classifier, images, LABELS, cfg, draws=draws, host_labels=LABELS)
        without = explainer_forward_loss(explainer, classifier, images, LABELS, cfg, draws=draws)
        assert torch.equal(with_host.loss, without.loss)


def test_the_step_keeps_no_tensor_of_all_class_masks_for_backward():
    """What backward holds of size B x C x H x W: only the explainer's logits (the absent-class max's gradient is
    recomputed from them). The dense step kept the sigmoid masks, two torch.where copies, the sort's values and
    indices and two relu outputs of that size."""
    classes, size = 40, 16  # 40 channels: no layer of tiny_unet has as many
    torch.manual_seed(0)
    explainer = build_explainer("tiny_unet", classes)
    classifier = freeze(build_classifier("tiny_cnn", classes))
    labels = torch.zeros(4, classes)
    labels[0, 3] = labels[1, [5, 7]] = labels[3, :3] = 1.0  # K = 3 of 40
    images = torch.randn(4, 3, size, size)
    full = 4 * classes * size * size
    saved = []

    def pack(t):
        saved.append((t.numel(), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = explainer_forward_loss(explainer, classifier, images, labels, LossConfig(w_class_specific=1.0))
    storages = {ptr for numel, ptr in saved if numel == full}
    assert len(storages) == 1, len(storages)
    assert storages == {out.mask_logits.untyped_storage().data_ptr()}
    out.loss.backward()
