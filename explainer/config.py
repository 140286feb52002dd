"""Typed run configuration: dataclasses loaded from YAML, with dotted command-line overrides.

Validation is strict on purpose: a typo in a sweep or a preset must fail before any shard is read or any GPU hour is
spent, with a message that names the offending key and what would have been accepted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from explainer.run_errors import InputError


class ConfigError(InputError):
    """A config file or override that does not match the schema (a ValueError, exit status 2)."""


# ----------------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the shards are and how they are turned into batches."""

    manifest: str = "shards/synthetic/manifest.json"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    image_size: int = 224
    # how an image becomes image_size x image_size, in training, evaluation and explain (recorded in explainer.pt):
    # squash (the paper presets: aspect ratio lost), center_crop (borders unseen), letterbox (padded, mean colour)
    resize: Literal["squash", "center_crop", "letterbox"] = "squash"
    batch_size: int = 16  # of a one-process run; with N processes see optim.batch_policy
    num_workers: int = 2
    shuffle_buffer: int = 1000
    augment: bool = False
    drop_unlabelled: bool = True  # docs/method.md#data-coco: images without classes are left out of explainer training
    # auto: on CUDA the trainer's loaders send uint8 NHWC batches (pinned) and the images are normalised on the GPU
    # (a quarter of the host-to-device bytes, no float work on the loader side); on: also on CPU; off: never
    normalize_on_device: Literal["auto", "on", "off"] = "auto"
    # A manifest is data, not code: its shards must be files in its own folder unless allowed here. 'pipe:' shards
    # (a shell command) are never run; URL shards (s3, gs, az, https, any fsspec protocol) are read when their
    # protocol is listed in allow_url_schemes. A manifest may itself be a URL (s3://bucket/x/manifest.json): its
    # relative shards are objects in that folder. Credentials: the storage tools' own places, never here.
    allow_external_shards: bool = False  # absolute shard paths, or paths leading out of the manifest's folder
    allow_url_schemes: list[str] = field(default_factory=list)  # e.g. [s3] or [https]
    remote_timeout_s: float = 60.0  # one request to a URL shard; then it counts as failed (docs/training.md)
    remote_retries: int = 5  # further tries of a failed request (5xx, throttling, reset, timeout), with backoff
    # a shard that cannot be read whole (unreadable after the retries, ended early, checksum mismatch): skip = a
    # reported bad shard, its samples counted as skipped; stop = every rank stops after the same step, the error
    # naming the shard (exit 1; evaluate writes no tables). A corrupt sample in a good shard is skipped either way.
    on_bad_shard: Literal["skip", "stop"] = "skip"
    # Images declaring more pixels (W x H) are skipped unread, like corrupt ones (PIL's Image.MAX_IMAGE_PIXELS default;
    # null: no cap): a small PNG can declare 12000 x 12000 and take 10 GB to decode.
    max_image_pixels: int | None = 89_478_485


@dataclass
class ClassifierModelConfig:
    """The Explanandum: a multi-label classifier (frozen during explainer training)."""

    arch: Literal["vgg16", "resnet50", "resnet18", "resnet34", "mobilenet_v3_small", "tiny_cnn"] = "resnet50"
    checkpoint: str | None = None  # our fine-tuned checkpoint (train_classifier output); required by train.py
    imagenet_weights: str | None = None  # local torchvision state-dict file; no download at run time
    finetune_backbone: bool = False  # docs/method.md#explanandum: reference trains the new head only
    # Bring your own Explanandum (explainer training and evaluation): at most one of the three sources below; with
    # none of them, `checkpoint` is one of ours. With `torchvision` or `factory`, `checkpoint` is a plain state dict.
    torchvision: str | None = None  # any torchvision classification model name (torchvision.models.get_model)
    torchvision_weights: str | None = None  # weights enum name (e.g. IMAGENET1K_V1) read from the local torch cache
    factory: str | None = None  # "my_pkg.models:build": a callable returning an nn.Module
    factory_kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
    torchscript: str | None = None  # a TorchScript file (torch.jit.save), the most black-box form
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # input normalisation of the
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # classifier (ImageNet by default)


@dataclass
class ExplainerModelConfig:
    """The Explainer: a dense network with one logit map per class, at input resolution."""

    arch: Literal[
        "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
        "tiny_unet",
    ] = "deeplabv3_resnet50"
    backbone_weights: str | None = None  # local ImageNet backbone file; default is training from scratch
    head_init: Literal["random", "zero"] = "random"  # mask head's last conv; "zero": every mask 0.5 at step 0


