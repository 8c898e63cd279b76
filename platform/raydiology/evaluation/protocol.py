"""Evaluation protocols: the choices that decide whether a report-generation score can be set
beside a published one.

Two papers' BLEU-4 compare only when both cleaned the text alike, scored the same report
section, cut references the same way, tokenized (or not) with PTB before scoring, and made
their clinical-efficacy labels with the same labeler and uncertain mapping. A protocol names
those choices; an experiment picks one (`evaluation.protocol`), generation builds references
by it (`reference_text`), and every metrics JSON and leaderboard row records it (`describe`).

    clean                 model (as the run's tokenizer prepares reports), none, iu, mimic,
                          r2gengpt-mimic (data/reports.py clean_report)
    report_field          findings, impression or findings+impression (the `report` column)
    reference_truncation  none; words:N (R2Gen: the first N-1 words after its BOS, words
                          outside the run's word vocabulary as <unk>); llm:N (the first N
                          tokens of the run's tokenizer, as R2GenGPT cuts its references)
    ptb                   PTB-tokenize both sides before NLG scoring (COCO) or not
    ce_labeler            which labeler the protocol's CE numbers come from
    ce_uncertain_as       uncertain (-1) labels counted as negative or positive
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from raydiology.config_base import check

Clean = Literal["model", "none", "iu", "mimic", "r2gengpt-mimic"]
ReportField = Literal["findings", "impression", "findings+impression"]
# CE labelers a protocol may name: ours, CheXbert, or the CheXpert labeler's CSVs
# (`raydiology eval --labels-ref/--labels-pred`).
CE_LABELERS = ("raydiology-rules", "chexbert", "chexpert-labeler")
_TRUNCATION = re.compile(r"none|(words|llm):([1-9][0-9]*)")
FIELD_COLUMNS: dict[str, str] = {
    "findings": "findings", "impression": "impression", "findings+impression": "report",
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Protocol:
    name: str
    clean: Clean = "model"
    report_field: ReportField = "findings+impression"
    reference_truncation: str = "none"
    ptb: bool = False
    ce_labeler: str = "raydiology-rules"
    ce_uncertain_as: Literal["negative", "positive"] = "negative"
    source: str = ""  # where each choice comes from

    @property
    def column(self) -> str:
        """The corpus column references are read from."""
        return FIELD_COLUMNS[self.report_field]

    def with_changes(self, **changes: Any) -> Protocol:
        """The protocol with some choices changed; it is then no longer the named preset."""
        changed = {k: v for k, v in changes.items() if getattr(self, k) != v}
        if not changed:
            return self
        return replace(self, name=f"{self.name}+custom", source="", **changed)

    def describe(self) -> dict[str, Any]:
        """What metrics JSONs and run descriptions record."""
        return {k: v for k, v in asdict(self).items() if k != "source"}


# Each preset's choices and where they come from (the official code, read at the commit our
# `fetch` mirror holds; the CXPMRG-Bench code was not in the index, see its entry).
PRESETS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            name="raydiology",
            source="this platform's default: the report as the run's tokenizer prepares it",
        ),
        Protocol(
            name="r2gen-iu",
            clean="iu",
            report_field="findings",
            reference_truncation="words:60",
            ce_labeler="chexpert-labeler",
            source="R2Gen: modules/tokenizers.py clean_report_iu_xray; train_iu_xray.sh "
            "--max_seq_length 60 --threshold 3; modules/trainer.py scores "
            "decode_batch(reports_ids[:, 1:]) (truncated ids, <unk> kept); modules/metrics.py "
            "calls the scorers without the PTB tokenizer; README: CheXpert labeler; "
            "compute_ce.py maps -1 and blank to 0. Findings: R2Gen's annotation.json (the "
            "paper's section on data; not checked against its text here)",
        ),
        Protocol(
            name="r2gen-mimic",
            clean="mimic",
            report_field="findings",
            reference_truncation="words:100",
            ce_labeler="chexpert-labeler",
            source="R2Gen: modules/tokenizers.py clean_report_mimic_cxr; train_mimic_cxr.sh "
            "--max_seq_length 100 --threshold 10; otherwise as r2gen-iu",
        ),
        Protocol(
            name="r2gengpt-mimic",
            clean="r2gengpt-mimic",
            report_field="findings",
            reference_truncation="llm:100",
            ce_labeler="chexpert-labeler",
            source="R2GenGPT: dataset/data_helper.py clean_report (MIMIC branch); "
            "configs/config.py --max_length 100; models/R2GenGPT.py test_step decodes the "
            "references from the truncated LLM tokens and scores without PTB (score()); "
            "findings and CE labeler as R2Gen, whose annotation.json it reads",
        ),
        Protocol(
            name="cxpmrg",
            clean="r2gengpt-mimic",
            report_field="findings",
            reference_truncation="llm:100",
            ce_labeler="chexpert-labeler",
            source="CXPMRG-Bench / MambaXray-VL stage 3: findings only (issue 18's review); "
            "100 report tokens (experiments/mambaxray_vl/stage3_sft.yaml); the official code "
            "was not in the stored index, so cleaning and truncation follow R2GenGPT, which "
            "its decoding settings match -- unverified",
        ),
    )
}


def get_protocol(name: str) -> Protocol:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown evaluation protocol {name!r}; presets: {sorted(PRESETS)}"
        ) from None


@dataclass(kw_only=True)
class EvaluationConfig:
    """The experiment's `evaluation` section."""

    protocol: str = "raydiology"  # a preset of PRESETS

    def validate(self, key: str) -> None:
        check(self.protocol in PRESETS, f"{key}.protocol", self.protocol,
              f"one of the presets {sorted(PRESETS)}")  # fmt: skip


def check_truncation(value: str) -> tuple[str, int | None]:
    """('none', None) | ('words', N) | ('llm', N); ValueError names the bad value."""
    match = _TRUNCATION.fullmatch(value)
    if match is None:
        raise ValueError(f"reference_truncation {value!r}: expected none, words:N or llm:N")
    return (match.group(1), int(match.group(2))) if match.group(1) else ("none", None)


def reference_text(text: str, protocol: Protocol, tokenizer: Any) -> str:
    """The reference a generated report is scored against: `text` (the corpus's
    `protocol.column`) cleaned and cut by the protocol. `tokenizer` is the run's
    ReportTokenizer (for `clean: model` and truncation)."""
    from raydiology.data.reports import clean_report

    if protocol.clean == "model":
        text = tokenizer.prepare(text)
    elif protocol.clean != "none":
        text = clean_report(text, style=protocol.clean)
    kind, limit = check_truncation(protocol.reference_truncation)
    if kind == "words":  # R2Gen keeps max_seq_length ids, the first being its BOS
        vocabulary = tokenizer.hf.get_vocab() if tokenizer.config.kind == "word" else None
        unk = tokenizer.hf.unk_token or "<unk>"
        words = text.split()[: limit - 1]  # type: ignore[operator]
        return " ".join(w if vocabulary is None or w in vocabulary else unk for w in words)
    if kind == "llm":
        ids = tokenizer.hf.encode(text, add_special_tokens=False)[:limit]
        return str(tokenizer.hf.decode(ids, skip_special_tokens=True)).strip()
    return text
