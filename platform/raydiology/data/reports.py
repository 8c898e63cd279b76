"""Radiology report corpora read into one record type, ready to be joined to images.

Report generation and image-text objectives (MambaXray-VL, MedViLL) need each image's report,
but every public corpus ships its text differently: Open-I as one XML file per study, R2Gen as
an `annotation.json` with splits, CheXpert Plus as one CSV row per image, MIMIC-CXR as one text
file per study. The readers here turn each into `ReportRecord`s whose `image_keys` name the
images the way the source names them, so ingest can attach the report to the right pixels;
`index_by_image_key` refuses a key claimed by two studies, because a silent overwrite would
train on the wrong report.

`clean_report` reproduces R2Gen's report cleaning exactly, so vocabularies and NLG metrics
computed here compare with the published numbers.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
OPENI_ARCHIVE = "NLMCXR_reports.tgz"  # inside torchxrayvision/data/; CC BY-NC-ND: never copied


@dataclass(frozen=True, kw_only=True)
class ReportRecord:
    study_id: str
    # How the source names the study's images: file stems, so ingest can join on them. Where
    # stems alone repeat across studies (R2Gen's IU `0.png`, CheXpert's `view1_frontal.jpg`)
    # the key keeps the folders that make it unique, joined with "/".
    image_keys: tuple[str, ...]
    # The training text: findings then impression, in the source's order, joined by a space;
    # whichever exists when only one does; "" when neither.
    report: str
    findings: str | None
    impression: str | None
    split: str | None = None  # train/val/test where the corpus defines it
    labels: dict[str, str] = field(default_factory=dict)  # e.g. Open-I MeSH terms, ";"-joined


def _join_sections(*sections: str | None) -> str:
    return " ".join(s for s in sections if s)


def _text_or_none(text: str | None) -> str | None:
    """Blank section text means "not written", which is not the same as an empty report."""
    if text is None:
        return None
    text = text.strip()
    return text or None


# -- Open-I / Indiana University ------------------------------------------------------------


def default_openi_archive() -> Path:
    """The Open-I report archive bundled with torchxrayvision, found without importing it.

    `find_spec` locates the package without importing torch, which keeps a report-only read
    fast; the archive stays where the package put it because its licence forbids copies.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Open-I reports: torchxrayvision is not installed, so its {OPENI_ARCHIVE} "
            "cannot be found; pass the path to the .tgz or a folder of ecgen-radiology XMLs"
        )
    archive = Path(next(iter(spec.submodule_search_locations))) / "data" / OPENI_ARCHIVE
    if not archive.is_file():
        raise FileNotFoundError(f"Open-I reports: {archive} does not exist")
    return archive


def _natural_key(name: str) -> tuple[Any, ...]:
    """Sort `2.xml` before `10.xml`, so records come out in the corpus's own numbering."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _openi_documents(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name for messages, XML bytes) for every report in a .tgz, a folder or one .xml file."""
    if path.is_dir():
        files = sorted(path.rglob("*.xml"), key=lambda p: _natural_key(p.as_posix()))
        if not files:
            raise FileNotFoundError(f"Open-I reports: no .xml files under {path}")
        for file in files:
            yield str(file), file.read_bytes()
    elif path.is_file() and path.suffix.lower() == ".xml":
        yield str(path), path.read_bytes()
    elif path.is_file():
        try:
            with tarfile.open(path) as archive:
                members = [
                    m for m in archive.getmembers() if m.isfile() and m.name.endswith(".xml")
                ]
                if not members:
                    raise ValueError(f"{path}: the archive holds no .xml files")
                for member in sorted(members, key=lambda m: _natural_key(m.name)):
                    handle = archive.extractfile(member)
                    assert handle is not None  # isfile() members always have data
                    yield f"{path}:{member.name}", handle.read()
        except tarfile.TarError as e:
            raise ValueError(f"{path}: not a readable tar archive of Open-I XMLs: {e}") from e
    else:
        raise FileNotFoundError(f"Open-I reports: {path} does not exist")