@dataclass
class LossConfig:
    """Loss weights (docs/method.md#total-loss); names follow the reference code."""

    kind: Literal["wysiwyc", "rtis"] = "wysiwyc"
    lambda_e: float = 1.0  # entropy of the inverse-masked prediction
    lambda_tv: float = 1.0  # total variation of m and n
    w_bound: float = 1.0  # area bound per ground-truth class mask
    w_m: float = 0.1  # area of the target mask
    w_n: float = 0.3  # area of the non-target mask
    # Ours; 0 = the reference objective. Weight of L_s: one class's mask ALONE must make F see that class and no
    # other (docs/method.md#class-specific-term). Costs one more classifier pass on the batch.
    w_class_specific: float = 0.0
    area_min: float = 0.05  # a
    area_max: float = 0.30  # b
    bound_reduction: Literal["sum", "mean"] = "sum"  # reference sums over GT classes; the paper's eq. 6 averages
    classification: Literal["bce", "ce"] = "bce"  # bce: reference (multi-label); ce: softmax cross entropy (ours)
    # Ground-truth classes per image the class-sparse loss gathers (docs/method.md#class-sparse): null = the batch's
    # largest count (read from the labels each step); an int fixes the shape, and a batch with an image above it stops
    # with an error naming the image.
    max_classes_per_image: int | None = None
    # n for an Explainer whose head is below the input resolution (docs/method.md#head-resolution): exact = the max of
    # the upsampled absent-class logits (the reference's numbers, streamed over class slices: O(C) at full resolution,
    # the paper presets' choice); head = the upsampled max of the head-resolution ones (an upper bound of it, O(C) at
    # the head's resolution only: the default, since exact costs 4x a 20-class step at 1000 classes). Same numbers
    # for a full-resolution head (tiny U-Net).
    non_target_max: Literal["exact", "head"] = "head"
    # RTIS (Dabkowski and Gal 2017) weights, used when kind == "rtis"
    rtis_tv: float = 10.0
    rtis_area: float = 1.0
    rtis_destroyer: float = 5.0
    rtis_destroyer_power: float = 0.3
    rtis_alternative: Literal["blur", "noise"] = "blur"


@dataclass
class OptimConfig:
    optimizer: Literal["adam", "sgd"] = "adam"  # the reference uses Adam; plain SGD is for exact-comparison tests
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_scaling: Literal["none", "linear"] = "none"  # none: reference lr whatever the global batch
    reference_batch: int = 16  # global batch the reference lr was tuned for
    # How N processes relate to the one-process config (README "Training"): reproduce keeps the global batch at
    # data.batch_size x grad_accum_steps (each process gets data.batch_size / N); scale keeps data.batch_size per
    # process and multiplies lr by N, with a linear warm-up. Identical with one process.
    batch_policy: Literal["reproduce", "scale"] = "reproduce"
    warmup_steps: int | None = None  # linear lr warm-up; default: none, or 5% of the steps when scale raises lr
    grad_accum_steps: int = 1
    grad_clip_norm: float | None = None


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 100
    max_steps: int | None = None  # optimiser steps; stops earlier than epochs when set
    steps_per_epoch: int | None = None  # default: train samples // global batch (from the manifest)
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    dtype: Literal["float32", "float64"] = "float32"  # float64 (with mixed_precision=no): exact-comparison tests
    channels_last: bool = False
    compile: bool = False
    sync_batchnorm: bool = False  # DeepLabV3 has BatchNorm: share its statistics across GPUs (CUDA, > 1 process)
    val_every_steps: int | None = None  # default: once per epoch
    val_max_batches: int | None = None
    early_stop_patience: int = 5  # in validations
    early_stop_min_delta: float = 1e-3
    output_dir: str = "runs/explainer"
    keep_last: int = 2
    checkpoint_every_steps: int | None = None  # default: at each validation
    resume: str | None = None  # "auto", a checkpoint folder, or none
    log_every_steps: int = 10
    image_log_every_steps: int = 200
    image_log_count: int = 8
    max_bad_steps: int = 5  # consecutive non-finite losses before stopping
    # CUDA fast paths and multi-process settings (explainer/distributed.py)
    cudnn_benchmark: bool = True  # fixed input shapes: let cuDNN time its convolution algorithms once
    process_group_timeout_min: float = 30.0  # a collective waiting longer fails (torch default: 10 min NCCL)
    ddp_gradient_as_bucket_view: bool = True  # gradients live in DDP's buckets: one copy less, less memory
    ddp_broadcast_buffers: bool | None = None  # null: off when BatchNorm is synced (sync_batchnorm on CUDA), else on
    ddp_comm_hook: Literal["none", "fp16", "bf16"] = "none"  # compress gradients for the all-reduce (multi-node)
    ddp_bucket_cap_mb: int = 25


