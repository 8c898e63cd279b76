"""Experiment files: loading, profiles, overrides and every validation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raydiology.config import apply_override, load_experiment
from raydiology.config_base import ConfigError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CAM = EXPERIMENTS / "hd_mae_cam.yaml"


def load(*sets: str, profile: str | None = "smoke"):
    return load_experiment(CAM, profile=profile, overrides=list(sets))


def test_paper_experiment_loads_with_paper_settings():
    exp = load(profile=None)
    assert exp.model.name == "hd_mae" and exp.model.config.flavor == "large"
    assert exp.data.resolution == 1280 and exp.data.channels == 1
    masking = exp.objective.config.masking
    assert (masking.strategy, masking.inside_ratio, masking.outside_ratio) == (
        "context_aware",
        0.95,
        0.85,
    )
    assert exp.train.optimizer.weight_decay == 0.04 and exp.train.grad_clip == 3.0


def test_random_ablation_inherits_everything_but_masking():
    cam = load(profile=None)
    rnd = load_experiment(EXPERIMENTS / "hd_mae_random.yaml")
    assert rnd.objective.config.masking.strategy == "random"
    assert rnd.objective.config.masking.ratio == pytest.approx(354 / 400, abs=1e-3)
    assert rnd.data == cam.data and rnd.model == cam.model and rnd.train == cam.train


def test_smoke_profile_overlays_the_paper_file():
    exp = load()
    assert exp.model.config.flavor == "tiny"
    assert exp.scaling.num_workers == 2 and not exp.scaling.use_gpu
    assert exp.train.zero_stage == 2 and exp.train.precision == "fp32"
    assert exp.objective.config.masking.inside_ratio == 0.95  # untouched by the profile


def test_set_overrides_any_field_with_yaml_values():
    exp = load(
        "train.max_steps=7", "objective.masking.region=[0.2, 0.2, 0.9, 0.9]", "output.name=x"
    )
    assert exp.train.max_steps == 7
    assert exp.objective.config.masking.region == (0.2, 0.2, 0.9, 0.9)
    assert exp.run_name == "x"


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("train.max_stepz=3", "train.max_stepz", "one of the keys"),
        ("data.resolution=130", "data.resolution", "multiple of the patch size"),
        ("objective.masking.inside_ratio=1.0", "objective.masking.inside_ratio", "[0, 1)"),
        ("objective.masking.ratio=-0.1", "objective.masking.ratio", "[0, 1)"),
        ("train.zero_stage=4", "train.zero_stage", "0, 1, 2 or 3"),
        ("train.precision=fp8", "train.precision", "'fp32', 'bf16', 'fp16'"),
        ("model.flavor=huge", "model.flavor", "tiny"),
        ("model.name=nope", "model.name", "hd_mae"),
        ("data.mean=[0.5, 0.5]", "data.mean", "one per channel"),
        ("train.micro_batch_size=two", "train.micro_batch_size", "an integer"),
        ("scaling.num_workers=0", "scaling.num_workers", "at least 1"),
        ("bogus.key=1", "bogus", "one of the sections"),
    ],
)
def test_validation_errors_name_key_value_and_what_is_allowed(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load(override)
    assert info.value.key == key
    assert fragment in str(info.value)


def test_fp16_refused_on_cpu_workers():
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load("train.precision=fp16")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_override({}, "train.max_steps")
    with pytest.raises(ConfigError, match="--profile"):
        load(profile="nonexistent")


def test_resolved_config_round_trips(tmp_path):
    from raydiology.config import experiment_from_dict, save_resolved

    exp = load("train.max_steps=5")
    save_resolved(exp, tmp_path / "config.yaml")
    again = experiment_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == exp and again.config_hash() == exp.config_hash()
