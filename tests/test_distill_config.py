"""The DATM configuration layer: upstream's YAML files, shipped paper configs, checks and the start-epoch schedule."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datm_fast.distill.config import (
    IGNORED_KEYS,
    KEYS,
    OWN_KEYS,
    PLACEMENT_KEYS,
    UPSTREAM_KEYS,
    ConfigError,
    ConfigWarning,
    DistillConfig,
    LearningSection,
    effective_batch_syn,
    eval_iterations,
    eval_models,
    list_configs,
    load_config,
    sample_start_epoch,
    start_epoch_upper,
    validate_against,
)

UPSTREAM_DIR = Path(__file__).resolve().parent / "data" / "upstream_configs"
UPSTREAM_FILES = sorted(UPSTREAM_DIR.rglob("*.yaml"))

# DATM.md "Paper configs": batch_syn, syn_steps, expert_epochs, (min, current max or None, max, expansion or None),
# lr_img, lr_y, lr_lr, pix_init, threshold. All: 10,000 iterations, lr_teacher 0.01, ZCA on.
PAPER = {
    "cifar10-ipc1": (10, 80, 2, (0, None, 4, None), 100, 5, 1e-7, "samples_predicted_correctly", 1.1),
    "cifar10-ipc10": (100, 80, 2, (0, 10, 20, 1000), 100, 2, 1e-5, "samples_predicted_correctly", 1.0),
    "cifar10-ipc50": (500, 80, 2, (0, 20, 40, 2000), 1000, 2, 1e-5, "samples_predicted_correctly", 1.0),
    "cifar10-ipc500": (1000, 40, 2, (40, None, 60, None), 50, 10, 1e-5, "samples_predicted_correctly", 1.0),
    "cifar10-ipc1000": (1000, 100, 2, (40, None, 60, None), 50, 10, 1e-5, "samples_predicted_correctly", 1.0),
    "cifar100-ipc1": (1000, 40, 3, (0, 10, 20, 1000), 1000, 10, 1e-5, "samples_predicted_correctly", 1.0),
    "cifar100-ipc10": (1000, 80, 2, (0, 30, 50, 2000), 1000, 10, 1e-5, "samples_predicted_correctly", 1.0),
    "cifar100-ipc50": (1000, 80, 2, (20, None, 70, None), 1000, 10, 1e-5, "real", 1.0),
    "cifar100-ipc100": (1000, 80, 2, (30, None, 70, None), 50, 10, 1e-5, "samples_predicted_correctly", 1.0),
    "tinyimagenet-ipc1": (1000, 40, 2, (0, 15, 20, 2000), 10000, 10, 1e-4, "samples_predicted_correctly", 1.0),
    "tinyimagenet-ipc10": (500, 40, 2, (10, None, 50, None), 100, 10, 1e-4, "samples_predicted_correctly", 1.0),
    "tinyimagenet-ipc50": (1000, 20, 2, (40, None, 70, None), 100, 10, 1e-4, "samples_predicted_correctly", 1.0),
}

# shipped name -> newest upstream copy (tests/data/upstream_configs/SOURCES.md)
NEWEST_UPSTREAM = {
    "cifar10-ipc1": "c6f100c/CIFAR-10/ConvIN/IPC1.yaml",
    "cifar10-ipc10": "abf54f9/CIFAR-10/ConvIN/IPC10.yaml",
    "cifar10-ipc50": "1767559/CIFAR-10/ConvIN/IPC50.yaml",
    "cifar10-ipc500": "bdb24b3/CIFAR-10/ConvIN/IPC500.yaml",
    "cifar10-ipc1000": "bdb24b3/CIFAR-10/ConvIN/IPC1000.yaml",
    "cifar100-ipc1": "bdb24b3/CIFAR-100/ConvIN/IPC1.yaml",
    "cifar100-ipc10": "7cfd266/CIFAR-100/ConvIN/IPC10.yaml",
    "cifar100-ipc50": "5cbeca6/CIFAR-100/ConvIN/IPC50.yaml",
    "cifar100-ipc100": "bdb24b3/CIFAR-100/ConvIN/IPC100.yaml",
    "tinyimagenet-ipc1": "bdb24b3/TinyImageNet/ConvIN/IPC1.yaml",
    "tinyimagenet-ipc10": "bdb24b3/TinyImageNet/ConvIN/IPC10.yaml",
    "tinyimagenet-ipc50": "bdb24b3/TinyImageNet/ConvIN/IPC50.yaml",
}
# known, documented differences between the paper (what we ship) and upstream's newest file
KNOWN_DIFFERENCES = {"cifar100-ipc1": {"current_max_start_epoch": (10, 20), "max_start_epoch": (20, 30)}}


def _load_quiet(source, **overrides) -> tuple[DistillConfig, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(source, **overrides)
    return cfg, list(caught)


def _error(source, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            load_config(source, **overrides)
    return str(info.value)


# ---- upstream's files ---------------------------------------------------------------------------------------------


def test_upstream_copies_are_present_and_listed():
    assert len(UPSTREAM_FILES) >= 45
    sources = (UPSTREAM_DIR / "SOURCES.md").read_text()
    for path in UPSTREAM_FILES:
        rel = path.relative_to(UPSTREAM_DIR)
        assert rel.parts[0] in sources, f"{rel}: commit folder not described in SOURCES.md"
        assert rel.name in sources


@pytest.mark.parametrize("path", UPSTREAM_FILES, ids=lambda p: str(p.relative_to(UPSTREAM_DIR)))
def test_every_upstream_config_loads(path):
    raw = yaml.safe_load(path.read_text())
    cfg, caught = _load_quiet(path)
    assert all(issubclass(w.category, ConfigWarning) for w in caught), [str(w.message) for w in caught]
    messages = " ".join(str(w.message) for w in caught)

    # every value that upstream sets arrives under our name
    assert cfg.ipc == raw["ipc"]
    assert cfg.syn_steps == raw["syn_steps"]
    assert cfg.expert_epochs == raw["expert_epochs"]
    assert cfg.iterations == raw["Iteration"]
    assert cfg.min_start_epoch == raw["min_start_epoch"]
    assert cfg.max_start_epoch == raw["max_start_epoch"]
    assert cfg.lr_img == pytest.approx(raw["lr_img"])
    assert cfg.lr_y == pytest.approx(raw["lr_y"])
    assert cfg.momentum_y == pytest.approx(raw["Momentum_y"])
    assert cfg.threshold == pytest.approx(raw["threshold"])
    assert cfg.pix_init == raw["pix_init"]
    assert cfg.dataset == raw["dataset"]
    assert cfg.model == raw.get("model", "ConvNet")
    assert cfg.batch_syn == raw.get("batch_syn")
    assert cfg.lr_lr == pytest.approx(raw.get("lr_lr", 1e-5), rel=1e-12)
    assert cfg.zca == raw.get("zca", True)  # duplicate zca keys: the last wins, as in yaml.safe_load
    assert cfg.sequential_generation == raw.get("Sequential_Generation", True)
    assert cfg.skip_first_eval == raw["skip_first_eva"]

    # older spellings are read as today's keys, with a warning
    if "Initial_Step" in raw:
        assert cfg.current_max_start_epoch == raw["Initial_Step"]
        assert "'Initial_Step' is an older upstream name" in messages
    if "learn_end_epoch" in raw:
        assert cfg.expansion_end_epoch == raw["learn_end_epoch"]
    for key in ("current_max_start_epoch", "expansion_end_epoch"):
        if key in raw:
            assert getattr(cfg, key) == raw[key]

    # ignored keys (set to a value that would change upstream's run) and upstream's GPU list warn, naming the key
    for key, ignored in IGNORED_KEYS.items():
        if key in raw:
            assert (f"key {key!r} is ignored" in messages) == ignored.warns(raw[key]), key
    assert cfg.device == "auto"
    if "device" in raw:
        assert f"upstream's device: {raw['device']}" in messages
    assert all(k in UPSTREAM_KEYS or k in ("Initial_Step", "learn_end_epoch") for k in raw)


def test_duplicate_yaml_key_warns_and_keeps_the_last():
    path = UPSTREAM_DIR / "b1d4823" / "CIFAR-10" / "ConvIN" / "IPC10.yaml"  # zca: False ... zca: True
    cfg, caught = _load_quiet(path)
    assert any("key 'zca' is given more than once (line 36)" in str(w.message) for w in caught)
    assert cfg.zca is True


def test_upstream_quirks():
    cfg, caught = _load_quiet(UPSTREAM_DIR / "b1d4823" / "CIFAR-10" / "Res18IN" / "IPC2000.yaml")
    assert cfg.eval_mode == "sdfsdf" and eval_models(cfg) == ("ResNet18",)
    assert any("eval_mode 'sdfsdf'" in str(w.message) for w in caught)

    cfg, caught = _load_quiet(UPSTREAM_DIR / "b1d4823" / "CIFAR-10" / "ConvBN" / "IPC1000.yaml")
    # Labelling with another model's experts is not supported: the config says so, and runs on.
    assert any("'Initialize_Label_With_Another_Model' is ignored" in str(w.message) for w in caught)
    assert not hasattr(cfg, "initialize_label_model")
    assert eval_models(cfg) == ("ConvNetBN", "ConvNet")  # eval_mode C

    cfg, _ = _load_quiet(UPSTREAM_DIR / "b1d4823" / "TinyImageNet" / "ConvIN" / "IPC10.yaml")
    assert cfg.label_model_timestamp == 50

    cfg, _ = _load_quiet(UPSTREAM_DIR / "b1d4823" / "ImageNetSubuset" / "imagenette" / "ConvIN" / "IPC1.yaml")
    assert (cfg.dataset, cfg.subset, cfg.res, cfg.model, cfg.batch_syn) == (
        "ImageNet",
        "imagenette",
        128,
        "ConvNetD5",
        None,
    )


# ---- shipped configs ---------------------------------------------------------------------------------------------


def test_list_configs():
    assert list_configs() == tuple(PAPER)


@pytest.mark.parametrize("name", list(PAPER))
def test_shipped_config_matches_the_paper(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own configs use only valid, current keys
        cfg = load_config(name)
    batch_syn, syn_steps, expert_epochs, (lo, cur, hi, expansion), lr_img, lr_y, lr_lr, pix_init, threshold = PAPER[
        name
    ]
    assert cfg.ipc == int(name.rsplit("ipc", 1)[1])
    assert (cfg.batch_syn, cfg.syn_steps, cfg.expert_epochs) == (batch_syn, syn_steps, expert_epochs)
    assert (cfg.min_start_epoch, cfg.max_start_epoch) == (lo, hi)
    assert cfg.sequential_generation == (cur is not None)
    if cur is not None:
        assert (cfg.current_max_start_epoch, cfg.expansion_end_epoch) == (cur, expansion)
    assert (cfg.lr_img, cfg.lr_y, cfg.lr_lr) == (lr_img, lr_y, lr_lr)
    assert (cfg.pix_init, cfg.threshold) == (pix_init, threshold)
    assert (cfg.iterations, cfg.lr_teacher, cfg.zca, cfg.momentum_y) == (10000, 0.01, True, 0.9)
    assert cfg.model == ("ConvNetD4" if name.startswith("tiny") else "ConvNet")
    assert cfg.res == (64 if name.startswith("tiny") else 32)
    assert cfg.dsa and cfg.dsa_strategy == "color_crop_cutout_flip_scale_rotate"


@pytest.mark.parametrize("name", list(NEWEST_UPSTREAM))
def test_shipped_config_matches_upstream_newest(name):
    ours = load_config(name)
    theirs, _ = _load_quiet(UPSTREAM_DIR / NEWEST_UPSTREAM[name])
    keys = [
        "ipc", "syn_steps", "expert_epochs", "batch_syn", "min_start_epoch", "max_start_epoch", "sequential_generation",
        "threshold", "lr_img", "lr_teacher", "lr_lr", "lr_y", "momentum_y", "pix_init", "iterations", "batch_train",
        "zca", "model", "res", "eval_it", "num_eval", "skip_first_eval", "epoch_eval_train", "dsa", "dsa_strategy",
    ]  # fmt: skip
    if ours.sequential_generation:
        keys += ["current_max_start_epoch", "expansion_end_epoch"]
    expected = KNOWN_DIFFERENCES.get(name, {})
    for key in keys:
        if key in expected:
            assert (getattr(ours, key), getattr(theirs, key)) == expected[key], key
        else:
            assert getattr(ours, key) == getattr(theirs, key), key
    canonical = {"tiny": "tinyimagenet"}
    assert ours.dataset == canonical.get(theirs.dataset.lower(), theirs.dataset.lower())
    # a difference from upstream is documented in the shipped file itself
    text = (Path(load_config.__code__.co_filename).parents[1] / "configs" / f"{name}.yaml").read_text()
    assert ("DIFFERENCE" in text) == bool(expected)


def test_unknown_config_name_suggests():
    msg = _error("cifar100-ipc5")
    assert "no config named 'cifar100-ipc5'" in msg and "did you mean 'cifar100-ipc50'" in msg
    assert "config file not found" in _error("does/not/exist.yaml")


# ---- keys ----------------------------------------------------------------------------------------------------------


def test_ignored_keys_warn_and_change_nothing():
    with pytest.warns(ConfigWarning) as record:
        cfg = load_config({"ema_decay": 0.999, "lr_init": 0.01, "texture": False, "batch_real": 256})
    text = " ".join(str(w.message) for w in record)
    for key in ("ema_decay", "lr_init", "texture", "batch_real"):
        assert f"key {key!r} is ignored" in text
    assert cfg == DistillConfig()


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("lr_imgs", "lr_img"),
        ("lr_teachr", "lr_teacher"),
        ("Sequential_generaton", "sequential_generation"),
        ("momentum", "momentum_y"),
        ("expansion_end_epochs", "expansion_end_epoch"),
        ("min_start_epoc", "min_start_epoch"),
        ("dsa_strategie", "dsa_strategy"),
        ("ema_decy", "ema_decay"),
    ],
)
def test_unknown_key_suggests_the_closest(key, suggestion):
    msg = _error({key: 1})
    assert f"unknown key {key!r}" in msg and f"did you mean {suggestion!r}" in msg


def test_upstream_spellings_and_overrides():
    cfg = load_config({"Iteration": 7, "Momentum_y": 0.5, "Sequential_Generation": False, "parall_eva": False})
    assert (cfg.iterations, cfg.momentum_y, cfg.sequential_generation) == (7, 0.5, False)
    with pytest.warns(ConfigWarning, match="'parall_eva' is ignored: datm_fast trains the evaluation runs"):
        load_config({"parall_eva": True})
    with pytest.warns(ConfigWarning, match="'load_all' is ignored"):
        load_config({"load_all": True})
    # earlier datm_fast versions wrote the snake_case spellings into config.yaml: still read
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config({"parallel_eval": False, "initialize_label_with_another_model": False})
    cfg = load_config("cifar10-ipc10", lr_img=50, Iteration=100, seed=3)
    assert (cfg.lr_img, cfg.iterations, cfg.seed) == (50.0, 100, 3)
    assert load_config({"Iteration": 5}, iterations=9).iterations == 9  # overrides win over the file
    assert "iterations is given twice, as 'Iteration' and as 'iterations'" in _error({"Iteration": 1, "iterations": 2})
    assert "current_max_start_epoch is given twice" in _error({"Initial_Step": 5, "current_max_start_epoch": 5})


def test_device():
    with pytest.warns(ConfigWarning, match=r"device: \[0, 1\]"):
        assert load_config({"device": [0, 1]}).device == "auto"
    assert load_config({"device": "cuda:1"}).device == "cuda:1"  # parsed, never initialised
    assert "device must be 'auto' or a torch device" in _error({"device": "gpu0"})


# ---- types ---------------------------------------------------------------------------------------------------------


def test_scientific_notation_strings():
    raw = yaml.safe_load("lr_lr: 1e-5\nlr_img: 1E3\nIteration: 1e4\nlr_y: 2.\n")
    assert raw["lr_lr"] == "1e-5" and raw["Iteration"] == "1e4"  # PyYAML: YAML 1.1 floats need a dot
    cfg = load_config(raw)
    assert cfg.lr_lr == 1e-5 and type(cfg.lr_lr) is float
    assert cfg.lr_img == 1000.0 and cfg.iterations == 10000 and type(cfg.iterations) is int
    assert load_config({"batch_syn": "None", "max_files": None}).batch_syn is None
    assert load_config({"zca": "false", "dsa": "yes"}).zca is False
    assert load_config({"ipc": np.int64(10), "lr_img": np.float32(0.5)}).ipc == 10


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("ipc", "ten", "a whole number"),
        ("syn_steps", 2.5, "a whole number"),
        ("Iteration", "1e-3", "a whole number"),
        ("lr_img", "fast", "a number"),
        ("lr_lr", True, "a number"),
        ("lr_lr", "nan", "a number"),
        ("threshold", float("inf"), "a finite number"),
        ("lr_y", "1e400", "a finite number"),
        ("zca", "maybe", "true or false"),
        ("dsa", [1], "true or false"),
        ("batch_syn", "all", "a whole number"),
        ("model", 5, "a string"),
        ("dataset", None, "a string"),
        ("pix_init", 3, "one of 'real', 'noise', 'samples_predicted_correctly'"),
        ("unroll", "fast", "one of 'exact', 'full', 'tesla'"),
    ],
)
def test_type_errors_name_key_and_value(key, value, expected):
    msg = _error({key: value})
    assert re.search(rf"\b{key}\b", msg) and repr(value) in msg and expected in msg, msg


# ---- impossible values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"lr_img": -1}, "lr_img must be >= 0"),
        ({"lr_lr": -1e-5}, "lr_lr must be >= 0"),
        ({"lr_y": -2}, "lr_y must be >= 0"),
        ({"lr_teacher": 0}, "lr_teacher must be > 0"),
        ({"ipc": 0}, "ipc must be >= 1, got 0"),
        ({"batch_syn": 0}, "batch_syn must be >= 1 or null, got 0"),
        ({"syn_steps": 0}, "syn_steps must be >= 1, got 0"),
        ({"expert_epochs": 0}, "expert_epochs must be >= 1"),
        ({"threshold": 0}, "threshold must be > 0"),
        ({"threshold": -1}, "threshold must be > 0"),
        ({"Momentum_y": 1.0}, "momentum_y (Momentum_y) must be in [0, 1), got 1.0"),
        ({"min_start_epoch": 20, "max_start_epoch": 20}, "min_start_epoch must be < max_start_epoch"),
        ({"min_start_epoch": 30, "max_start_epoch": 20}, "got 30 and 20"),
        ({"current_max_start_epoch": 30, "max_start_epoch": 25}, "current_max_start_epoch must be in (0, 25]"),
        ({"min_start_epoch": 10, "current_max_start_epoch": 10}, "current_max_start_epoch must be in (10, 25]"),
        ({"expansion_end_epoch": 0}, "expansion_end_epoch must be >= 1 iteration"),
        ({"pix_init": "zeros"}, "pix_init must be one of"),
        ({"pix_init": "Real"}, "did you mean 'real'"),
        ({"dsa_strategy": "color_crop_jitter"}, "dsa_strategy: unknown DSA group(s) 'jitter'"),
        ({"dsa_strategy": "crop_crop"}, "dsa_strategy: a DSA group is repeated"),
        ({"model": "ConvNet_D4"}, "model: unknown network 'ConvNet_D4'; did you mean 'ConvNetD4'?"),
        ({"backend": "gpu"}, "backend must be one of"),
        ({"eval_it": 0}, "eval_it must be >= 1"),
        ({"num_eval": 0}, "num_eval must be >= 1"),
        ({"Iteration": -1}, "iterations (Iteration) must be >= 0"),
        ({"max_files": 0}, "max_files must be >= 1 or null"),
        ({"micro_batch": 0}, "micro_batch must be >= 1 or null"),
        ({"memory_budget_gb": 0}, "memory_budget_gb must be > 0 or null"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"dataset": " "}, "dataset must be a dataset name or path"),
    ],
)
def test_impossible_values_name_the_key(changes, fragment):
    assert fragment in _error(changes)


def test_window_is_not_checked_without_sequential_generation():
    cfg = load_config({"Sequential_Generation": False, "min_start_epoch": 0, "max_start_epoch": 4})
    assert cfg.current_max_start_epoch == 20  # upstream's default, unused
    assert start_epoch_upper(cfg, 0) == 4


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config({"ipc": 0, "lr_img": -1, "pix_init": "reel", "model": "ConvNetD9"})
    assert len(info.value.problems) == 4
    assert isinstance(info.value, ValueError)


def test_direct_construction_is_checked_too():
    assert DistillConfig.from_keys(lr_lr="1e-5").lr_lr == 1e-5
    with pytest.raises(ConfigError, match="ipc must be >= 1"):
        DistillConfig.from_keys(ipc=0)
    with pytest.raises(ConfigError, match="ipc must be >= 1"):
        LearningSection(ipc=0)  # a section checks itself
    assert DistillConfig(learning=LearningSection(ipc=3)).ipc == 3


def test_sections_own_every_key_once():
    """Each key is in one section, reads from the config and from its section, and round-trips flat."""
    cfg = load_config("cifar10-ipc10", micro_batch=25, seed=4)
    assert cfg.learning.ipc == cfg.ipc == 10 and cfg.engine.micro_batch == cfg.micro_batch == 25
    assert cfg.run.seed == 4 and cfg.matching.syn_steps == 80
    assert list(cfg.to_dict()) == list(KEYS)  # section by section, in declaration order
    assert len(KEYS) == len({k for k in KEYS})
    assert set(PLACEMENT_KEYS) >= {"device", "backend", "micro_batch", "memory_budget_gb", "checkpoint_every"}
    assert not {"ipc", "syn_steps", "lr_img", "unroll", "seed", "iterations"} & set(PLACEMENT_KEYS)
    assert cfg.differences(cfg.replace(device="cpu", micro_batch=10)) == []
    assert cfg.differences(cfg.replace(device="cpu"), placement=True) == ["device"]
    assert cfg.differences(cfg.replace(lr_img=50, unroll="tesla")) == ["lr_img", "unroll"]
    with pytest.raises(AttributeError, match="no attribute or config key 'ipcs'"):
        cfg.ipcs  # noqa: B018


def test_config_flags_are_derived_from_the_declarations():
    """Every key declared with flag=True gets a --flag (choices from its type), read back as an override."""
    import argparse

    from datm_fast.distill.config import add_config_flags, flag_overrides

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--unroll", "tesla", "--micro-batch", "25", "--seed", "3"])
    assert flag_overrides(args) == {"unroll": "tesla", "micro_batch": "25", "seed": "3"}
    assert load_config("cifar10-ipc1", **flag_overrides(args)).engine.micro_batch == 25
    with pytest.raises(SystemExit):
        parser.parse_args(["--unroll", "fast"])  # a Literal key's choices come from its type


# ---- checks against the buffer and the data ------------------------------------------------------------------------


def test_validate_against_buffer_length():
    cfg = load_config("cifar10-ipc1000")  # start epochs up to 59, targets up to 61
    validate_against(cfg, buffer_epochs=61, class_sizes=[5000] * 10)
    with pytest.raises(ConfigError) as info:
        validate_against(cfg, buffer_epochs=60, class_sizes=[5000] * 10)
    msg = str(info.value)
    assert "max_start_epoch (60) and expert_epochs (2)" in msg and "up to 61" in msg and "has 60 epochs" in msg
    assert "at most 59" in msg


def test_validate_against_class_sizes():
    cfg = load_config("cifar10-ipc50")
    sizes = [5000] * 9 + [7]
    with pytest.raises(ConfigError, match="class 9 has 7"):
        validate_against(cfg, buffer_epochs=50, class_sizes=sizes)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with pytest.raises(ConfigError, match=r"ipc = 50 .*class 9 \('truck'\) has 7"):
        validate_against(cfg, buffer_epochs=50, class_sizes=sizes, class_names=names)
    with pytest.raises(ConfigError, match="and 2 more classes"):
        validate_against(cfg.replace(ipc=10), buffer_epochs=50, class_sizes=[3] * 12)


def test_validate_against_label_timestamp_and_several_problems():
    cfg = load_config({"Label_Model_Timestamp": 50, "max_start_epoch": 45})
    with pytest.raises(ConfigError) as info:
        validate_against(cfg, buffer_epochs=40, class_sizes=[0, 5])
    assert len(info.value.problems) == 3
    assert "label_model_timestamp (Label_Model_Timestamp) = 50" in str(info.value)
    validate_against(cfg.replace(pix_init="real", max_start_epoch=39), buffer_epochs=40, class_sizes=[1, 5])
    with pytest.raises(ValueError):
        validate_against(cfg, buffer_epochs=-1, class_sizes=[5])


# ---- schedule ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, iteration, upper",
    [
        # current 10, max 20, over 1000 iterations: 10 + int(10 * it / 1000)
        ("cifar10-ipc10", 0, 10),
        ("cifar10-ipc10", 99, 10),
        ("cifar10-ipc10", 100, 11),
        ("cifar10-ipc10", 550, 15),
        ("cifar10-ipc10", 999, 19),
        ("cifar10-ipc10", 1000, 20),
        ("cifar10-ipc10", 10000, 20),  # capped at max_start_epoch
        # current 20, max 40, over 2000: 20 + int(20 * it / 2000)
        ("cifar10-ipc50", 99, 20),
        ("cifar10-ipc50", 100, 21),
        ("cifar10-ipc50", 1999, 39),
        ("cifar10-ipc50", 2000, 40),
        # current 15, max 20, over 2000: 15 + int(5 * it / 2000)
        ("tinyimagenet-ipc1", 399, 15),
        ("tinyimagenet-ipc1", 400, 16),
        ("tinyimagenet-ipc1", 1999, 19),
        ("tinyimagenet-ipc1", 5000, 20),
        # current 30, max 50, over 2000: 30 + int(20 * it / 2000)
        ("cifar100-ipc10", 1234, 42),
        # no sequential generation: max_start_epoch throughout
        ("cifar10-ipc1", 0, 4),
        ("cifar10-ipc1000", 0, 60),
        ("cifar10-ipc1000", 9999, 60),
    ],
)
def test_start_epoch_upper(name, iteration, upper):
    assert start_epoch_upper(load_config(name), iteration) == upper


def test_start_epoch_upper_matches_upstream_expression_everywhere():
    cfg = load_config(
        {"min_start_epoch": 3, "current_max_start_epoch": 7, "max_start_epoch": 31, "expansion_end_epoch": 777}
    )
    for it in range(0, 2000):
        upstream = min(7 + int((31 - 7) * it / 777), 31)
        assert start_epoch_upper(cfg, it) == upstream
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            start_epoch_upper(cfg, bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.Generator().manual_seed(0),
        lambda: np.random.default_rng(0),
        lambda: np.random.RandomState(0),
    ],
    ids=["torch", "numpy-generator", "numpy-randomstate"],
)
def test_sample_start_epoch_is_uniform_on_the_half_open_window(make):
    cfg = load_config("cifar10-ipc10")
    g = make()
    at_start = [sample_start_epoch(cfg, 0, g) for _ in range(2000)]
    assert set(at_start) == set(range(0, 10))  # upper bound 10 never drawn
    late = [sample_start_epoch(cfg, 5000, g) for _ in range(4000)]
    assert set(late) == set(range(0, 20))  # max_start_epoch 20 never drawn
    counts = np.bincount(late, minlength=20)
    assert counts.min() > 120 and counts.max() < 280  # uniform: 200 expected per epoch

    narrow = load_config({"min_start_epoch": 5, "current_max_start_epoch": 6, "max_start_epoch": 9})
    assert {sample_start_epoch(narrow, 0, g) for _ in range(100)} == {5}


def test_sample_start_epoch_reproduces_upstreams_numpy_draws():
    cfg = load_config("cifar100-ipc10")
    ours, upstream = np.random.RandomState(0), np.random.RandomState(0)
    for it in range(0, 3000, 7):
        assert sample_start_epoch(cfg, it, ours) == upstream.randint(cfg.min_start_epoch, start_epoch_upper(cfg, it))
    a = [sample_start_epoch(cfg, 0, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw
    with pytest.raises(TypeError):
        sample_start_epoch(cfg, 0, None)


def test_eval_points_and_models():
    assert eval_iterations(DistillConfig()) == list(range(0, 5001, 100))
    assert eval_iterations(load_config("cifar10-ipc10")) == list(range(500, 10001, 500))  # skip_first_eva
    assert eval_iterations(load_config("cifar10-ipc1000"))[:2] == [1000, 2000]
    assert eval_models(load_config({"model": "ConvNetBN"})) == ("ConvNet",)
    assert eval_models(load_config({"model": "ResNet18BN_AP"})) == ("ResNet18",)
    assert eval_models(load_config({"eval_mode": "M"})) == ("ConvNet", "AlexNet", "VGG11", "ResNet18")


def test_own_keys_agree_with_the_engines():
    from datm_fast.backends import BACKENDS
    from datm_fast.distill.unroll import UNROLLS

    for mode in UNROLLS:
        assert DistillConfig.from_keys(unroll=mode).unroll == mode
    for backend in ("auto",) + BACKENDS:
        assert DistillConfig.from_keys(backend=backend).backend == backend
    assert DistillConfig.from_keys(memory_budget_gb=1.5).memory_budget_bytes == 3 * 2**29
    assert DistillConfig().memory_budget_bytes is None


def test_effective_batch_syn():
    assert effective_batch_syn(DistillConfig.from_keys(ipc=10), 10) == 100
    assert effective_batch_syn(load_config("cifar100-ipc1"), 100) == 100  # batch_syn 1000 >= the set
    assert effective_batch_syn(load_config("cifar10-ipc50"), 10) == 500


# ---- round trip ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAPER))
def test_round_trip(name, tmp_path):
    cfg = load_config(name, seed=7, out_dir=str(tmp_path), micro_batch=64)
    assert load_config(cfg.to_dict()) == cfg
    assert load_config(yaml.safe_load(cfg.to_yaml())) == cfg
    path = tmp_path / "config.yaml"
    cfg.to_yaml(path)
    assert load_config(path) == cfg
    assert hash(load_config(path)) == hash(cfg)


def test_round_trip_of_an_upstream_file_in_upstream_spelling():
    cfg, _ = _load_quiet(UPSTREAM_DIR / "abf54f9" / "CIFAR-10" / "ConvIN" / "IPC10.yaml")
    up = cfg.to_dict(upstream=True)
    assert {"Iteration", "Momentum_y", "Sequential_Generation", "skip_first_eva"} <= set(up)
    assert not set(OWN_KEYS) & set(up) and set(up) <= set(UPSTREAM_KEYS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(up) == cfg


def test_replace_and_frozen():
    cfg = load_config("cifar10-ipc10")
    other = cfg.replace(ipc=20, Momentum_y=0.5, lr_lr="2e-5")
    assert (other.ipc, other.momentum_y, other.lr_lr) == (20, 0.5, 2e-5)
    assert cfg.ipc == 10
    with pytest.raises(ConfigError, match="ipc must be >= 1"):
        cfg.replace(ipc=0)
    with pytest.raises(ConfigError, match="unknown key 'lr_imgg'"):
        cfg.replace(lr_imgg=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ipc = 3  # type: ignore[misc]