@dataclass
class TrackingConfig:
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: offline without an API key
    project: str = "explainer"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    run_id: str | None = None  # fixed id so a requeued job continues the same W&B run
    run_name: str | None = None


@dataclass
class EvalConfig:
    methods: list[str] = field(default_factory=lambda: ["explainer"])
    max_images: int | None = None
    # Table 1's classes; default: all up to 100 classes, above: 20 of the classes present in the evaluated test
    # images, drawn with seed 0 (explainer/evaluate.py:default_class_specific; the report names them)
    class_specific_classes: list[str] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    rise_masks: int = 8000
    rise_cells: int = 7
    rise_p: float = 0.5
    rise_batch: int = 100
    ep_areas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3])
    ep_iterations: int = 800
    gradcam_layer: str | None = None  # a module name such as "features.28"; default: the last spatial conv block
    faithfulness_steps: int = 32  # deletion / insertion curve steps K (Petsiuk et al. 2018); 0 = off
    # class probability on the curves; auto: softmax when loss.classification is ce, else sigmoid
    faithfulness_prob: Literal["auto", "sigmoid", "softmax"] = "auto"
    deletion_substrate: Literal["zero", "blur"] = "zero"  # deleted pixels: 0 (RISE's) or the insertion blur
    faithfulness_rise: bool = True  # also the RISE code's protocol (top-1 class, softmax, its step sizes)
    pointing_tolerance: float = 15.0  # pointing game tolerance in px of the ORIGINAL image (TorchRay's 15)
    # WSOL localization (explainer/wsol.py: MaxBoxAccV2, PxAP as Choe et al. 2020) for every method; frame
    # "reference": maps and boxes in wsolevaluation's 224 x 224, "image": the model input's size
    wsol: bool = True
    wsol_frame: Literal["reference", "image"] = "reference"
    wsol_curve_interval: float = 0.01  # the reference's cam_curve_interval
    output_dir: str | None = None  # default: <run>/eval
    process_group_timeout_min: float = 180.0  # ranks may finish their share minutes apart (EP, RISE)


@dataclass
class ExplainerRunConfig:
    """Everything train.py needs; saved resolved with every run."""

    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    explainer: ExplainerModelConfig = field(default_factory=ExplainerModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ClassifierRunConfig:
    """Everything train_classifier.py needs."""

    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/classifier"))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------------------------------------------------
# Loading, overriding, validating
# ----------------------------------------------------------------------------------------------------------------------

T = TypeVar("T")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp)
        return f"a list of {_describe(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats). Raise ConfigError otherwise."""
    origin = get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off/yes/on as a bool
            spelled = [v for v in _BOOL_WORDS[value] if v in get_args(tp)]
            value = spelled[0] if spelled else value
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} is not valid; expected {_describe(tp)}")
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        finite = [e for e in errors if "must be a finite number" in e]  # the precise reason, e.g. float | None
        raise ConfigError(finite[0] if finite else f"{where}: {value!r} is not valid; expected {_describe(tp)}")
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping with string keys, got {type(value).__name__} {value!r}")
        return dict(value)  # values are passed on as YAML gave them (factory keyword arguments)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")
        (inner,) = get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):  # an lr or loss weight of inf/nan poisons the weights at the first step
                raise ConfigError(f"{where}: must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{where}: unsupported annotation {tp!r}")
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type[T], raw: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key '{key}'; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def from_mapping(cls: type[T], raw: dict[str, Any], where: str) -> T:
    """A typed dataclass from a mapping, with the config's checks; also for JSON state files (checkpoint meta.json)."""
    return _build(cls, raw, where)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["loss.lambda_e=3", "tracking.tags=[a,b]"] into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, text = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"override '{item}': the value is not valid YAML ({reason})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (its own text spans several lines with a caret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem is None:
        return " ".join(str(exc).split())
    return problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}); errors name the file."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{what} {path}: line {line} is not UTF-8 text; is it the YAML file you meant?") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must contain a mapping at the top level")
    return loaded


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML file <- dotted overrides, validated against `cls`."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = read_yaml_mapping(path, "config file")
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        cfg = _build(cls, raw, "")
    except ConfigError as exc:
        where = f" (in {path}{' or the command-line overrides' if overrides else ''})" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from None
    check_config(cfg)
    return cfg


def check_config(cfg: Any) -> None:
    """Cross-field checks that types alone cannot express; the first failing one is raised, naming its key."""
    for section, checks_of in _SECTION_CHECKS:
        value = getattr(cfg, section, None)
        if value is None:
            continue
        for ok, message in checks_of(value, cfg):
            if not ok:
                raise ConfigError(message)


