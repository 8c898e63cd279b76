"""The command line: model sizing on the meta device, corpora, and error reporting."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from raydiology.cli import app

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def vit_block(d: int) -> int:
    # qkv (d*3d + 3d) + proj (d*d + d) + mlp (d*4d + 4d + 4d*d + d) + 2 LayerNorms (4d)
    return 12 * d * d + 13 * d


def test_model_params_sizes_the_paper_model_without_allocating_it():
    result = CliRunner().invoke(app, ["model", "params", str(EXPERIMENTS / "hd_mae_cam.yaml")])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    d, dd, p = 1024, 512, 64
    conv_stack = (16 * 16 * 1 * d + d) + (4 * 4 * d * d + d) + (d * d + d)
    encoder = conv_stack + d + 24 * vit_block(d) + 2 * d  # + CLS + final norm
    decoder = (d * dd + dd) + dd + 8 * vit_block(dd) + 2 * dd + (dd * p * p + p * p)
    assert counts["encoder"] == encoder == 320_403_456
    assert counts["decoder"] == decoder
    assert counts["total"] == encoder + decoder
    assert counts["image_size"] == 1280 and counts["flavor"] == "large"


def test_invalid_experiment_exits_2_naming_the_key():
    args = [
        "model",
        "params",
        str(EXPERIMENTS / "hd_mae_cam.yaml"),
        "--set",
        "data.resolution=1300",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "data.resolution" in result.output and "1300" in result.output


def test_corpus_phantom_command_writes_a_verifiable_corpus(tmp_path):
    from raydiology.data.corpus import verify_corpus

    out = tmp_path / "phantom"
    result = CliRunner().invoke(
        app, ["corpus", "phantom", "--n", "6", "--size", "64", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert verify_corpus(out).rows == 6