def _parse_openi(name: str, data: bytes) -> ReportRecord:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        line, column = e.position
        raise ValueError(f"{name}: line {line}, column {column}: malformed XML: {e}") from e

    uid = root.find("uId")
    pmc = root.find("pmcId")
    if uid is not None and uid.get("id"):
        study_id = str(uid.get("id"))
    elif pmc is not None and pmc.get("id"):
        study_id = f"CXR{pmc.get('id')}"  # uId is "CXR" + pmcId throughout the corpus
    else:
        raise ValueError(f"{name}: neither <uId id=...> nor <pmcId id=...> names the study")

    sections: dict[str, str | None] = {}
    for element in root.iter("AbstractText"):
        label = element.get("Label")
        if not label:
            raise ValueError(f"{name}: <AbstractText> without a Label attribute")
        sections[label.upper()] = _text_or_none("".join(element.itertext()))
    findings, impression = sections.get("FINDINGS"), sections.get("IMPRESSION")

    keys: list[str] = []
    for number, element in enumerate(root.iter("parentImage"), start=1):
        key = element.get("id")
        if not key:
            raise ValueError(f"{name}: <parentImage> number {number} has no id attribute")
        if key not in keys:
            keys.append(key)

    labels: dict[str, str] = {}
    for tag, label in (("major", "mesh"), ("automatic", "mesh_automatic")):
        terms = [t for e in root.iter(tag) if (t := "".join(e.itertext()).strip())]
        if terms:
            labels[label] = ";".join(terms)

    return ReportRecord(
        study_id=study_id,
        image_keys=tuple(keys),
        report=_join_sections(findings, impression),
        findings=findings,
        impression=impression,
        labels=labels,
    )


def read_openi(path: str | Path | None = None) -> list[ReportRecord]:
    """Open-I (Indiana University) chest X-ray reports, one record per ecgen-radiology XML.

    `path` is the `NLMCXR_reports.tgz` archive, a folder of the XMLs, or None for the copy
    inside the installed torchxrayvision package (read in place: CC BY-NC-ND forbids copies).
    `study_id` is the `<uId>` ("CXR1"), the prefix of the study's image names; `image_keys`
    are the `<parentImage id>`s ("CXR1_1_IM-0001-3001"), the image file stems. FINDINGS and
    IMPRESSION come from `<AbstractText Label=...>`; MeSH `<major>` terms go to
    `labels["mesh"]` and `<automatic>` terms to `labels["mesh_automatic"]`, ";"-joined.
    Reports without images are kept with empty `image_keys`: whether a text-only report is
    useful (language-model pretraining) or noise is the caller's decision.
    """
    source = default_openi_archive() if path is None else Path(path)
    return [_parse_openi(name, data) for name, data in _openi_documents(source)]


# -- R2Gen annotation.json ------------------------------------------------------------------