Checks = list[tuple[bool, str]]


def _data_checks(data: DataConfig, cfg: Any) -> Checks:
    return [
        (data.image_size >= 16, f"data.image_size must be >= 16, got {data.image_size}"),
        (data.batch_size >= 1, f"data.batch_size must be >= 1, got {data.batch_size}"),
        (data.num_workers >= 0, f"data.num_workers must be >= 0, got {data.num_workers}"),
        (data.max_image_pixels is None or data.max_image_pixels >= 1,
         f"data.max_image_pixels must be >= 1 or null (no cap), got {data.max_image_pixels}"),
        (data.remote_timeout_s > 0, f"data.remote_timeout_s must be > 0, got {data.remote_timeout_s}"),
        (data.remote_retries >= 0, f"data.remote_retries must be >= 0, got {data.remote_retries}"),
        (data.on_bad_shard in ("skip", "stop"), f"data.on_bad_shard must be skip or stop, got {data.on_bad_shard!r}"),
    ]


def _loss_checks(loss: LossConfig, cfg: Any) -> Checks:
    return [
        (0.0 <= loss.area_min <= loss.area_max <= 1.0,
         f"loss.area_min/area_max must satisfy 0 <= a <= b <= 1, got {loss.area_min}, {loss.area_max}"),
        (loss.w_class_specific >= 0, f"loss.w_class_specific must be >= 0, got {loss.w_class_specific}"),
        (loss.kind == "wysiwyc" or loss.w_class_specific == 0,
         f"loss.w_class_specific is a term of the wysiwyc objective; set it to 0 with loss.kind={loss.kind}"),
        (loss.max_classes_per_image is None or loss.max_classes_per_image >= 1,
         f"loss.max_classes_per_image must be >= 1 or null, got {loss.max_classes_per_image}"),
    ]


def _classifier_checks(classifier: ClassifierModelConfig, cfg: Any) -> Checks:
    sources = [k for k in ("torchvision", "factory", "torchscript") if getattr(classifier, k)]
    return [
        (len(sources) <= 1, f"classifier: set at most one of torchvision, factory, torchscript (got {sources})"),
        (len(classifier.mean) == 3 and len(classifier.std) == 3 and all(s > 0 for s in classifier.std),
         f"classifier.mean/std must be 3 numbers each (std > 0), got {classifier.mean}, {classifier.std}"),
        (classifier.factory is None or classifier.factory.count(":") == 1,
         f"classifier.factory must look like 'package.module:callable', got {classifier.factory!r}"),
        (not (classifier.torchscript and classifier.checkpoint),
         "classifier.checkpoint must be null with classifier.torchscript (the TorchScript file holds the weights)"),
        (not (classifier.torchvision_weights and classifier.checkpoint),
         "classifier: set classifier.checkpoint (a state-dict file) or classifier.torchvision_weights (from the "
         "local torchvision cache), not both"),
        (classifier.torchvision_weights is None or classifier.torchvision is not None,
         "classifier.torchvision_weights needs classifier.torchvision (the model name)"),
        (not isinstance(cfg, ClassifierRunConfig) or not (classifier.factory or classifier.torchscript
                                                          or classifier.torchvision_weights),
         "train_classifier puts our head on classifier.arch or classifier.torchvision with classifier."
         "imagenet_weights; classifier.factory, torchscript and torchvision_weights are for explaining a "
         "classifier as it is"),
    ]


def _optim_checks(optim: OptimConfig, cfg: Any) -> Checks:
    return [
        (optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}"),
        (optim.grad_accum_steps >= 1, f"optim.grad_accum_steps must be >= 1, got {optim.grad_accum_steps}"),
        (optim.warmup_steps is None or optim.warmup_steps >= 0,
         f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}"),
        (optim.lr_scaling == "none",
         "optim.lr_scaling=linear is replaced by optim.batch_policy=scale (lr x processes, with warm-up)"),
    ]


def _train_checks(train: TrainConfig, cfg: Any) -> Checks:
    return [
        (train.keep_last >= 1, f"train.keep_last must be >= 1, got {train.keep_last}"),
        *_step_count_checks(train),
        (train.process_group_timeout_min > 0,
         f"train.process_group_timeout_min must be > 0, got {train.process_group_timeout_min}"),
        (train.ddp_bucket_cap_mb >= 1, f"train.ddp_bucket_cap_mb must be >= 1, got {train.ddp_bucket_cap_mb}"),
        (train.dtype == "float32" or train.mixed_precision == "no",
         f"train.dtype={train.dtype} needs train.mixed_precision=no, got {train.mixed_precision!r}"),
        (train.resume in (None, "auto") or Path(train.resume).exists(),
         f"train.resume must be 'auto', null or an existing checkpoint folder, got {train.resume!r}"),
    ]


