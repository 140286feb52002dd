"""Each loss term of docs/method.md#objective (and the RTIS loss) pinned against numbers computed by hand on tiny
tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from explainer import losses
from explainer.config import LossConfig
from explainer.losses import (
    _dense_aggregate_masks,
    _dense_area_bound,
    aggregate_masks,
    alternative_image,
    area,
    area_bound,
    area_counts,
    class_specific_loss,
    classification_loss,
    draw_class,
    gaussian_blur,
    negative_entropy,
    present_classes,
    rtis_loss,
    split_classes,
    total_variation,
    wysiwyc_loss,
)
from explainer.objectives import objective_terms

LN2 = math.log(2.0)


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.numerics
def test_aggregate_masks_one_several_zero_and_all_classes():
    # 4 images, C = 3 classes, masks of 1x2 pixels: s_0, s_1, s_2 per image
    masks = t(
        [
            [[[0.2, 0.9]], [[0.5, 0.1]], [[0.7, 0.3]]],  # image 0: classes {0, 2}
            [[[0.2, 0.9]], [[0.5, 0.1]], [[0.7, 0.3]]],  # image 1: no class
            [[[0.2, 0.9]], [[0.5, 0.1]], [[0.7, 0.3]]],  # image 2: all classes
            [[[0.2, 0.9]], [[0.5, 0.1]], [[0.7, 0.3]]],  # image 3: class {1}
        ]
    )
    labels = t([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    m, n = aggregate_masks(masks, labels)
    assert m.shape == n.shape == (4, 1, 1, 2)
    # image 0: m = max(s_0, s_2) = [max(.2,.7), max(.9,.3)] = [.7, .9]; n = s_1 = [.5, .1]
    # image 1: m = 0 (no class); n = max over all = [.7, .9]
    # image 2: m = max over all = [.7, .9]; n = 0 (no non-target class)
    # image 3: m = s_1 = [.5, .1]; n = max(s_0, s_2) = [.7, .9]
    assert torch.equal(m.flatten(1), t([[0.7, 0.9], [0.0, 0.0], [0.7, 0.9], [0.5, 0.1]]))
    assert torch.equal(n.flatten(1), t([[0.5, 0.1], [0.7, 0.9], [0.0, 0.0], [0.7, 0.9]]))


@pytest.mark.numerics
def test_classification_loss_is_bce_mean_over_classes():
    # logits [0, ln 3], labels [1, 0]:
    #   BCE(0, 1)    = -log sigmoid(0)          = -log(1/2) = ln 2
    #   BCE(ln3, 0)  = -log(1 - sigmoid(ln 3))  = -log(1 - 3/4) = ln 4 = 2 ln 2
    #   mean over C = 2 classes = 1.5 ln 2 = 1.0397207708
    loss = classification_loss(t([[0.0, math.log(3.0)]]), t([[1.0, 0.0]]))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(1.5 * LN2, abs=1e-12)


@pytest.mark.numerics
def test_negative_entropy_softmax_and_clamp():
    # row 0: p = softmax([0, 0]) = [1/2, 1/2]: (1/2)(2 * 1/2 ln 1/2) = 1/2 ln 1/2 = -0.3465735903
    # row 1: p = softmax([ln 3, 0]) = [3/4, 1/4]: (3/4 ln 3/4 + 1/4 ln 1/4) / 2 = -0.2811675723
    value = negative_entropy(t([[0.0, 0.0], [math.log(3.0), 0.0]]))
    assert value.tolist() == pytest.approx([0.5 * math.log(0.5), (0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / 2])
    # clamp: softmax([0, -1000]) = [1, 0] in fp32; p_2 is clamped to 1e-16 so 0 * log 0 cannot give NaN:
    # (1 * ln 1 + 1e-16 * ln 1e-16) / 2 = -1.842068e-15
    clamped = negative_entropy(torch.tensor([[0.0, -1000.0]]))
    assert torch.isfinite(clamped).all()
    assert clamped.item() == pytest.approx(1e-16 * math.log(1e-16) / 2, rel=1e-5)


@pytest.mark.numerics
def test_area_is_pixel_mean():
    # (0.2 + 0.4 + 0.6 + 1.0) / 4 = 0.55
    assert area(t([[[[0.2, 0.4], [0.6, 1.0]]]])).tolist() == pytest.approx([0.55])


@pytest.mark.numerics
def test_total_variation_reflection_padding_by_hand():
    # x = [[0, 1, 3],
    #      [2, 2, 2]]           H = 2, W = 3, Z = 6
    # right differences |x[i,j] - x[i,j+1]|, the padded column 3 reflects column 1:
    #   row 0: |0-1| + |1-3| + |3-1| = 1 + 2 + 2 = 5 ; row 1: 0 + 0 + 0 = 0
    # down differences |x[i,j] - x[i+1,j]|, the padded row 2 reflects row 0:
    #   row 0: |0-2| + |1-2| + |3-2| = 2 + 1 + 1 = 4 ; row 1 (vs reflected row 0): 4 again
    # TV = (5 + 0 + 4 + 4) / 6 = 13/6
    x = t([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])
    assert total_variation(x).item() == pytest.approx(13 / 6, abs=1e-12)
    # squared (RTIS): right 1 + 4 + 4 = 9; down (4 + 1 + 1) * 2 = 12 -> 21/6 = 3.5
    assert total_variation(x, power=2).item() == pytest.approx(3.5, abs=1e-12)
    # the same value as the reference's reflection-padded difference convolutions, on a random mask
    mask = torch.rand(3, 1, 5, 7, dtype=torch.float64)
    padded = F.pad(mask, (1, 1, 1, 1), mode="reflect")
    right = F.conv2d(padded, t([[[[0, 0, 0], [0, 1, -1], [0, 0, 0]]]])).abs()
    down = F.conv2d(padded, t([[[[0, 0, 0], [0, 1, 0], [0, -1, 0]]]])).abs()
    assert torch.allclose(total_variation(mask), (right + down).mean(dim=(1, 2, 3)))
    # a constant mask has no variation; a 3-d [B,H,W] mask works too
    assert total_variation(torch.full((2, 4, 4), 0.3)).tolist() == [0.0, 0.0]


def test_area_counts_floor_of_z_times_a():
    assert area_counts(224 * 224, 0.05, 0.30) == (2508, 15052)  # 2508.8 and 15052.8 floored (reference int())
    assert area_counts(32 * 32, 0.05, 0.30) == (51, 307)  # Z of the mask actually used, not 224*224
    assert area_counts(100, 0.29, 0.30) == (29, 30)  # 100 * 0.29 = 28.999999999999996 in floats
    with pytest.raises(ValueError, match="a <= b"):
        area_counts(100, 0.5, 0.3)


def _bound_masks():
    # Z = 2 x 5 = 10 pixels; a = 0.1 -> k_min = 1 pixel that should be on; b = 0.3 -> k_max = 3 pixels allowed on
    class_a = t([0.3, 0.0, 0.9, 0.5, 0.1, 0.8, 0.2, 0.6, 0.4, 0.7]).view(2, 5)  # a permutation of 0.0 .. 0.9
    class_b = torch.full((2, 5), 0.5, dtype=torch.float64)
    class_c = torch.zeros(2, 5, dtype=torch.float64)
    masks = torch.stack([class_a, class_b, class_c]).unsqueeze(0).repeat(4, 1, 1, 1)  # [4, 3, 2, 5]
    labels = t([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1]])
    return masks, labels


@pytest.mark.numerics
def test_area_bound_by_hand_sum_and_mean():
    # B(s) = (1/Z) sum_i relu(q_min[i] - q[i]) + relu(q[i] - q_max[i]), q sorted descending,
    # q_min = [1, 0, 0, ...] (k_min = 1), q_max = [1, 1, 1, 0, ...] (k_max = 3)
    # class a: q = [.9, .8, .7, .6, .5, .4, .3, .2, .1, 0]
    #   min part: relu(1 - .9) = .1 ; max part: .6 + .5 + .4 + .3 + .2 + .1 + 0 = 2.1  -> B = 2.2 / 10 = 0.22
    # class b: q = [.5] * 10: min part relu(1 - .5) = .5 ; max part 7 * .5 = 3.5         -> B = 4.0 / 10 = 0.40
    # class c: q = [0] * 10:  min part relu(1 - 0) = 1 ; max part 0                       -> B = 1.0 / 10 = 0.10
    masks, labels = _bound_masks()
    summed = area_bound(masks, labels, a=0.1, b=0.3, reduction="sum")
    # image 0 {a}: .22 ; image 1 {a, b}: .22 + .40 = .62 ; image 2 {}: 0 ; image 3 {b, c}: .40 + .10 = .50
    assert summed.tolist() == pytest.approx([0.22, 0.62, 0.0, 0.50], abs=1e-12)
    meaned = area_bound(masks, labels, a=0.1, b=0.3, reduction="mean")
    # mean over each image's classes: .22 / 1 ; .62 / 2 = .31 ; 0 (no class, no division by zero) ; .50 / 2 = .25
    assert meaned.tolist() == pytest.approx([0.22, 0.31, 0.0, 0.25], abs=1e-12)


def test_area_bound_batch_without_any_class_and_bad_reduction():
    masks = torch.rand(2, 3, 4, 4)
    assert area_bound(masks, torch.zeros(2, 3)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="reduction"):
        area_bound(masks, torch.ones(2, 3), reduction="max")


@pytest.mark.numerics
def test_area_bound_gradient_reaches_only_ground_truth_masks():
    masks, labels = _bound_masks()
    masks = masks.clone().requires_grad_(True)
    area_bound(masks, labels, a=0.1, b=0.3).sum().backward()
    grad = masks.grad
    # image 0 has class a only: its a-mask gets gradient, b and c none
    assert grad[0, 0].abs().sum() > 0 and grad[0, 1:].abs().sum() == 0
    # image 2 has no class: no gradient at all
    assert grad[2].abs().sum() == 0
    # the brightest pixel of class a (0.9, wanted on) is pushed up: d/dq relu(1 - q) / Z = -1/10
    assert grad[0, 0, 0, 2].item() == pytest.approx(-0.1)
    # the pixel ranked 4th (0.6, beyond k_max) is pushed down: +1/10; the 2nd (0.8) is free: 0
    assert grad[0, 0, 1, 2].item() == pytest.approx(0.1)
    assert grad[0, 0, 1, 0].item() == 0.0


def _gathered_area_bound(masks, labels, a, b, reduction):
    """The previous implementation (nonzero() + gather of the K ground-truth masks), kept to pin the new one."""
    batch, _, h, w = masks.shape
    z = h * w
    k_min, k_max = area_counts(z, a, b)
    target = labels > 0.5
    image_idx, class_idx = target.nonzero(as_tuple=True)
    q = masks[image_idx, class_idx].reshape(-1, z).sort(dim=1, descending=True).values
    position = torch.arange(z)
    per_class = (torch.relu((position < k_min).to(q.dtype) - q) + torch.relu(q - (position < k_max).to(q.dtype)))
    per_image = masks.new_zeros(batch).index_add(0, image_idx, per_class.sum(dim=1) / z)
    if reduction == "mean":
        per_image = per_image / target.sum(dim=1).clamp(min=1).to(per_image.dtype)
    return per_image


@pytest.mark.numerics
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fixed_shape_area_bound_equals_the_gathered_one_in_float64(reduction):
    """Random masks and labels, incl. images with no class and with every class: values and gradients agree."""
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        masks = torch.rand(6, 5, 7, 9, generator=g, dtype=torch.float64).requires_grad_(True)
        labels = (torch.rand(6, 5, generator=g) < 0.4).double()
        labels[0] = 0.0
        labels[1] = 1.0
        new = area_bound(masks, labels, 0.05, 0.3, reduction)
        (grad_new,) = torch.autograd.grad(new.sum(), masks)
        old = _gathered_area_bound(masks, labels, 0.05, 0.3, reduction)
        (grad_old,) = torch.autograd.grad(old.sum(), masks)
        # one sort per mask either way; only the order of adding the per-class values differs (C <= 5 terms)
        assert torch.allclose(new, old, rtol=1e-14, atol=0), (trial, (new - old).abs().max())
        assert torch.equal(grad_new, grad_old), trial
        assert new[0].item() == 0.0


def test_area_bound_ignores_non_finite_masks_of_absent_classes():
    masks = torch.rand(1, 2, 4, 4)
    masks[0, 1] = float("nan")
    assert torch.isfinite(area_bound(masks, torch.tensor([[1.0, 0.0]]))).all()


def _one_image_case():
    # B = 1, C = 2, 2x2 masks: s_0 = 0.5 everywhere (the ground-truth class), s_1 = 0.25 everywhere
    masks = torch.stack([torch.full((2, 2), 0.5), torch.full((2, 2), 0.25)]).unsqueeze(0).double()
    labels = t([[1.0, 0.0]])
    return masks, labels


@pytest.mark.numerics
def test_wysiwyc_loss_total_by_hand():
    masks, labels = _one_image_case()
    # m = 0.5 and n = 0.25 everywhere -> TV(m) = TV(n) = 0, A(m) = 0.5, A(n) = 0.25
    # bound (Z = 4, a = .05 -> k_min = 0, b = .3 -> k_max = 1): q = [.5]*4, max part = 3 * .5 -> 1.5 / 4 = 0.375
    # L_c: logits [0, 0] vs labels [1, 0] -> ln 2 for each class -> ln 2
    # L_e: softmax([0, 0]) = [1/2, 1/2] -> 1/2 ln 1/2
    # VOC + ResNet-50 weights: l_e = 3, l_tv = 1, w_B = 0.8, w_m = 0.01, w_n = 0.3
    # L = ln2 + 3 (1/2 ln 1/2) + 0 + 0.8 * 0.375 + 0.01 * 0.5 + 0.3 * 0.25 = 0.0334264097
    cfg = LossConfig(lambda_e=3.0, lambda_tv=1.0, w_bound=0.8, w_m=0.01, w_n=0.3)
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    total, terms = wysiwyc_loss(masks, labels, zeros, zeros, cfg)
    assert total.item() == pytest.approx(LN2 + 1.5 * math.log(0.5) + 0.3 + 0.005 + 0.075, abs=1e-12)
    assert total.item() == pytest.approx(0.03342640972002745, abs=1e-12)
    expected = {
        "classification": LN2,
        "entropy": 0.5 * math.log(0.5),
        "tv_m": 0.0,
        "tv_n": 0.0,
        "bound": 0.375,
        "area_m": 0.5,
        "area_n": 0.25,
    }
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, abs=1e-12), key
    assert terms["loss"].item() == total.item()
    assert all(not v.requires_grad for v in terms.values())


@pytest.mark.numerics
def test_wysiwyc_loss_is_the_weighted_batch_mean_of_the_terms():
    torch.manual_seed(0)
    masks = torch.rand(3, 4, 6, 6, dtype=torch.float64)
    labels = t([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    lm, li = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    cfg = LossConfig(lambda_e=2.0, lambda_tv=0.5, w_bound=0.7, w_m=0.03, w_n=0.1, bound_reduction="mean")
    total, terms = wysiwyc_loss(masks, labels, lm, li, cfg)
    m, n = aggregate_masks(masks, labels)
    manual = (
        classification_loss(lm, labels).mean()
        + 2.0 * negative_entropy(li).mean()
        + 0.5 * (total_variation(m).mean() + total_variation(n).mean())
        + 0.7 * area_bound(masks, labels, 0.05, 0.30, "mean").mean()
        + 0.03 * area(m).mean()
        + 0.1 * area(n).mean()
    )
    assert total.item() == pytest.approx(manual.item(), abs=1e-12)


def test_wysiwyc_gradients_reach_masks_and_logits():
    torch.manual_seed(0)
    masks = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    logits_m = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    logits_i = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    labels = t([[1, 0, 0], [1, 1, 0]])
    total, _ = wysiwyc_loss(masks, labels, logits_m, logits_i, LossConfig())
    total.backward()
    for tensor in (masks, logits_m, logits_i):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    # every class mask gets gradient: ground-truth ones through m and the bound, the others through n
    assert (masks.grad.abs().sum(dim=(2, 3)) > 0).all()


def test_draw_class_picks_the_image_classes_in_index_order_by_the_uniform_number():
    labels = t([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])
    # image 0 has classes {0, 2, 3}: u in [0, 1/3) -> 0, [1/3, 2/3) -> 2, [2/3, 1) -> 3
    for u, first_image_class in {0.0: 0, 0.32: 0, 0.34: 2, 0.66: 2, 0.67: 3, 0.999: 3}.items():
        drawn = draw_class(labels, torch.full((3,), u, dtype=torch.float64))
        assert drawn.sum(dim=1).tolist() == [1.0, 0.0, 1.0], u  # one class, none for an image without any
        assert int(drawn[0].argmax()) == first_image_class and int(drawn[2].argmax()) == 1, u
    # uniform numbers -> each of the image's classes about equally often
    u = torch.rand(3000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shares = draw_class(labels[:1].expand(3000, -1), u).mean(dim=0)
    assert shares[1] == 0 and all(abs(shares[c].item() - 1 / 3) < 0.04 for c in (0, 2, 3)), shares


@pytest.mark.numerics
def test_class_specific_loss_by_hand():
    # image 0, drawn class 1 of 2: BCE(logits [0, ln 3], one-hot [0, 1]) = (ln 2 + ln(4/3)) / 2; image 1: no class
    logits = t([[0.0, math.log(3.0)], [5.0, -5.0]])
    drawn = t([[0, 1], [0, 0]])
    loss = class_specific_loss(logits, drawn)
    assert loss.tolist() == pytest.approx([(LN2 + math.log(4 / 3)) / 2, 0.0], abs=1e-12)
    assert torch.equal(loss, class_specific_loss(logits, drawn.bool()))


@pytest.mark.numerics
def test_class_specific_term_is_added_only_when_weighted():
    torch.manual_seed(0)
    masks = torch.rand(3, 4, 6, 6, dtype=torch.float64)
    labels = t([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    lm, li, ls = (torch.randn(3, 4, dtype=torch.float64) for _ in range(3))
    drawn = t([[0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    reference, ref_terms = wysiwyc_loss(masks, labels, lm, li, LossConfig())
    assert tuple(k for k in ref_terms if k != "loss") == objective_terms(LossConfig())
    cfg = LossConfig(w_class_specific=2.5)
    total, terms = wysiwyc_loss(masks, labels, lm, li, cfg, logits_single=ls, drawn=drawn)
    assert tuple(k for k in terms if k != "loss") == objective_terms(cfg) and "class_specific" in terms
    expected = class_specific_loss(ls, drawn).mean()
    assert terms["class_specific"].item() == pytest.approx(expected.item(), abs=1e-12)
    assert total.item() == pytest.approx(reference.item() + 2.5 * expected.item(), abs=1e-12)
    with pytest.raises(ValueError, match="w_class_specific"):
        wysiwyc_loss(masks, labels, lm, li, cfg)


def test_class_specific_term_pushes_a_channel_off_another_present_class():
    """The failure it exists for: in a scene with classes 0 and 1, channel 0 covers both objects while channel 1
    covers its own. The reference terms cannot tell (m = max is the same either way); L_s on x * s_0 sees class 1
    and pushes s_0 down on class 1's object, and up on its own."""
    left, right = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    left[..., :4], right[..., 4:] = 1.0, 1.0
    images = torch.cat([left, right, torch.zeros_like(left)], dim=1).double()  # object 0 in red, 1 in green

    def classifier(x):  # class c's logit = 8 * (mean of colour channel c) - 2
        return 8 * x[:, :2].mean(dim=(2, 3)) - 2

    s0 = torch.full((1, 1, 4, 8), 0.9, dtype=torch.float64, requires_grad=True)  # covers both objects
    s1 = (0.05 + 0.9 * right).double().requires_grad_()
    labels, drawn = t([[1, 1]]), t([[1, 0]])
    masks = torch.cat([s0, s1], dim=1)
    cfg = LossConfig(lambda_e=0, lambda_tv=0, w_bound=0, w_m=0, w_n=0, w_class_specific=1.0)
    total, _ = wysiwyc_loss(masks, labels, torch.zeros(1, 2), torch.zeros(1, 2), cfg,
                            logits_single=classifier(images * s0), drawn=drawn)
    total.backward()
    assert (s0.grad[..., 4:] > 0).all()  # descent lowers s_0 on class 1's object
    assert (s0.grad[..., :4] < 0).all()  # and raises it on its own
    assert s1.grad is None or (s1.grad == 0).all()  # only the drawn class's channel is touched