def read_r2gen_annotation(
    path: str | Path, *, dataset: Literal["iu", "mimic"]
) -> list[ReportRecord]:
    """Records from R2Gen's `annotation.json`: `{"train": [...], "val": [...], "test": [...]}`.

    Each entry has `id`, `report` and `image_path` (paths relative to R2Gen's image folder);
    `split` is the top-level key the entry sits under. The annotation does not say which
    report section its text is (R2Gen used findings), so `findings`/`impression` stay None.

    dataset="iu": entries are per study (`id` "CXR2384_IM-0942"), images sit at
    `CXR2384_IM-0942/0.png`; a bare stem ("0") would repeat in every study, so the key is
    folder and stem, "CXR2384_IM-0942/0". dataset="mimic": entries are per image (`id` is the
    DICOM id, also the file stem and the key); `study_id` is "s" + the entry's `study_id`, as
    in MIMIC-CXR's own folders, so several records may share a study.
    """
    path = Path(path)
    if dataset not in ("iu", "mimic"):
        raise ValueError(f"dataset must be 'iu' or 'mimic', not {dataset!r}")
    if not path.is_file():
        raise FileNotFoundError(f"R2Gen annotation: {path} does not exist")
    try:
        annotation = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from e
    if not isinstance(annotation, dict):
        raise ValueError(f"{path}: expected an object of splits, got {type(annotation).__name__}")

    records = []
    for split, entries in annotation.items():
        if not isinstance(entries, list):
            raise ValueError(f"{path}: split {split!r} is not a list of entries")
        for index, entry in enumerate(entries):
            where = f"{path}: {split}[{index}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
            missing = [k for k in ("id", "report", "image_path") if k not in entry]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(map(repr, missing))}")
            if entry.get("split", split) != split:
                raise ValueError(f"{where}: says split {entry['split']!r} but sits under {split!r}")
            image_paths = entry["image_path"]
            if isinstance(image_paths, str):
                image_paths = [image_paths]
            keys = []
            for image_path in image_paths:
                pure = PurePosixPath(str(image_path).replace("\\", "/"))
                keys.append(f"{pure.parent.name}/{pure.stem}" if dataset == "iu" else pure.stem)
            if dataset == "mimic" and entry.get("study_id") is not None:
                study_id = f"s{entry['study_id']}"
            else:
                study_id = str(entry["id"])
            records.append(
                ReportRecord(
                    study_id=study_id,
                    image_keys=tuple(dict.fromkeys(keys)),
                    report=str(entry["report"]).strip(),
                    findings=None,
                    impression=None,
                    split=split,
                )
            )
    return records


# -- CheXpert Plus --------------------------------------------------------------------------

CHEXPERT_PLUS_COLUMNS = (
    "path_to_image",
    "section_findings",
    "section_impression",
    "report",
    "split",
)


