"""Report metrics: NLG numbers equal pycocoevalcap's own, one METEOR JVM per evaluation, the
PTB choice recorded, CE precision/recall/F1 by hand, and `raydiology eval` writing its JSON.

METEOR and the PTB tokenizer run Java; each JVM start costs seconds, so each test starts as
few as it can."""

from __future__ import annotations

import json
import subprocess

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.evaluation.clinical import ce_scores
from raydiology.evaluation.labeler import OBSERVATIONS
from raydiology.evaluation.protocol import PRESETS
from raydiology.evaluation.report_eval import evaluate_predictions, metrics_path

PAIRS = [
    ("the heart is normal in size . no pleural effusion or pneumothorax .",
     "the heart size is normal . no pleural effusion .", "a"),
    ("there is a small left pleural effusion . cardiomegaly .",
     "small left pleural effusion . the heart is enlarged .", "b"),
    ("no acute cardiopulmonary abnormality .", "no acute cardiopulmonary process .", "c"),
    ("possible right lower lobe pneumonia .", "the lungs are clear .", "d"),
    ("an endotracheal tube is in place . no pneumothorax .",
     "endotracheal tube in place . no pneumothorax . no effusion .", "e"),
]  # fmt: skip


def records() -> list[dict[str, str]]:
    return [{"id": i, "reference": r, "prediction": p} for r, p, i in PAIRS]


def direct(gts: dict[int, list[str]], res: dict[int, list[str]], *, meteor: bool) -> dict:
    """pycocoevalcap called the way its own COCOEvalCap does."""
    out = {f"BLEU_{n + 1}": b for n, b in enumerate(Bleu(4).compute_score(gts, res, verbose=0)[0])}
    if meteor:
        out["METEOR"] = Meteor().compute_score(gts, res)[0]
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


