"""CXPMRG-Bench-style leaderboard of report-generation runs: a table and example pictures.

Run-results format (what a report-generation run writes, and all this module reads):

    <run>/eval/metrics.json       `raydiology eval` output for the test split (report_eval.py;
                                  `predictions.metrics.json`, its default name, also works)
    <run>/eval/predictions.jsonl  one {"id", "reference", "prediction"} per test report, and
                                  optionally "image": the study's image file (absolute, or
                                  relative to this eval/ folder), shown in the examples picture
    <run>/eval/run.json           optional description, every key optional:
                                  {"method": "R2GenGPT", "encoder": "Swin-B",
                                   "decoder": "Llama-2-7B", "trainable_params": 5100000,
                                   "test_time_per_report_s": 0.41}

A RUNS argument may name `<run>`, `<run>/eval`, or the metrics.json itself. Missing
descriptions fall back to the run folder's name and "-". Test time is generation alone per
report (`raydiology generate` measures it with the model loaded and warmed up). The protocol
and labeler columns come from metrics.json (`raydiology eval` records them); a labeler that
is not the one the protocol names is starred. CE columns are the micro averages, as R2Gen's
CE code reports them.

The examples picture puts, for a few studies every run predicted, the image next to the
reference and each run's report; sentences that a generated report shares with the reference
(same words, case and punctuation aside) are highlighted in both.
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = ("Method", "Encoder", "Decoder", "Protocol", "CE labeler", "B4", "R", "M", "C", "P",
           "R", "F1", "Test time / report", "Trainable params")  # fmt: skip
_METRIC_KEYS = ("BLEU_4", "ROUGE_L", "METEOR", "CIDEr",
                "ce_precision_micro", "ce_recall_micro", "ce_f1_micro")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class RunResult:
    folder: Path  # the eval/ folder
    method: str
    encoder: str
    decoder: str
    metrics: dict[str, Any]
    trainable_params: int | None = None
    test_time_per_report_s: float | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)


# `metrics.json`, or what `raydiology eval eval/predictions.jsonl` writes beside its input
_METRICS_FILES = ("metrics.json", "predictions.metrics.json")


def load_run(path: str | os.PathLike) -> RunResult:
    """A run's results from `<run>`, `<run>/eval` or `<run>/eval/metrics.json`."""
    path = Path(path)
    candidates = [path] if path.is_file() else [
        folder / name for folder in (path / "eval", path) for name in _METRICS_FILES
    ]  # fmt: skip
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"{path}: no metrics (expected <run>/eval/metrics.json or the "
            "predictions.metrics.json that `raydiology eval` writes)"
        )
    folder = found.parent
    metrics = json.loads(found.read_text(encoding="utf-8"))
    missing = [k for k in _METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"{found}: missing {', '.join(missing)}")
    info: dict[str, Any] = {}
    if (folder / "run.json").is_file():
        info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    predictions = []
    if (folder / "predictions.jsonl").is_file():
        with (folder / "predictions.jsonl").open(encoding="utf-8") as handle:
            predictions = [json.loads(line) for line in handle if line.strip()]
    name = folder.parent.name if folder.name == "eval" else folder.name
    test_time = info.get("test_time_per_report_s", metrics.get("test_time_per_report_s"))
    return RunResult(
        folder=folder,
        method=str(info.get("method", name)),
        encoder=str(info.get("encoder", "-")),
        decoder=str(info.get("decoder", "-")),
        metrics=metrics,
        trainable_params=info.get("trainable_params"),
        test_time_per_report_s=None if test_time is None else float(test_time),
        predictions=predictions,
    )


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _protocol(p: dict[str, Any]) -> str:
    """'r2gen-iu (findings, iu, words:60, no PTB, uncertain -)' or '-' without a record."""
    if not p:
        return "-"
    ptb = "PTB" if p.get("ptb") else "no PTB"
    uncertain = "+" if p.get("ce_uncertain_as") == "positive" else "-"
    return (f"{p.get('name')} ({p.get('report_field')}, {p.get('clean')}, "
            f"{p.get('reference_truncation')}, {ptb}, uncertain {uncertain})")  # fmt: skip


