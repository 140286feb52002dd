"""Config loading: presets match docs/method.md#presets, overrides apply, and every kind of mistake names its key."""

from pathlib import Path

import pytest

from explainer.config import (
    ClassifierRunConfig,
    ConfigError,
    ExplainerRunConfig,
    load_config,
    parse_overrides,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]

# docs/method.md#presets: config -> (lr, l_e, l_tv, w_B, w_m, w_n, patience)
REFERENCE = {
    "voc_vgg16": (1e-5, 1.0, 1.0, 1.0, 0.1, 0.3, 5),
    "voc_resnet50": (1e-4, 3.0, 1.0, 0.8, 0.01, 0.3, 5),
    "coco_vgg16": (1e-5, 1.0, 0.3, 0.3, 0.03, 0.1, 2),
    "coco_resnet": (1e-5, 3.0, 0.05, 0.1, 0.01, 0.03, 2),
}


# Presets that validate on a step schedule count patience in validations; docs/method.md#presets counts epochs of the
# reference global batch 16 (VOC-2007 train: 2501 images = 156 steps).
STEPS_PER_EPOCH = {"voc_vgg16": 2501 // 16, "voc_resnet50": 2501 // 16}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_presets_match_spec(name):
    cfg = load_config(ExplainerRunConfig, ROOT / "configs" / f"{name}.yaml")
    patience = cfg.train.early_stop_patience
    if cfg.train.val_every_steps:
        patience = patience * cfg.train.val_every_steps / STEPS_PER_EPOCH[name]
    got = (cfg.optim.lr, cfg.loss.lambda_e, cfg.loss.lambda_tv, cfg.loss.w_bound, cfg.loss.w_m, cfg.loss.w_n, patience)
    assert got == REFERENCE[name]
    assert (cfg.loss.area_min, cfg.loss.area_max, cfg.data.image_size, cfg.data.batch_size) == (0.05, 0.30, 224, 16)
    assert cfg.loss.bound_reduction == "sum" and cfg.train.early_stop_min_delta == 1e-3
    assert cfg.loss.w_class_specific == 0  # our class-specific term is off: the paper's objective
    assert cfg.explainer.arch == "deeplabv3_resnet50"


def test_every_shipped_config_validates():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(ExplainerRunConfig, path)
    for path in sorted((ROOT / "configs" / "classifier").glob("*.yaml")):
        load_config(ClassifierRunConfig, path)


def test_overrides_are_typed_and_nested():
    cfg = load_config(ExplainerRunConfig, ROOT / "configs" / "coco_resnet.yaml",
                      ["loss.lambda_e=2", "tracking.tags=[a, b]", "optim.grad_clip_norm=1.5", "train.max_steps=7"])
    assert cfg.loss.lambda_e == 2.0 and isinstance(cfg.loss.lambda_e, float)
    assert cfg.tracking.tags == ["a", "b"]
    assert cfg.optim.grad_clip_norm == 1.5 and cfg.train.max_steps == 7
    assert cfg.loss.lambda_tv == 0.05  # untouched keys keep the file's values
    assert parse_overrides(["a.b.c=x", "a.d=3"]) == {"a": {"b": {"c": "x"}, "d": 3}}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("loss.lambda_x=1", "unknown key 'loss.lambda_x'; valid keys in loss: kind, lambda_e"),
        ("lossy.lambda_e=1", "unknown key 'lossy'"),
        ("train.mixed_precision=fp8", "train.mixed_precision: 'fp8' is not valid; expected one of 'no', 'fp16'"),
        ("data.batch_size=1.5", "data.batch_size: expected int"),
        ("data.augment=maybe", "data.augment: expected bool"),
        ("explainer.arch=unet9000", "explainer.arch: 'unet9000' is not valid"),
        ("loss.area_min=0.5", "loss.area_min/area_max"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("loss.w_class_specific=-1", "loss.w_class_specific must be >= 0"),
        ("loss.max_classes_per_image=0", "loss.max_classes_per_image must be >= 1 or null"),
        ("train.resume=/nonexistent/ckpt", "train.resume must be 'auto'"),
        ("nodots", "not of the form key.sub=value"),
        # issue 17: inf passed `lr > 0` and nan passed every loss-weight check; both poison the weights at step 1
        ("optim.lr=inf", "optim.lr: must be a finite number, got 'inf'"),
        ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
        ("loss.lambda_e=nan", "loss.lambda_e: must be a finite number, got 'nan'"),
        ("loss.area_max=.nan", "loss.area_max: must be a finite number"),
        ("classifier.std=[0.2,inf,0.2]", "classifier.std[1]: must be a finite number"),
        ("optim.grad_clip_norm=-inf", "optim.grad_clip_norm: must be a finite number, got '-inf'"),
        # issue 17: these meant "export an untrained model" or "the default" without saying so
        ("train.max_steps=-1", "train.max_steps must be >= 0 (0 exports the untrained start weights"),
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
        ("train.checkpoint_every_steps=0", "train.checkpoint_every_steps must be >= 1 (null: at each validation)"),
        ("train.val_every_steps=0", "train.val_every_steps must be >= 1"),
        ("train.log_every_steps=0", "train.log_every_steps must be >= 1"),
        ("optim.lr=[unclosed", "override 'optim.lr=[unclosed': the value is not valid YAML"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(ExplainerRunConfig, ROOT / "configs" / "voc_vgg16.yaml", [override])
    assert needle in str(err.value)


def test_class_specific_term_is_refused_with_the_rtis_objective():
    with pytest.raises(ConfigError, match="w_class_specific is a term of the wysiwyc objective"):
        load_config(ExplainerRunConfig, ROOT / "configs" / "voc_vgg16.yaml",
                    ["loss.kind=rtis", "loss.w_class_specific=1"])


def test_bad_files_are_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(ExplainerRunConfig, missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(ExplainerRunConfig, broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("loss:\n  lambda_ee: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'loss.lambda_ee'.*\(in .*typo.yaml\)"):
        load_config(ExplainerRunConfig, typo)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ExplainerRunConfig, ROOT / "configs" / "voc_resnet50.yaml", ["train.seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(ExplainerRunConfig, tmp_path / "config.yaml") == cfg
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed away


def test_yaml_no_is_not_a_bool_for_choice_keys():
    """`train.mixed_precision=no` parses as False in YAML 1.1; the choice 'no' is meant."""
    cfg = load_config(ExplainerRunConfig, None, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(ExplainerRunConfig, None, ["train.mixed_precision=yes"])


def test_exponent_without_dot_is_a_float():
    """PyYAML reads `3e-3` as a string (YAML 1.1); a float key takes it as the number it means."""
    cfg = load_config(ExplainerRunConfig, None, ["optim.lr=3e-3"])
    assert cfg.optim.lr == 0.003
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        load_config(ExplainerRunConfig, None, ["optim.lr=fast"])


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="train.output_dir=.*file' exists and is not a folder"):
        load_config(ExplainerRunConfig, None, [f"train.output_dir={tmp_path / 'file'}"])


def test_a_run_folders_config_stores_absolute_paths(tmp_path, monkeypatch):
    """Issue 26: config.yaml is read from other directories (explain, evaluate); relative paths are made absolute
    from the directory the run was started in, 'auto' and unset paths left alone, the config given untouched."""
    import os

    from explainer.config import ExplainerRunConfig, load_config, with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ExplainerRunConfig, None, ["classifier.checkpoint=clf/c.pt", "train.output_dir=runs/x",
                                                 "data.manifest=../shards/manifest.json", "train.resume=auto"])
    stored = with_absolute_paths(cfg)
    assert stored.classifier.checkpoint == str(tmp_path / "clf" / "c.pt")
    assert stored.train.output_dir == str(tmp_path / "runs" / "x")
    assert stored.data.manifest == os.path.normpath(tmp_path / ".." / "shards" / "manifest.json")
    assert stored.train.resume == "auto" and stored.classifier.torchscript is None and stored.eval.output_dir is None
    assert cfg.classifier.checkpoint == "clf/c.pt"