def test_eval_cli_matches_pycocoevalcap_with_one_meteor_jvm(tmp_path, monkeypatch):
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records()) + "\n")

    # Count the JVMs the evaluation starts (a spy: every call goes through to the real Popen).
    started = []
    real_popen = subprocess.Popen

    def counting_popen(args, *a, **kw):
        started.append(list(args))
        return real_popen(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", counting_popen)
    result = CliRunner().invoke(app, ["eval", str(path)])
    monkeypatch.setattr(subprocess, "Popen", real_popen)
    assert result.exit_code == 0, result.output
    meteor_jvms = [a for a in started if "meteor-1.5.jar" in a]
    assert len(meteor_jvms) == 1  # one JVM for all five reports
    assert not [a for a in started if any("PTBTokenizer" in str(x) for x in a)]

    written = metrics_path(path)
    assert written == tmp_path / "predictions.metrics.json"
    metrics = json.loads(written.read_text())
    assert metrics["ptb_tokenizer"] is False and metrics["n"] == len(PAIRS)
    assert set(metrics["ce_per_observation"]) == set(OBSERVATIONS)

    gts = {i: [r] for i, (r, _, _) in enumerate(PAIRS)}
    res = {i: [p] for i, (_, p, _) in enumerate(PAIRS)}
    expected = direct(gts, res, meteor=True)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert 0 < metrics["BLEU_4"] < metrics["BLEU_1"] < 1 and metrics["CIDEr"] > 0


def test_ptb_tokenizer_is_applied_and_recorded(tmp_path):
    raw = [
        {"id": 1, "reference": "Heart size is normal. No effusion!", "prediction": "Normal heart."},
        {"id": 2, "reference": "Small left effusion,\nno pneumothorax.", "prediction": "Effusion."},
        {"id": 3, "reference": "No acute disease.", "prediction": "No acute disease."},
    ]
    out = tmp_path / "m.json"
    with_ptb = evaluate_predictions(raw, ptb=True, out=out)
    assert with_ptb["ptb_tokenizer"] is True
    assert json.loads(out.read_text())["ptb_tokenizer"] is True

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r["reference"]}] for i, r in enumerate(raw)})
    res = tokenizer.tokenize({i: [{"caption": r["prediction"]}] for i, r in enumerate(raw)})
    assert gts[0] == ["heart size is normal no effusion"]  # lower case, punctuation dropped
    expected = direct(gts, res, meteor=False)
    for key, value in expected.items():
        assert with_ptb[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # Without the tokenizer "normal." and "normal" differ: the numbers must change.
    plain = direct({i: [r["reference"]] for i, r in enumerate(raw)},
                   {i: [r["prediction"]] for i, r in enumerate(raw)}, meteor=False)  # fmt: skip
    assert plain["BLEU_1"] != pytest.approx(with_ptb["BLEU_1"])


def test_ce_micro_macro_by_hand():
    # Two observations matter; the other 12 are blank in both (no TP/FP/FN, F1 0 each).
    # Cardiomegaly: ref [1, 1, 0, blank], pred [1, 0, 1, -1]  -> TP 1, FP 1, FN 1
    # Edema:        ref [1, -1, 1, 0],    pred [1, 1, 1, 1]   -> TP 2, FP 2, FN 0 (-1 is 0)
    ref = [{"Cardiomegaly": 1, "Edema": 1}, {"Cardiomegaly": 1, "Edema": -1},
           {"Cardiomegaly": 0, "Edema": 1}, {"Edema": 0}]  # fmt: skip
    pred = [{"Cardiomegaly": 1, "Edema": 1}, {"Cardiomegaly": 0, "Edema": 1},
            {"Cardiomegaly": 1, "Edema": 1}, {"Cardiomegaly": -1, "Edema": 1}]  # fmt: skip
    s = ce_scores(pred, ref)
    # micro: TP 3, FP 3, FN 1 -> P 3/6, R 3/4, F1 = 2*0.5*0.75/1.25 = 0.6
    assert s["ce_precision_micro"] == pytest.approx(0.5)
    assert s["ce_recall_micro"] == pytest.approx(0.75)
    assert s["ce_f1_micro"] == pytest.approx(0.6)
    # macro over 14: cardiomegaly P = R = F1 = 1/2; edema P 1/2, R 1, F1 2/3
    assert s["ce_precision_macro"] == pytest.approx((0.5 + 0.5) / 14)
    assert s["ce_recall_macro"] == pytest.approx((0.5 + 1.0) / 14)
    assert s["ce_f1_macro"] == pytest.approx((0.5 + 2 / 3) / 14)
    assert s["ce_per_observation"]["Edema"] == {
        "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
        "tp": 2, "fp": 2, "fn": 0, "support": 2,
    }  # fmt: skip
    # Uncertain as positive: cardiomegaly pred -1 vs blank adds an FP; edema ref -1 becomes a TP.
    u = ce_scores(pred, ref, uncertain_as="positive")
    assert (u["ce_per_observation"]["Cardiomegaly"]["fp"], u["ce_uncertain_as"]) == (2, "positive")
    assert u["ce_per_observation"]["Edema"]["tp"] == 3
    with pytest.raises(ValueError, match="uncertain_as"):
        ce_scores(pred, ref, uncertain_as="ignore")  # type: ignore[arg-type]


def test_evaluate_rejects_bad_input(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1, "reference": "a"}\n')
    with pytest.raises(ValueError, match=r"line 1: missing 'prediction'"):
        evaluate_predictions(path)
    path.write_text('{"id": 1, "reference": "a", "prediction": "b"}\n' * 2)
    with pytest.raises(ValueError, match="appears more than once"):
        evaluate_predictions(path)
    result = CliRunner().invoke(app, ["eval", str(path), "--uncertain-as", "maybe"])
    assert result.exit_code == 2


# -- leaderboard ---------------------------------------------------------------------------------


def write_run(folder, *, method, metrics, predictions, info=None):
    from PIL import Image

    eval_dir = folder / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    for i, record in enumerate(predictions):
        if "image" in record:
            Image.new("L", (64, 64), 40 * i).save(eval_dir / record["image"])
    (eval_dir / "predictions.jsonl").write_text(
        "\n".join(json.dumps(p) for p in predictions) + "\n"
    )
    if info is not None:
        (eval_dir / "run.json").write_text(json.dumps({"method": method, **info}))


def test_leaderboard_table_and_picture(tmp_path):
    from PIL import Image

    from raydiology.evaluation.leaderboard import matching_keys, sentences

    assert sentences("No effusion. Heart  is normal .") == ["No effusion.", "Heart is normal ."]
    assert matching_keys("No effusion. Heart is normal.", "heart is normal . big heart .") == {
        "heart is normal"
    }

    def metrics(b4, f1):
        return {"BLEU_4": b4, "ROUGE_L": 0.3, "METEOR": 0.15, "CIDEr": 0.25,
                "ce_precision_micro": 0.4, "ce_recall_micro": 0.35, "ce_f1_micro": f1}  # fmt: skip

    refs = ["No effusion. The heart is normal.", "Small left effusion.", "Cardiomegaly."]
    write_run(
        tmp_path / "r2gengpt",
        method="R2GenGPT",
        metrics=metrics(0.134, 0.389),
        info={
            "encoder": "Swin-B",
            "decoder": "Llama-2-7B",
            "trainable_params": 5_120_000,
            "test_time_per_report_s": 0.41,
        },
        predictions=[
            {
                "id": f"s{i}",
                "reference": r,
                "prediction": "The heart is normal.",
                "image": f"s{i}.png",
            }
            for i, r in enumerate(refs)
        ],
    )
    write_run(
        tmp_path / "baseline",
        method="ignored: no run.json",
        metrics={
            **metrics(0.1, 0.2),
            "test_time_per_report_s": 10,
            "labeler": "chexbert",
            "protocol": {**PRESETS["r2gen-iu"].describe()},
            "ce_labeler_matches_protocol": False,
        },
        predictions=[
            {"id": f"s{i}", "reference": r, "prediction": "No effusion."}
            for i, r in enumerate(refs[:2])
        ],
    )
    out = tmp_path / "board"
    result = CliRunner().invoke(
        app, ["leaderboard", str(tmp_path / "r2gengpt"), str(tmp_path / "baseline" / "eval"),
              "--out", str(out), "--examples", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = (out / "leaderboard.md").read_text().splitlines()
    assert lines[0].startswith(
        "| Method | Encoder | Decoder | Protocol | CE labeler | B4 | R | M | C | P | R | F1 |"
    )
    assert lines[2] == (
        "| R2GenGPT | Swin-B | Llama-2-7B | - | - | 0.134 | 0.300 | 0.150 | 0.250 | 0.400 "
        "| 0.350 | 0.389 | 0.41 s | 5.1M |"
    )
    # the protocol spelled out; CheXbert labels under a protocol whose papers used the
    # CheXpert labeler are starred
    assert lines[3].startswith(
        "| baseline | - | - | r2gen-iu (findings, iu, words:60, no PTB, uncertain -) "
        "| chexbert* | 0.100 |"
    )
    assert "| 10 s | - |" in lines[3]
    page = (out / "leaderboard.html").read_text()
    assert "<mark>The heart is normal.</mark>" in page and "examples.png" in page
    # Two studies were predicted by both runs: two rows of at least one thumbnail each.
    with Image.open(out / "examples.png") as picture:
        width, height = picture.size
        assert height >= 2 * 224 and width > 224 + 3 * 300
        assert picture.getpixel((10, 60)) != (255, 255, 255)  # the first study's image
    assert "s2" not in page  # only ids every run has