def table_rows(runs: list[RunResult]) -> list[list[str]]:
    """One row of strings per run, in COLUMNS order."""
    rows = []
    for run in runs:
        m = run.metrics
        t = run.test_time_per_report_s
        time_s = "-" if t is None else f"{t:.3g} s"
        protocol = m.get("protocol") or {}
        labeler = str(m.get("labeler", "-"))
        if protocol and not m.get("ce_labeler_matches_protocol", True):
            labeler += "*"  # not the labeler the protocol's published numbers used
        rows.append([run.method, run.encoder, run.decoder, _protocol(protocol), labeler,
                     *(f"{float(m[k]):.3f}" for k in _METRIC_KEYS),
                     time_s, _params(run.trainable_params)])  # fmt: skip
    return rows


def markdown_table(runs: list[RunResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    return "\n".join(lines) + "\n"


# -- sentence matching ----------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")


def sentences(report: str) -> list[str]:
    """Sentences of a report, punctuation kept (R2Gen's "word ." style splits too)."""
    parts = re.split(r"(?<=[.!?;])\s+", " ".join(report.split()))
    return [p for p in parts if _WORD.search(p.lower())]


def sentence_key(sentence: str) -> str:
    """What two sentences must share to match: their words, lower case."""
    return " ".join(_WORD.findall(sentence.lower()))


def matching_keys(reference: str, prediction: str) -> set[str]:
    return {sentence_key(s) for s in sentences(reference)} & {
        sentence_key(s) for s in sentences(prediction)
    }


# -- examples -------------------------------------------------------------------------------


def common_examples(runs: list[RunResult], n: int) -> list[str]:
    """Up to n ids every run predicted, in the first run's order."""
    if not runs:
        return []
    shared = set.intersection(*({str(p["id"]) for p in r.predictions} for r in runs))
    return [str(p["id"]) for p in runs[0].predictions if str(p["id"]) in shared][:n]


def _image_path(run: RunResult, record: dict[str, Any]) -> Path | None:
    image = record.get("image")
    if not image:
        return None
    path = Path(image)
    return path if path.is_absolute() else run.folder / path


def examples_picture(
    runs: list[RunResult], out: str | os.PathLike, *, n: int = 4, width: int = 330
) -> Path | None:
    """PNG: one row per example, columns image | reference | each run; matches highlighted."""
    from PIL import Image, ImageDraw, ImageFont

    ids = common_examples(runs, n)
    if not ids:
        return None
    font = ImageFont.load_default(size=13)
    bold = ImageFont.load_default(size=14)
    by_id = [{str(p["id"]): p for p in r.predictions} for r in runs]
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    line_h, pad, thumb = 17, 8, 224

    def layout(report: str, keys: set[str]) -> list[tuple[str, bool]]:
        """Wrapped lines, each flagged when it belongs to a matching sentence."""
        lines = []
        for sentence in sentences(report):
            hit = sentence_key(sentence) in keys
            current = ""
            for word in sentence.split():
                trial = f"{current} {word}".strip()
                if current and probe.textlength(trial, font=font) > width - 2 * pad:
                    lines.append((current, hit))
                    current = word
                else:
                    current = trial
            if current:
                lines.append((current, hit))
        return lines

    rows = []
    for example in ids:
        first = by_id[0][example]
        reference = str(first["reference"])
        per_run = [str(b[example]["prediction"]) for b in by_id]
        matched = [matching_keys(reference, p) for p in per_run]
        texts = [layout(reference, set().union(*matched))]
        texts += [layout(p, keys) for p, keys in zip(per_run, matched, strict=True)]
        height = max(thumb, max(len(t) for t in texts) * line_h) + 2 * pad + line_h
        rows.append((example, _image_path(runs[0], first), texts, height))

    header_h = line_h + 2 * pad
    total_w = thumb + 2 * pad + width * (1 + len(runs))
    canvas = Image.new("RGB", (total_w, header_h + sum(r[3] for r in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    titles = ["Reference", *(r.method for r in runs)]
    for i, title in enumerate(titles):
        draw.text((thumb + 2 * pad + i * width + pad, pad), title, fill="black", font=bold)
    y = header_h
    for example, image_path, texts, height in rows:
        draw.line([(0, y), (total_w, y)], fill=(200, 200, 200))
        draw.text((pad, y + pad), str(example), fill=(90, 90, 90), font=font)
        if image_path is not None and image_path.is_file():
            with Image.open(image_path) as image:
                picture = image.convert("RGB")
                picture.thumbnail((thumb, thumb))
            canvas.paste(picture, (pad, y + pad + line_h))
        else:
            box = (pad, y + pad + line_h, pad + thumb, y + pad + line_h + thumb)
            draw.rectangle(box, fill=(235, 235, 235))
            draw.text((pad + 8, y + pad + line_h + 8), "no image", fill="gray", font=font)
        for i, lines in enumerate(texts):
            x = thumb + 2 * pad + i * width + pad
            for k, (line, hit) in enumerate(lines):
                top = y + pad + line_h + k * line_h
                if hit:
                    right = x + probe.textlength(line, font=font)
                    draw.rectangle(
                        (x - 2, top - 1, right + 2, top + line_h - 2), fill=(198, 239, 206)
                    )
                draw.text((x, top), line, fill="black", font=font)
        y += height
    out = Path(out)
    canvas.save(out)
    return out


def _html_report(report: str, keys: set[str]) -> str:
    parts = []
    for sentence in sentences(report):
        text = html.escape(sentence)
        parts.append(f"<mark>{text}</mark>" if sentence_key(sentence) in keys else text)
    return " ".join(parts)


def html_page(runs: list[RunResult], *, picture: str | None, n: int = 4) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
        for row in table_rows(runs)
    )
    page = [
        "<!doctype html><meta charset='utf-8'><title>Report generation leaderboard</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "mark{background:#c6efce}</style>",
        "<h1>Report generation leaderboard</h1>",
        "<p>B4 BLEU-4, R ROUGE-L, M METEOR, C CIDEr; P / R / F1 clinical efficacy (micro, "
        "CheXpert observations; uncertain counted as the protocol says: - negative, + "
        "positive). Protocol: its name (report section, cleaning, reference truncation, PTB). "
        "A starred labeler is not the one the protocol's papers used. Test time: generation "
        "alone per report.</p>",
        f"<table><tr>{head}</tr>{body}</table>",
    ]
    ids = common_examples(runs, n)
    if ids:
        by_id = [{str(p["id"]): p for p in r.predictions} for r in runs]
        cells = "".join(f"<th>{html.escape(r.method)}</th>" for r in runs)
        rows = []
        for example in ids:
            reference = str(by_id[0][example]["reference"])
            per_run = [str(b[example]["prediction"]) for b in by_id]
            matched = [matching_keys(reference, p) for p in per_run]
            rows.append(
                f"<tr><td>{html.escape(example)}</td>"
                f"<td>{_html_report(reference, set().union(*matched))}</td>"
                + "".join(
                    f"<td>{_html_report(p, k)}</td>" for p, k in zip(per_run, matched, strict=True)
                )
                + "</tr>"
            )
        page += ["<h2>Examples</h2>", "<p>Highlighted: sentences shared with the reference.</p>",
                 f"<table><tr><th>id</th><th>Reference</th>{cells}</tr>{''.join(rows)}</table>"]  # fmt: skip
    if picture:
        page.append(f"<p><img src='{html.escape(picture)}' alt='examples'></p>")
    return "\n".join(page) + "\n"


def build_leaderboard(
    runs: list[str | os.PathLike], out_dir: str | os.PathLike, *, examples: int = 4
) -> dict[str, Path]:
    """Write leaderboard.md, leaderboard.html and examples.png (when runs have predictions)."""
    loaded = [load_run(r) for r in runs]
    if not loaded:
        raise ValueError("no runs given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"markdown": out / "leaderboard.md", "html": out / "leaderboard.html"}
    written["markdown"].write_text(markdown_table(loaded), encoding="utf-8")
    picture = examples_picture(loaded, out / "examples.png", n=examples) if examples else None
    if picture is not None:
        written["picture"] = picture
    written["html"].write_text(
        html_page(loaded, picture=picture.name if picture else None, n=examples), encoding="utf-8"
    )
    return written