@pytest.mark.numerics
def test_rtis_loss_by_hand():
    masks, labels = _one_image_case()
    # m = s_0 = 0.5 everywhere -> squared TV 0, area 0.5
    # preserver: -log sigmoid(0) = ln 2 (ground-truth class 0 only; class 1's logit 5 is ignored)
    # destroyer: sigmoid(-ln 3) = 1/4 ; 5 * (1/4)^0.3 = 5 * 0.6597539554
    # L = 10 * 0 + 1 * 0.5 + ln 2 + 3.298769777 = 4.4919169575
    cfg = LossConfig(kind="rtis")
    total, terms = rtis_loss(masks, labels, t([[0.0, 5.0]]), t([[-math.log(3.0), 5.0]]), cfg)
    assert total.item() == pytest.approx(0.5 + LN2 + 5 * 0.25**0.3, abs=1e-12)
    assert total.item() == pytest.approx(4.491916957492181, abs=1e-12)
    assert terms["preserver"].item() == pytest.approx(LN2)
    assert terms["destroyer"].item() == pytest.approx(0.25)
    assert terms["tv"].item() == 0.0 and terms["area_m"].item() == 0.5


@pytest.mark.numerics
def test_rtis_preserver_destroyer_average_over_ground_truth_pairs():
    # two images: image 0 classes {0}, image 1 classes {0, 1} -> 3 (image, class) pairs
    labels = t([[1, 0], [1, 1]])
    logits = t([[0.0, 9.0], [math.log(3.0), -math.log(3.0)]])  # sigmoids of the GT pairs: 1/2, 3/4, 1/4
    masks = torch.full((2, 2, 3, 3), 0.5, dtype=torch.float64)
    _, terms = rtis_loss(masks, labels, logits, logits, LossConfig(kind="rtis"))
    # preserver = (-ln 1/2 - ln 3/4 - ln 1/4) / 3 ; destroyer = (1/2 + 3/4 + 1/4) / 3 = 0.5
    assert terms["preserver"].item() == pytest.approx(-(math.log(0.5) + math.log(0.75) + math.log(0.25)) / 3)
    assert terms["destroyer"].item() == pytest.approx(0.5)


