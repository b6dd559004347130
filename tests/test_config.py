import dataclasses
import warnings

import pytest
import torch
import yaml

from hydrahead.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe_config,
    load_config,
    save_config,
    validate,
)


def _dotted_keys(d, prefix=""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_head_lr_falls_back_to_optim_lr():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.head.num_classes == 10000 and cfg.optim.betas == [0.9, 0.999]
    validate(cfg, world_size=1)
    assert cfg.head_lr == cfg.optim.lr == 0.1
    assert apply_overrides(cfg, ["head.lr=0.5"]).head_lr == 0.5


def test_yaml_then_overrides(tmp_path):
    path = _write(
        tmp_path,
        "head:\n  num_classes: 5000\n  margin_type: cosface\noptim:\n  lr: 0.05\ntrain:\n  steps: 7\n",
    )
    cfg = load_config(path, ["head.num_classes=1000", "model.compile=true"])
    assert cfg.head.num_classes == 1000  # the override beats the file
    assert cfg.head.margin_type == "cosface"  # file value kept
    assert cfg.optim.lr == 0.05
    assert cfg.train.steps == 7
    assert cfg.model.compile is True
    assert cfg.train.global_batch == Config().train.global_batch  # untouched default


def test_empty_yaml_and_empty_section_give_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()
    assert load_config(_write(tmp_path, "head:\n  # num_classes: 5\n")) == Config()


@pytest.mark.parametrize(
    "override, key, expected, expected_type",
    [
        ("model.compile=true", "model.compile", True, bool),
        ("model.channels_last=false", "model.channels_last", False, bool),
        ("optim.lr=1e-3", "optim.lr", 1e-3, float),  # YAML 1.1 reads this as a string
        ("optim.weight_decay=5E-4", "optim.weight_decay", 5e-4, float),
        ("optim.lr=3", "optim.lr", 3.0, float),  # an int is fine for a float
        ("head.num_classes=3", "head.num_classes", 3, int),
        ("head.num_classes=1_000_000", "head.num_classes", 1_000_000, int),
        ("train.stop_after=50", "train.stop_after", 50, int),
        ("data.path=/data/imagenet", "data.path", "/data/imagenet", str),
        ("optim.betas=[0.9,0.95]", "optim.betas", [0.9, 0.95], list),
        ("optim.betas=[1, 0]", "optim.betas", [1.0, 0.0], list),
    ],
)
def test_override_scalars_are_parsed(override, key, expected, expected_type):
    section, name = key.split(".")
    value = getattr(getattr(apply_overrides(Config(), [override]), section), name)
    assert value == expected
    assert type(value) is expected_type
    if expected_type is list:
        assert all(type(v) is float for v in value)


@pytest.mark.parametrize("null", ["null", "~", ""])
def test_null_resets_optional_fields(null):
    cfg = apply_overrides(Config(), ["head.lr=0.5", "data.path=/x", "train.stop_after=10"])
    assert (cfg.head.lr, cfg.data.path, cfg.train.stop_after) == (0.5, "/x", 10)
    cfg = apply_overrides(cfg, [f"head.lr={null}", f"data.path={null}", f"train.stop_after={null}"])
    assert (cfg.head.lr, cfg.data.path, cfg.train.stop_after) == (None, None, None)


def test_null_is_rejected_for_non_optional_field():
    with pytest.raises(ConfigError, match=r"head\.num_classes: expected int, got null"):
        apply_overrides(Config(), ["head.num_classes=null"])


def test_apply_overrides_leaves_its_input_unchanged():
    cfg = Config()
    new = apply_overrides(cfg, ["head.num_classes=7", "optim.betas=[0.5,0.5]"])
    assert new.head.num_classes == 7 and new.optim.betas == [0.5, 0.5]
    assert cfg == Config()


@pytest.mark.parametrize(
    "override, unknown, suggestion",
    [
        ("head.num_clases=5", "head.num_clases", "head.num_classes"),
        ("heda.num_classes=5", "heda.num_classes", "head.num_classes"),
        ("optim.warmup=10", "optim.warmup", "optim.warmup_steps"),
    ],
)
def test_unknown_override_key_names_key_and_suggests(override, unknown, suggestion):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [override])
    message = str(e.value)
    assert repr(unknown) in message
    assert f"did you mean {suggestion}" in message