def read_chexpert_plus(csv_path: str | Path) -> list[ReportRecord]:
    """One record per study from a CheXpert Plus CSV (`df_chexpert_plus_240401.csv` layout).

    Columns read: `path_to_image` (required; "train/patient42142/study5/view1_frontal.jpg"),
    and where present `section_findings`, `section_impression`, `report` (the full text, used
    as the report only when neither section is filled) and `split`; all others are ignored.
    The CSV has one row per image, so rows are grouped by study: `study_id` is
    "patient42142/study5" and each image key is "patient42142/study5/view1_frontal" (CheXpert
    reuses "view1_frontal" in every study). Rows of one study that disagree about the text or
    the split raise, naming both rows, rather than letting one silently win.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CheXpert Plus CSV: {csv_path} does not exist")
    studies: dict[str, dict[str, Any]] = {}
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "path_to_image" not in reader.fieldnames:
            raise ValueError(f"{csv_path}: no 'path_to_image' column (header: {reader.fieldnames})")
        for row in reader:
            where = f"{csv_path}: line {reader.line_num}"
            parts = PurePosixPath(row["path_to_image"].strip().replace("\\", "/")).parts
            if len(parts) < 3:
                raise ValueError(
                    f"{where}: path_to_image {row['path_to_image']!r} lacks patient/study folders"
                )
            study_id = "/".join(parts[-3:-1])
            key = f"{study_id}/{PurePosixPath(parts[-1]).stem}"
            findings = _text_or_none(row.get("section_findings"))
            impression = _text_or_none(row.get("section_impression"))
            text = _join_sections(findings, impression) or (_text_or_none(row.get("report")) or "")
            content = (findings, impression, text, _text_or_none(row.get("split")))
            study = studies.get(study_id)
            if study is None:
                studies[study_id] = {"content": content, "keys": [key], "where": where}
                continue
            if study["content"] != content:
                raise ValueError(
                    f"{where}: study {study_id} has a different report or split than at "
                    f"{study['where']}"
                )
            if key not in study["keys"]:
                study["keys"].append(key)

    records = []
    for study_id, study in studies.items():
        findings, impression, text, split = study["content"]
        records.append(
            ReportRecord(
                study_id=study_id,
                image_keys=tuple(study["keys"]),
                report=text,
                findings=findings,
                impression=impression,
                split=split,
            )
        )
    return records


# -- MIMIC-CXR ------------------------------------------------------------------------------

# Headings in any case when they are known section names; other all-capital "WORDS:" at a line
# start end a section too ("WET READ:", "NOTIFICATION:"), while a sentence such as
# "Heart size: normal" inside the findings does not.
_KNOWN_HEADINGS = (
    "findings", "impression", "impressions", "conclusion", "comparison", "comparisons",
    "indication", "indications", "history", "clinical history", "technique", "examination",
    "exam", "reason for exam", "reason for examination", "recommendation", "recommendations",
    "recommendation(s)", "notification", "addendum", "wet read", "final report",
)  # fmt: skip
_HEADING = re.compile(
    r"^[ \t]*(?:(?i:(?P<known>" + "|".join(re.escape(h) for h in _KNOWN_HEADINGS) + r"))"
    r"|(?P<caps>[A-Z][A-Z()/&\- ]{0,40}))[ \t]*:",
    re.MULTILINE,
)
_MIMIC_REPORT = re.compile(r"s\d+\.txt")


def _mimic_sections(text: str) -> dict[str, str | None]:
    """FINDINGS and IMPRESSION text, each up to the next heading; repeated sections joined."""
    found: dict[str, list[str]] = {"findings": [], "impression": []}
    headings = []
    for match in _HEADING.finditer(text):
        name = match.group("known") or match.group("caps")
        headings.append((name.strip().lower(), match.start(), match.end()))
    for i, (name, _, end) in enumerate(headings):
        stop = headings[i + 1][1] if i + 1 < len(headings) else len(text)
        key = "impression" if name == "impressions" else name
        if key in found:
            # MIMIC wraps lines at a fixed width: line breaks carry no meaning.
            body = " ".join(text[end:stop].split())
            if body:
                found[key].append(body)
    return {k: (" ".join(v) or None) for k, v in found.items()}


def read_mimic_reports(folder: str | Path) -> list[ReportRecord]:
    """MIMIC-CXR free-text reports: one record per `files/pXX/pXXXXXXXX/sXXXXXXXX.txt`.

    FINDINGS and IMPRESSION are the text after those headings (any case, on their own line
    or followed by text) up to the next heading, whitespace collapsed. `study_id` is the file
    stem ("s50414267"). `image_keys` are the stems of images in the sibling folder
    `sXXXXXXXX/` (the MIMIC-CXR-JPG layout), empty when the images live elsewhere.
    The reports carry no split (MIMIC-CXR publishes it separately).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"MIMIC-CXR reports: folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("s*.txt") if _MIMIC_REPORT.fullmatch(p.name))
    if not files:
        raise FileNotFoundError(f"MIMIC-CXR reports: no sXXXXXXXX.txt files under {folder}")
    records = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text: {e}") from e
        sections = _mimic_sections(text)
        images = file.with_suffix("")
        keys: tuple[str, ...] = ()
        if images.is_dir():
            keys = tuple(
                sorted(p.stem for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            )
        records.append(
            ReportRecord(
                study_id=file.stem,
                image_keys=keys,
                report=_join_sections(sections["findings"], sections["impression"]),
                findings=sections["findings"],
                impression=sections["impression"],
            )
        )
    return records


# -- R2Gen cleaning -------------------------------------------------------------------------

# R2Gen cleans with chains of `str.replace`, each applied once, left to right, without
# overlap. A run of n dots therefore shrinks to ceil(n / 8) after three passes, not to one, and
# "11. " loses its "1. ": the exact chains below keep those quirks so outputs match R2Gen's.
_NUMBERING = (
    ("1. ", ""),
    *((f". {n}. ", ". ") for n in range(2, 6)),
    *((f" {n}. ", ". ") for n in range(2, 6)),
)
_MIMIC = (("\n", " "),) + (("__", "_"),) * 7 + (("  ", " "),) * 6 + (("..", "."),) * 8 + _NUMBERING
_REPLACEMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "iu": (("..", "."),) * 3 + _NUMBERING,
    "mimic": _MIMIC,
    # R2GenGPT's MIMIC chain (dataset/data_helper.py, clean_report) is R2Gen's plus a space
    # before every colon, which its sentence cleaner then keeps.
    "r2gengpt-mimic": (*_MIMIC, (":", " :")),
}
_QUOTES_AND_SLASHES = str.maketrans("", "", "\"'/\\")
# R2Gen's class `[.,?;*!%^&_+():-\[\]{}]` holds the range ":" to "[", which is ":;<=>?@",
# A-Z and "[": so "<=>@" go too, while hyphens and digits stay. R2GenGPT's MIMIC class,
# `[.,?;*!%^&_+()\[\]{}]`, has no range: colons and "<=>@" stay.
_DROPPED = {
    "iu": re.compile(r"[.,?;*!%^&_+()\[\]{}:<=>@A-Z]"),
    "mimic": re.compile(r"[.,?;*!%^&_+()\[\]{}:<=>@A-Z]"),
    "r2gengpt-mimic": re.compile(r"[.,?;*!%^&_+()\[\]{}]"),
}
CleanStyle = Literal["iu", "mimic", "r2gengpt-mimic"]
CLEAN_STYLES: tuple[str, ...] = tuple(_REPLACEMENTS)