def _eval_checks(ev: EvalConfig, cfg: Any) -> Checks:
    return [(ev.process_group_timeout_min > 0,
             f"eval.process_group_timeout_min must be > 0, got {ev.process_group_timeout_min}")]


def _step_count_checks(train: TrainConfig) -> list[tuple[bool, str]]:
    """Counts whose 0 or negative value used to mean something silently (an untrained export, the default)."""
    def at_least(name: str, low: int, hint: str = "") -> tuple[bool, str]:
        value = getattr(train, name)
        return (value is None or value >= low, f"train.{name} must be >= {low}{hint}, got {value}")

    return [
        at_least("epochs", 1),
        at_least("max_steps", 0, " (0 exports the untrained start weights; null: train for train.epochs)"),
        at_least("steps_per_epoch", 1, " (null: the train split's size)"),
        at_least("val_every_steps", 1, " (null: once per epoch)"),
        at_least("val_max_batches", 1, " (null: the whole split)"),
        at_least("checkpoint_every_steps", 1, " (null: at each validation)"),
        at_least("log_every_steps", 1),
        at_least("image_log_every_steps", 0, " (0: off)"),
        at_least("image_log_count", 0),
        at_least("max_bad_steps", 1),
        at_least("early_stop_patience", 1),
        (not Path(train.output_dir).exists() or Path(train.output_dir).is_dir(),
         f"train.output_dir={train.output_dir!r} exists and is not a folder"),
    ]


# section of a run config -> its checks, in the order they are reported
_SECTION_CHECKS: tuple[tuple[str, Callable[[Any, Any], Checks]], ...] = (
    ("data", _data_checks),
    ("loss", _loss_checks),
    ("classifier", _classifier_checks),
    ("optim", _optim_checks),
    ("train", _train_checks),
    ("eval", _eval_checks),
)


def input_normalization(cfg: Any) -> dict[str, tuple[float, ...]]:
    """{"mean", "std"} of the classifier's inputs for the data loaders ({} when the config has no classifier)."""
    clf = getattr(cfg, "classifier", None)
    return {} if clf is None else {"mean": tuple(clf.mean), "std": tuple(clf.std)}


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file then rename)."""
    from explainer.atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# Config keys holding a file or folder path; a relative one means relative to the working directory of the command.
PATH_KEYS = ("data.manifest", "classifier.checkpoint", "classifier.imagenet_weights", "classifier.torchscript",
             "explainer.backbone_weights", "train.output_dir", "train.resume", "eval.output_dir")


def _path_fields(cfg: Any) -> list[tuple[Any, str, str]]:
    """(section object, field name, value) of every PATH_KEYS entry this config has and sets (not train.resume=auto)."""
    out = []
    for key in PATH_KEYS:
        section_name, name = key.split(".")
        section = getattr(cfg, section_name, None)
        value = getattr(section, name, None)
        if isinstance(value, str) and value and not (key == "train.resume" and value == "auto"):
            out.append((section, name, value))
    return out


def with_absolute_paths(cfg: T) -> T:
    """A copy of `cfg` with every relative path made absolute (from the working directory): what a run folder's
    config.yaml stores, so that it means the same files from any directory."""
    cfg = copy.deepcopy(cfg)
    for section, name, value in _path_fields(cfg):
        setattr(section, name, os.path.abspath(os.path.expanduser(value)))
    return cfg


def resolve_run_paths(cfg: T, run_dir: str | os.PathLike) -> T:
    """A run folder's config with relative paths that do not exist from here looked up where the run was started:
    the run folder minus a relative train.output_dir (runs/x started in /repo lives in /repo/runs/x), else the run
    folder itself. Configs written before paths were stored absolute (with_absolute_paths) used relative ones."""
    cfg = copy.deepcopy(cfg)
    run_dir = Path(run_dir).resolve()
    bases = [run_dir]
    out = Path(cfg.train.output_dir) if hasattr(cfg, "train") else None
    if out is not None and not out.is_absolute() and run_dir.parts[-len(out.parts):] == out.parts:
        bases.insert(0, Path(*run_dir.parts[:-len(out.parts)]))
    for section, name, value in _path_fields(cfg):
        if name == "output_dir" or os.path.isabs(value) or os.path.exists(value):
            continue
        found = next((base / value for base in bases if (base / value).exists()), None)
        if found is not None:
            setattr(section, name, str(found))
    return cfg


def config_hash(cfg: Any) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:10]