def test_unknown_yaml_key_names_file_key_and_suggests(tmp_path):
    path = _write(tmp_path, "head:\n  num_classes: 10\n  num_clases: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert str(path) in message
    assert "'head.num_clases'" in message and "head.num_classes" in message

    # A whole unknown section.
    with pytest.raises(ConfigError, match=r"'optimizer'.*did you mean optim\b"):
        load_config(_write(tmp_path, "optimizer:\n  lr: 0.1\n"))


def test_unknown_key_in_config_from_dict():
    with pytest.raises(ConfigError, match=r"'train\.step'.*train\.steps"):
        config_from_dict({"train": {"step": 3}})


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("head.num_classes=abc", r"head\.num_classes: expected int, got 'abc'"),
        ("head.num_classes=1.5", r"head\.num_classes: expected int, got 1\.5"),
        ("train.steps=true", r"train\.steps: expected int, got true \(bool\)"),
        ("optim.lr=false", r"optim\.lr: expected float, got false \(bool\)"),
        ("model.compile=1", r"model\.compile: expected bool, got 1 \(int\)"),
        ("optim.lr=fast", r"optim\.lr: expected float, got 'fast'"),
        ("head.lr=fast", r"head\.lr: expected float \| None, got 'fast'"),
        ("run.dir=2024", r"run\.dir: expected str, got 2024 \(int\)"),
        ("optim.betas=0.9", r"optim\.betas: expected list\[float\], got 0\.9"),
        ("optim.betas=[0.9,x]", r"optim\.betas: expected list\[float\], got \[0\.9, x\]"),
    ],
)
def test_wrong_type_names_key_expected_type_and_value(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(Config(), [override])


def test_wrong_type_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 1\.5"):
        load_config(_write(tmp_path, "train:\n  steps: 1.5\n"))


def test_choices_are_enforced():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), ["head.margin_type=sphereface"])
    message = str(e.value)
    assert "head.margin_type" in message and "'sphereface'" in message
    assert "none, cosface, arcface" in message
    assert apply_overrides(Config(), ["head.margin_type=arcface"]).head.margin_type == "arcface"


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("head.num_classes", r"no '='"),
        ("=5", r"empty"),
        ("head=5", r"head is a section"),
        ("train.steps.max=1", r"train\.steps is a value of type int, not a section"),
        ("optim.betas=[0.9,", r"cannot parse"),
    ],
)
def test_malformed_overrides(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(Config(), [override])


def test_yaml_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- head.num_classes\n"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "head: [1,\n"))


def test_section_given_as_mapping_override():
    cfg = apply_overrides(Config(), ["head={num_classes: 12, margin_type: arcface}"])
    assert (cfg.head.num_classes, cfg.head.margin_type) == (12, "arcface")


def test_save_load_round_trip(tmp_path):
    cfg = apply_overrides(
        Config(),
        [
            "run.dir=runs/x",
            "train.stop_after=20",
            "head.lr=1e-3",
            "head.margin_type=arcface",
            "head.margin=0.5",
            "optim.betas=[0.8,0.95]",
            "optim.eps=1e-12",
            "model.compile=true",
            "data.path='/data/a: b'",  # needs quoting when saved
            "run.seed=-3",
        ],
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg

    # Keys appear in dataclass order, so the file reads like the config's definition.
    saved = yaml.safe_load(path.read_text())
    assert list(saved) == [f.name for f in dataclasses.fields(Config)]
    assert list(saved["head"]) == [f.name for f in dataclasses.fields(type(cfg.head))]


def test_dict_round_trip_and_partial_dicts():
    cfg = apply_overrides(Config(), ["head.num_classes=42", "optim.schedule=poly"])
    d = config_to_dict(cfg)
    assert d["head"]["num_classes"] == 42
    assert config_from_dict(d) == cfg
    partial = config_from_dict({"head": {"num_classes": 42}})
    assert partial.head.num_classes == 42 and partial.optim == Config().optim


def test_validate_global_batch_divisible_by_world_size():
    cfg = apply_overrides(Config(), ["train.global_batch=250"])
    validate(cfg)  # no world size: nothing to divide by
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"train\.global_batch=250 is not divisible .* 4"):
        validate(cfg, world_size=4)
    validate(apply_overrides(Config(), ["train.global_batch=256"]), world_size=4)


@pytest.mark.parametrize(
    "overrides, world_size, key",
    [
        (["train.global_batch=0"], None, "train.global_batch"),
        (["train.steps=0"], None, "train.steps"),
        (["train.stop_after=201"], None, "train.stop_after"),
        (["train.stop_after=0"], None, "train.stop_after"),
        (["head.num_classes=0"], None, "head.num_classes"),
        (["head.num_classes=3"], 4, "head.num_classes"),
        (["optim.warmup_steps=300"], None, "optim.warmup_steps"),
        (["optim.warmup_steps=-1"], None, "optim.warmup_steps"),
        (["model.embed_dim=0"], None, "model.embed_dim"),
        (["checkpoint.keep=0"], None, "checkpoint.keep"),
        (["log.every=0"], None, "log.every"),
        (["run.cpu_threads=0"], None, "run.cpu_threads"),
        (["data.kind=image_folder"], None, "data.path"),
        (["model.backbone=resnet18"], None, "model.backbone"),
        (["model.input_dim=32"], None, "model.input_dim"),
        (["optim.betas=[0.9]"], None, "optim.betas"),
        (["head.grad_filter=-1"], None, "head.grad_filter"),
        (["head.impl=reference", "head.grad_filter=1e-4"], None, "head.grad_filter"),
        (["model.wta_crs_keep=0"], None, "model.wta_crs_keep"),
        (["model.wta_crs_keep=1.5"], None, "model.wta_crs_keep"),
        (["head.rebuild_every=10", "head.index_max_age=9"], None, "head.index_max_age"),
    ],
)
def test_validate_rejects_bad_values(overrides, world_size, key):
    cfg = apply_overrides(Config(), overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, world_size=world_size)


def test_validate_reports_every_problem_and_checks_values_set_in_python():
    cfg = apply_overrides(Config(), ["train.steps=0", "log.every=0"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "train.steps" in str(e.value) and "log.every" in str(e.value)

    cfg = Config()
    cfg.head.margin_type = "sphereface"  # bypasses the checks made when loading
    with pytest.raises(ConfigError, match=r"head\.margin_type"):
        validate(cfg)
    cfg = Config()
    cfg.train.steps = True
    with pytest.raises(ConfigError, match=r"train\.steps: expected int"):
        validate(cfg)


def test_cpu_threads_are_pinned_when_asked_and_for_deterministic_cpu_runs():
    from hydrahead.train.trainer import cpu_threads

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert cpu_threads(Config(), cpu) is None  # torch's default
    deterministic = apply_overrides(Config(), ["head.index_deterministic=true"])
    assert cpu_threads(deterministic, cpu) == 1 and cpu_threads(deterministic, gpu) is None
    assert cpu_threads(apply_overrides(deterministic, ["run.cpu_threads=3"]), cpu) == 3


def test_validate_warns_about_ignored_margin():
    with pytest.warns(UserWarning, match=r"head\.margin"):
        validate(apply_overrides(Config(), ["head.margin=0.2"]))


def test_validate_warns_about_ignored_wta_crs():
    with pytest.warns(UserWarning, match=r"model\.wta_crs_keep=0\.3 is ignored"):
        validate(apply_overrides(Config(), ["model.wta_crs_keep=0.3"]))  # the mlp backbone
    with pytest.warns(UserWarning, match=r"model\.wta_crs_mlp=false is ignored"):
        validate(apply_overrides(Config(), ["model.wta_crs_mlp=false"]))
    vit = ["model.backbone=vit_tiny", "data.kind=procedural_images", "model.wta_crs_keep=0.3"]
    validate(apply_overrides(Config(), vit))
    with pytest.warns(UserWarning, match="resumed run differs"):
        validate(apply_overrides(Config(), [*vit, "head.index_deterministic=true", "head.selection=knn"]))


def test_validate_warns_when_the_head_would_take_a_lars_or_lamb_lr():
    for name in ("lars", "lamb"):
        with pytest.warns(UserWarning, match=rf"head\.lr is null.*optim\.lr=0\.1, a {name}"):
            validate(apply_overrides(Config(), [f"optim.backbone={name}"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(apply_overrides(Config(), ["optim.backbone=lars", "head.lr=0.5"]))
        validate(apply_overrides(Config(), ["optim.backbone=sgd"]))


def test_describe_config_lists_every_key():
    text = describe_config()
    keys = list(_dotted_keys(config_to_dict(Config())))
    assert len(keys) > 50
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    for key in keys:
        assert key in lines, key
    assert "int | None" in lines["train.stop_after"]
    assert "10000" in lines["head.num_classes"] and "int" in lines["head.num_classes"]
    assert "cosface" in lines["head.margin_type"]
    assert "classes per chunk" in lines["head.chunk_size"]