@pytest.mark.numerics
def test_alternative_images():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 40, 40)
    noise = alternative_image(images, "noise")
    assert noise.shape == images.shape and not torch.equal(noise, images)
    blurred = alternative_image(images, "blur")
    assert blurred.shape == images.shape
    assert blurred.std() < images.std() / 5  # sigma = 10 px smooths pixel noise away
    # the kernel sums to one: far from the border (radius 40 > image) a constant stays the constant times the
    # kernel mass inside the image; at the centre of an 81-px image the whole kernel is inside
    const = gaussian_blur(torch.ones(1, 1, 81, 81))
    assert const[0, 0, 40, 40].item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="rtis_alternative"):
        alternative_image(images, "checkerboard")


# ----------------------------------------------------------------------------------------------------------------------
# Class-sparse aggregation and bound (docs/method.md#class-sparse) against the dense forms, in float64
# ----------------------------------------------------------------------------------------------------------------------


def _sparse_cases(classes: int = 7, seed: int = 0):
    """(name, masks [6,C,5,6] float64, labels): random masks; masks on a 3-value grid (many ties in both maxima);
    the zero-head start (every mask 0.5). Labels: image 0 no class, image 1 every class, the rest random."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(6, classes, generator=g) < 0.35).double()
    labels[0], labels[1] = 0.0, 1.0
    labels[2, :] = 0.0
    labels[2, classes - 1] = 1.0  # the last class alone: the gather's padding and the top-k order
    random = torch.rand(6, classes, 5, 6, generator=g, dtype=torch.float64)
    grid = torch.randint(1, 4, (6, classes, 5, 6), generator=g).double() / 4
    zero_head = torch.full((6, classes, 5, 6), 0.5, dtype=torch.float64)
    return [("random", random, labels), ("ties", grid, labels), ("zero_head", zero_head, labels)]


def _grads(fn, masks, weights):
    """fn's outputs, and the gradient w.r.t. masks of sum_i <weights_i, output_i>."""
    masks = masks.clone().requires_grad_(True)
    outs = fn(masks)
    total = sum((o * w).sum() for o, w in zip(outs, weights))
    return [o.detach() for o in outs], torch.autograd.grad(total, masks)[0]


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [3, 64])
def test_class_sparse_m_n_equal_the_dense_ones_values_and_gradients(monkeypatch, chunk):
    """m and n from the K gathered ground-truth masks and a sliced absent-class max equal the dense [B,C,H,W]
    torch.where + amax forms exactly, gradients included (amax's tie rule: equal shares to every class attaining the
    max), for images with no class and with every class, on random masks, on tied masks and at the zero-head start.
    chunk 3: the absent-class max runs over several slices of classes."""
    monkeypatch.setattr(losses, "CLASS_CHUNK", chunk)
    g = torch.Generator().manual_seed(1)
    for name, masks, labels in _sparse_cases():
        weights = [torch.randn(6, 1, 5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
        sparse, grad_sparse = _grads(lambda x, y=labels: aggregate_masks(x, y), masks, weights)
        dense, grad_dense = _grads(lambda x, y=labels: _dense_aggregate_masks(x, y), masks, weights)
        assert torch.equal(sparse[0], dense[0]) and torch.equal(sparse[1], dense[1]), name
        assert torch.allclose(grad_sparse, grad_dense, rtol=1e-15, atol=0), (name, (grad_sparse - grad_dense).abs())
        assert sparse[0][0].abs().sum() == 0 and sparse[1][1].abs().sum() == 0  # no class: m = 0; every class: n = 0


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [3, 64])
def test_exact_n_from_head_resolution_logits_equals_the_dense_upsampled_one(monkeypatch, chunk):
    """loss.non_target_max=exact from head-resolution logits (5 x 6 -> 20 x 24): m and n, values and gradients, are
    those of upsampling all C maps and taking the dense maxima, on random logits, on logits on a 3-value grid (ties,
    also after upsampling where two classes share their 4 corners) and at the zero-head start (all logits 0, all
    classes tie). A scale of 4 makes the bilinear weights dyadic, so tied classes' upsampled values are exact in both
    forms: at other scales the CPU kernel's last bit depends on how many maps one call upsamples, and whether two
    different classes still tie after upsampling is then rounding (in the dense form as much as here)."""
    monkeypatch.setattr(losses, "CLASS_CHUNK", chunk)
    g = torch.Generator().manual_seed(4)
    for name, masks, labels in _sparse_cases():
        logits = masks - 0.5  # the zero-head start: every logit 0
        weights = [torch.randn(6, 1, 20, 24, generator=g, dtype=torch.float64) for _ in range(2)]

        def sparse_fn(x, y=labels):
            split = split_classes(x, y, logits=True, size=(20, 24), non_target="exact")
            return [split.m, split.n]

        def dense_fn(x, y=labels):
            full = F.interpolate(x, size=(20, 24), mode="bilinear", align_corners=False)
            return list(_dense_aggregate_masks(torch.sigmoid(full), y))

        sparse, grad_sparse = _grads(sparse_fn, logits, weights)
        dense, grad_dense = _grads(dense_fn, logits, weights)
        for a, b in zip(sparse, dense):
            assert torch.allclose(a, b, rtol=1e-15, atol=1e-16), (name, (a - b).abs().max())
        # the adjoint of upsampling adds up several contributions per head pixel: only their order may differ
        assert torch.allclose(grad_sparse, grad_dense, rtol=1e-13, atol=1e-15), (name, (grad_sparse - grad_dense).abs())


@pytest.mark.numerics
def test_zero_head_start_splits_n_evenly_over_the_absent_classes():
    """At the zero-head start every mask is 0.5, so every absent class attains n's max: each gets an equal share of
    n's gradient (no absent channel starts as the one pushed down alone), and m's is shared by the present ones."""
    masks = torch.full((1, 5, 2, 2), 0.5, dtype=torch.float64, requires_grad=True)
    labels = t([[0.0, 1.0, 0.0, 1.0, 0.0]])
    m, n = aggregate_masks(masks, labels)
    grad_m, = torch.autograd.grad(m.sum(), masks, retain_graph=True)
    grad_n, = torch.autograd.grad(n.sum(), masks)
    assert grad_n[0, [0, 2, 4]].eq(1 / 3).all() and grad_n[0, [1, 3]].eq(0).all()
    assert grad_m[0, [1, 3]].eq(1 / 2).all() and grad_m[0, [0, 2, 4]].eq(0).all()


@pytest.mark.numerics
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_class_sparse_area_bound_equals_the_dense_one(reduction):
    """The bound sorting only the K gathered ground-truth masks equals the dense one that sorts all B x C masks."""
    for name, masks, labels in _sparse_cases(seed=2):
        weights = [torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)]
        sparse, grad_sparse = _grads(lambda x, y=labels: [area_bound(x, y, 0.05, 0.3, reduction)], masks, weights)
        dense, grad_dense = _grads(lambda x, y=labels: [_dense_area_bound(x, y, 0.05, 0.3, reduction)], masks, weights)
        # one sort per mask either way; only the order of adding the per-class values may differ
        assert torch.allclose(sparse[0], dense[0], rtol=1e-14, atol=0), (name, (sparse[0] - dense[0]).abs().max())
        assert torch.allclose(grad_sparse, grad_dense, rtol=1e-14, atol=0), name
        assert sparse[0][0] == 0.0


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [3, 64])
def test_split_from_logits_equals_the_dense_forms_on_the_sigmoid(monkeypatch, chunk):
    """What the step uses: split_classes on the explainer's logits (S never materialised) gives the gathered masks,
    m, n and the bound of the dense forms on S = sigmoid(logits), with equal gradients w.r.t. the logits; logits 0
    is the zero-head start."""
    monkeypatch.setattr(losses, "CLASS_CHUNK", chunk)
    g = torch.Generator().manual_seed(4)
    for name, masks, labels in _sparse_cases(seed=5):
        logits = torch.logit(masks.clamp(0.05, 0.95)) if name != "random" else torch.randn(masks.shape, generator=g,
                                                                                             dtype=torch.float64)
        weights = [torch.randn(6, 1, 5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
        weights.append(torch.randn(6, generator=g, dtype=torch.float64))

        def sparse_fn(x, y=labels):
            split = split_classes(x, y, logits=True)
            return [split.m, split.n, area_bound(None, y, split=split)]

        def dense_fn(x, y=labels):
            s = torch.sigmoid(x)
            return [*_dense_aggregate_masks(s, y), _dense_area_bound(s, y, 0.05, 0.3, "sum")]

        sparse, grad_sparse = _grads(sparse_fn, logits, weights)
        dense, grad_dense = _grads(dense_fn, logits, weights)
        for a, b in zip(sparse, dense):
            assert torch.allclose(a, b, rtol=1e-15, atol=0), name
        assert torch.allclose(grad_sparse, grad_dense, rtol=1e-13, atol=1e-17), (name, (grad_sparse - grad_dense).abs())


def test_present_classes_fixed_shape_and_the_cap():
    labels = t([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
    index, valid = present_classes(labels)
    assert index.shape == (3, 3)
    assert [index[i][valid[i]].tolist() for i in range(3)] == [[1, 3], [], [0, 1, 2]]  # ascending class order
    capped, valid_capped = present_classes(labels, max_classes=4)
    assert capped.shape == (3, 4) and valid_capped.sum().item() == 5
    with pytest.raises(ValueError, match=r"max_classes_per_image is 2, but image\(s\) \[2\] of this batch have \[3\]"):
        present_classes(labels, max_classes=2)
    masks = torch.rand(3, 4, 3, 3, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(aggregate_masks(masks, labels, 4), aggregate_masks(masks, labels)))
    cfg = LossConfig(max_classes_per_image=2)
    logits = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_classes_per_image"):
        wysiwyc_loss(masks, labels, logits, logits, cfg)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_from_half_precision_logits_matches_the_dense_form(dtype):
    """Under autocast the explainer's logits are bf16/fp16 (the gradient is written in that dtype, its present-class
    part through an int16 view): the same m, n and gathered masks as the dense form on sigmoid(float(logits)), and
    gradients equal to within one rounding of that dtype."""
    g = torch.Generator().manual_seed(6)
    for name, masks, labels in _sparse_cases(seed=7):
        logits = (torch.randn(masks.shape, generator=g) if name == "random" else torch.logit(masks.float())).to(dtype)
        weights = [torch.randn(6, 1, 5, 6, generator=g) for _ in range(2)] + [torch.randn(6, generator=g)]

        def sparse_fn(x, y=labels):
            split = split_classes(x, y, logits=True)
            return [split.m, split.n, area_bound(None, y, split=split)]

        def dense_fn(x, y=labels):
            s = torch.sigmoid(x.float())
            return [*_dense_aggregate_masks(s, y), _dense_area_bound(s, y, 0.05, 0.3, "sum")]

        sparse, grad_sparse = _grads(sparse_fn, logits, weights)
        dense, grad_dense = _grads(dense_fn, logits, weights)
        assert grad_sparse.dtype == dtype
        for a, b in zip(sparse, dense):
            assert torch.allclose(a, b, rtol=1e-6, atol=0), name
        eps = torch.finfo(dtype).eps
        assert torch.allclose(grad_sparse.float(), grad_dense.float(), rtol=eps, atol=1e-30), name