def clean_report(text: str, *, style: CleanStyle) -> str:
    """R2Gen's report cleaning (`clean_report_iu_xray` / `clean_report_mimic_cxr`), same output;
    `r2gengpt-mimic` is R2GenGPT's variant for MIMIC-CXR (colons kept, spaced off).

    Vocabularies, token counts and BLEU/METEOR/ROUGE in the report-generation literature are
    computed on text cleaned this way, so our numbers compare only if we clean identically,
    quirks included. Steps: (mimic only) newlines become spaces, runs of underscores and of
    spaces shrink; runs of dots shrink; list numbers "1. " to "5. " go; the text is stripped,
    lowercased and split into sentences at ". "; in each sentence quotes, slashes and
    backslashes go, it is stripped, and punctuation `.,?;*!%^&_+()[]{}:<=>@` is dropped
    (hyphens and digits stay); sentences are joined with " . " and " ." ends the result.
    Empty sentences are kept, as R2Gen keeps them, so empty input gives " .".
    """
    try:
        replacements, dropped = _REPLACEMENTS[style], _DROPPED[style]
    except KeyError:
        raise ValueError(f"style must be one of {CLEAN_STYLES}, not {style!r}") from None
    for old, new in replacements:
        text = text.replace(old, new)
    sentences = text.strip().lower().split(". ")
    cleaned = [dropped.sub("", s.translate(_QUOTES_AND_SLASHES).strip().lower()) for s in sentences]
    return " . ".join(cleaned) + " ."


# -- joining --------------------------------------------------------------------------------


def index_by_image_key(records: Iterable[ReportRecord]) -> dict[str, ReportRecord]:
    """Image key -> its record, for attaching reports to images at ingest.

    A key claimed by two different records raises ValueError naming both studies: letting the
    later one win would quietly pair an image with another study's report. The same record
    met twice (a corpus read twice) is not a conflict.
    """
    index: dict[str, ReportRecord] = {}
    for record in records:
        for key in record.image_keys:
            earlier = index.setdefault(key, record)
            if earlier is not record and earlier != record:
                if earlier.study_id == record.study_id:
                    raise ValueError(
                        f"image key {key!r} is claimed by two different records of study "
                        f"{record.study_id!r}"
                    )
                raise ValueError(
                    f"image key {key!r} is claimed by study {earlier.study_id!r} and by study "
                    f"{record.study_id!r}"
                )
    return index
