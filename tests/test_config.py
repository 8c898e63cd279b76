"""Experiment files: loading, profiles, overrides and every validation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

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


def test_quickstart_profile_is_smoke_run_longer():
    smoke, quick = load(), load(profile="quickstart")
    assert quick.train.max_steps > smoke.train.max_steps  # long enough for a learned picture
    assert quick.model == smoke.model and quick.objective == smoke.objective
    assert quick.scaling == smoke.scaling
    assert quick.train.micro_batch_size == smoke.train.micro_batch_size  # from its base


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
        ("data.phantom.pose=10", "data.phantom.pose", "0..9"),
        ("data.phantom.lesion_scale=0", "data.phantom.lesion_scale", "(0, 4]"),
        ("bogus.key=1", "bogus", "one of the sections"),
        # the smoke profile trains 24 steps at lr 1e-3
        (
            "train.schedule.warmup_steps=25",
            "train.schedule.warmup_steps",
            "at most train.max_steps",
        ),
        ("train.schedule.min_lr=2e-3", "train.schedule.min_lr", "at most train.optimizer.lr"),
        ("train.schedule.min_lr=-1e-6", "train.schedule.min_lr", ">= 0"),
        ("train.optimizer.eps=0", "train.optimizer.eps", "a positive number"),
        ("scaling.gpus_per_worker=-1", "scaling.gpus_per_worker", "> 0"),
        ("scaling.gpus_per_worker=0", "scaling.gpus_per_worker", "> 0"),
        ("output.name=../../etc", "output.name", "one folder name"),
        ("output.name=runs/x", "output.name", "one folder name"),
        ("output.name=.hidden", "output.name", "one folder name"),
        ("output.name=''", "output.name", "one folder name"),
        ("name=../x", "name", "one folder name"),  # the run name when output.name is null
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


@pytest.mark.parametrize("text", ["1e-4", "1E-4", "1.0e-4", ".5", "+1e3", "-2.5e-3", "3", "2."])
def test_float_fields_take_every_float_form(tmp_path, text):
    # PyYAML (YAML 1.1) reads 1e-4 and +1e3 as strings; a float field takes them as numbers
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"base: {CAM}\n"
        "train:\n"
        f"  optimizer: {{lr: {text}, betas: [{text}, 0.5]}}\n"
        "  schedule: {min_lr: 0}\n"
        f"scaling: {{resources_per_worker: {{trainer_slot: {text}}}}}\n"
    )
    value = float(text)
    if value <= 0 or value >= 1:  # lr must be positive and betas below 1: only the form counts
        with pytest.raises(ConfigError) as info:
            load_experiment(path)
        assert "a number" not in str(info.value)
        return
    exp = load_experiment(path)
    assert exp.train.optimizer.lr == value and exp.train.optimizer.betas == (value, 0.5)
    assert exp.scaling.resources_per_worker == {"trainer_slot": value}


@pytest.mark.parametrize("text", ["1e-4x", "one", "1e", "e5", "1.2.3", "--1", "nan", "inf"])
def test_float_fields_still_refuse_non_numbers_naming_the_key(text):
    with pytest.raises(ConfigError) as info:
        load(f"train.optimizer.lr='{text}'")
    assert info.value.key == "train.optimizer.lr" and "a number" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load(f"scaling.resources_per_worker={{trainer_slot: '{text}'}}")
    assert info.value.key == "scaling.resources_per_worker.trainer_slot"


# ----------------------------------------------------------------- reusing a run name


def started(tmp_path, *sets: str):
    """A run folder as a first launch leaves it (config.yaml), and its experiment."""
    from raydiology.config import save_resolved

    exp = load(f"output.dir={tmp_path}", *sets)
    run_dir = tmp_path / exp.run_name
    run_dir.mkdir(parents=True)
    save_resolved(exp, run_dir / "config.yaml")
    return exp, run_dir


def test_rerun_under_changed_settings_is_refused_before_its_config_is_overwritten(tmp_path):
    from raydiology.train.launch import ChangedSettings, run_experiment

    _, run_dir = started(tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    changed = load(f"output.dir={tmp_path}", "train.max_steps=30", "train.optimizer.lr=5e-4")
    with pytest.raises(ChangedSettings) as info:  # raised before Ray or the corpus start
        run_experiment(changed, console=Console(quiet=True), allow_changes=["train.max_steps"])
    assert info.value.changes == {"train.optimizer.lr": (1e-3, 5e-4)}
    assert "train.optimizer.lr: 0.001 -> 0.0005" in str(info.value)
    assert "--allow-changes train.optimizer.lr" in str(info.value)
    assert (run_dir / "config.yaml").read_bytes() == before


def test_allowed_and_free_changes(tmp_path, monkeypatch):
    from raydiology.train.launch import ChangedSettings, check_changes, saved_config

    _, run_dir = started(tmp_path)
    saved = saved_config(run_dir, None, run_dir.name)
    assert saved is not None and saved_config(tmp_path / "new", None, "new") is None
    # where the files go, logging cadence and worker placement never count: the same
    # folder by a relative path, another log_every, more failures allowed
    monkeypatch.chdir(tmp_path)
    same = load("output.dir=.", "train.log_every=1", "scaling.max_failures=3")
    assert check_changes(same, saved, [], run_dir=run_dir) == {}

    longer = load(
        f"output.dir={tmp_path}", "train.max_steps=48", "train.checkpoint_every=48",
        "train.optimizer.betas=[0.9, 0.99]",
    )  # fmt: skip
    with pytest.raises(ChangedSettings) as info:
        check_changes(longer, saved, ["train.max_steps"], run_dir=run_dir)
    assert set(info.value.changes) == {"train.checkpoint_every", "train.optimizer.betas"}
    # a section (train.optimizer) allows every key under it
    allow = ["train.max_steps", "train.checkpoint_every", "train.optimizer"]
    allowed = check_changes(longer, saved, allow, run_dir=run_dir)
    assert allowed["train.max_steps"] == (24, 48)
    assert allowed["train.optimizer.betas"] == ([0.9, 0.95], [0.9, 0.99])

    # a field added to the code since the run started compares at its default, not as a change
    del saved["train"]["compile"]
    assert check_changes(same, saved, [], run_dir=run_dir) == {}


def test_saved_config_of_a_remote_run_is_read_from_its_storage(tmp_path):
    """A driver on another machine has no ./runs/<name>: the copy beside the checkpoints
    (uploaded when the run ended) is what the rerun compares with."""
    from raydiology.train.launch import saved_config

    _, run_dir = started(tmp_path / "store")
    elsewhere = tmp_path / "driver" / "runs" / run_dir.name
    found = saved_config(elsewhere, f"file://{tmp_path / 'store'}", run_dir.name)
    assert found == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved_config(elsewhere, f"file://{tmp_path / 'none'}", run_dir.name) is None


def test_a_rerun_resumes_the_data_at_its_newest_checkpoints_epoch(tmp_path):
    """The driver builds the dataset before Ray restores: it reads the epoch the run will
    continue from the newest finished checkpoint (`first_epoch`), local or by URI."""
    import json

    from raydiology.train.launch import resume_epoch

    run = tmp_path / "run"
    for folder, state in [("checkpoint_a", {"step": 4, "epoch": 1}),
                          ("checkpoint_b", {"step": 9, "epoch": 3}),
                          ("checkpoint_c", None)]:  # fmt: skip
        (run / folder).mkdir(parents=True)
        if state:
            (run / folder / "train_state.json").write_text(json.dumps(state))
    assert resume_epoch(str(tmp_path), "run") == 3
    assert resume_epoch(f"file://{tmp_path}", "run") == 3
    assert resume_epoch(str(tmp_path), "never-ran") == 0


def test_cli_run_refuses_changed_settings_naming_them(tmp_path):
    from typer.testing import CliRunner

    from raydiology.cli import app

    started(tmp_path, "output.name=mine")
    args = ["run", str(CAM), "--profile", "smoke", "--set", f"output.dir={tmp_path}",
            "--set", "output.name=mine", "--set", "train.max_steps=9",
            "--allow-changes", "train.checkpoint_every"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "train.max_steps: 24 -> 9" in text and "--allow-changes train.max_steps" in text
    assert "train.checkpoint_every" not in text.split("changed:")[1].split("To resume")[0]

    # allowed (a comma-separated list): the check passes and the new config is saved; the
    # missing corpus then stops the launch before Ray starts
    missing = tmp_path / "no-corpus"
    args += ["--set", f"data.corpus={missing}"]
    args[args.index("train.checkpoint_every")] = "train.max_steps, data.corpus"
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and str(missing) in str(result.exception), result.output
    saved = yaml.safe_load((tmp_path / "mine" / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 9 and saved["data"]["corpus"] == str(missing)
