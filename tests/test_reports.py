"""Report corpora: Open-I as torchxrayvision ships it, synthetic files in the other layouts.

The clean_report expectations were worked out by hand from R2Gen's `clean_report_iu_xray` /
`clean_report_mimic_cxr`, so a change that drifts from R2Gen's output shows up here.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import tarfile
from pathlib import Path

import pytest

from raydiology.data.reports import (
    ReportRecord,
    clean_report,
    index_by_image_key,
    read_chexpert_plus,
    read_mimic_reports,
    read_openi,
    read_r2gen_annotation,
)

# -- Open-I (real reports) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def openi() -> list[ReportRecord]:
    # find_spec rather than importing: importing torchxrayvision would import torch for nothing.
    if importlib.util.find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision is not installed: its bundled Open-I reports are the data")
    return read_openi()


def test_openi_reads_every_report(openi: list[ReportRecord]) -> None:
    assert len(openi) == 3955
    assert len({r.study_id for r in openi}) == 3955
    with_text = [r for r in openi if r.findings or r.impression]
    assert len(with_text) > 0.95 * len(openi)
    assert sum(r.findings is not None for r in openi) > 0.8 * len(openi)
    for r in with_text:
        assert r.report and (r.findings or "") in r.report and (r.impression or "") in r.report
    assert sum(bool(r.image_keys) for r in openi) > 0.95 * len(openi)
    assert any(not r.image_keys for r in openi)  # text-only reports are kept


def test_openi_image_keys_and_index(openi: list[ReportRecord]) -> None:
    keys = [k for r in openi for k in r.image_keys]
    assert all(re.fullmatch(r"CXR\d+(_\d+)?_IM-\d{4}(-\d+)+", k) for k in keys)
    for r in openi:
        assert all(k.startswith(r.study_id + "_") for k in r.image_keys)
    by_id = {r.study_id: r for r in openi}
    assert by_id["CXR1"].image_keys == ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001")

    index = index_by_image_key(openi)
    assert len(index) == len(keys)
    assert index["CXR1_1_IM-0001-4001"] is by_id["CXR1"]


def test_openi_sections_and_mesh(openi: list[ReportRecord]) -> None:
    by_id = {r.study_id: r for r in openi}
    first = by_id["CXR1"]
    assert first.findings is not None and first.findings.startswith("The cardiac silhouette")
    assert first.impression == "Normal chest x-XXXX."
    assert first.report == f"{first.findings} {first.impression}"
    # Spot checks: reports that call the lungs clear / the chest normal are MeSH "normal" ...
    for study_id, phrase in (
        ("CXR1", "normal chest"),
        ("CXR3", "clear lungs"),
        ("CXR100", "lungs are clear"),
    ):
        assert phrase in by_id[study_id].report.lower()
        assert by_id[study_id].labels["mesh"] == "normal"
    # ... and one with disease is not, its major terms ";"-joined.
    mesh = by_id["CXR4"].labels["mesh"].split(";")
    assert "normal" not in mesh and "Bullous Emphysema" in mesh
    assert "bullous emphysema" in by_id["CXR4"].labels["mesh_automatic"].split(";")


OPENI_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <uId id="CXR7"/>
   <pmcId id="7"/>
   <MedlineCitation><Article><Abstract>
      <AbstractText Label="COMPARISON">None.</AbstractText>
      <AbstractText Label="FINDINGS"/>
      <AbstractText Label="IMPRESSION">No acute disease.</AbstractText>
   </Abstract></Article></MedlineCitation>
   <MeSH><major>normal</major></MeSH>
   <parentImage id="CXR7_IM-0009-1001"><figureId>F1</figureId></parentImage>
</eCitation>
"""


def test_openi_folder_and_errors(tmp_path: Path) -> None:
    (tmp_path / "7.xml").write_text(OPENI_XML)
    [record] = read_openi(tmp_path)
    assert record == ReportRecord(
        study_id="CXR7",
        image_keys=("CXR7_IM-0009-1001",),
        report="No acute disease.",
        findings=None,
        impression="No acute disease.",
        labels={"mesh": "normal"},
    )
    (tmp_path / "8.xml").write_text("<eCitation>\n<uId id='CXR8'>\n</eCitation>")
    with pytest.raises(ValueError, match=r"8\.xml: line 3"):
        read_openi(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_openi(tmp_path / "nowhere.tgz")

    archive = tmp_path / "reports.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "7.xml", arcname="ecgen-radiology/7.xml")
        tar.add(tmp_path / "8.xml", arcname="ecgen-radiology/8.xml")
    with pytest.raises(ValueError, match=r"reports\.tgz:ecgen-radiology/8\.xml: line 3"):
        read_openi(archive)
    (tmp_path / "junk.tgz").write_bytes(b"not a tar archive")
    with pytest.raises(ValueError, match=r"junk\.tgz"):
        read_openi(tmp_path / "junk.tgz")


# -- clean_report (hand-worked from R2Gen's functions) --------------------------------------


@pytest.mark.parametrize("style", ["iu", "mimic"])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # ".." -> "."; split at ". " leaves " the lungs...", which is stripped; final "." dropped.
        (
            "The heart is normal in size.  The lungs are clear..",
            "the heart is normal in size . the lungs are clear .",
        ),
        # "1. " removed, ". 2. " -> ". ", then ordinary sentence splitting.
        (
            "1. No acute process. 2. Stable cardiomegaly. 3. Small effusion.",
            "no acute process . stable cardiomegaly . small effusion .",
        ),
        # Commas, parentheses, colons, quotes and slashes go; hyphens and digits stay.
        (
            'Comparison: "Prior" study (2010), T-spine w/ 5 mm nodule.',
            "comparison prior study 2010 t-spine w 5 mm nodule .",
        ),
        # "<=>@" fall inside R2Gen's ":" to "[" range, so they go too.
        ("Size <= 3 cm @ apex.", "size  3 cm  apex ."),
        # Three ".." passes shrink "...." to "." (a sentence break here).
        ("Stable.... Heart normal.", "stable . heart normal ."),
        # "11. " loses its "1. ", leaving "1" glued to the next word: R2Gen's quirk, kept.
        ("Impression: 11. Clear.", "impression 1clear ."),
        # Empty input: one empty sentence, as R2Gen gives.
        ("", " ."),
    ],
)
def test_clean_report_same_for_both_styles(text: str, expected: str, style: str) -> None:
    assert clean_report(text, style=style) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "iu", "mimic"),
    [
        # Only the MIMIC cleaner turns newlines into spaces, so only it splits there.
        (
            "Heart normal.\nLungs clear.",
            "heart normal\nlungs clear .",
            "heart normal . lungs clear .",
        ),
        # MIMIC shrinks "___" (de-identification) to "_", which the sentence cleaner then drops;
        # it also collapses double spaces, which IU leaves inside the sentence.
        ("___ year old  man.", " year old  man .", " year old man ."),
        # Eight dots shrink to "." in both. Nine: IU's three passes leave ".." (ceil(9/8) = 2),
        # MIMIC's eight leave "."; the sentence cleaner drops the spare dot, so both agree.
        ("Clear........ Normal.", "clear . normal .", "clear . normal ."),
        ("Clear......... Normal.", "clear . normal .", "clear . normal ."),
        # Seventeen underscores: seven "__" passes leave one "_" in MIMIC (dropped anyway).
        ("a" + "_" * 17 + "b.", "ab .", "ab ."),
    ],
)
def test_clean_report_styles_differ(text: str, iu: str, mimic: str) -> None:
    assert clean_report(text, style="iu") == iu
    assert clean_report(text, style="mimic") == mimic


def test_clean_report_rejects_unknown_style() -> None:
    with pytest.raises(ValueError, match="style"):
        clean_report("x", style="chexpert")  # type: ignore[arg-type]


# -- R2Gen annotation.json ------------------------------------------------------------------


def test_r2gen_annotation_iu(tmp_path: Path) -> None:
    annotation = {
        "train": [
            {
                "id": "CXR2384_IM-0942",
                "report": "The heart size and pulmonary vascularity appear within normal limits.",
                "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"],
                "split": "train",
            }
        ],
        "val": [
            {
                "id": "CXR2926_IM-1328",
                "report": "No acute disease. ",
                "image_path": ["CXR2926_IM-1328/0.png", "CXR2926_IM-1328/1.png"],
                "split": "val",
            }
        ],
        "test": [],
    }
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(annotation))
    train, val = read_r2gen_annotation(path, dataset="iu")
    assert train.study_id == "CXR2384_IM-0942" and train.split == "train"
    assert train.image_keys == ("CXR2384_IM-0942/0", "CXR2384_IM-0942/1")
    assert train.findings is None and train.impression is None
    assert val.report == "No acute disease." and val.split == "val"
    assert len(index_by_image_key([train, val])) == 4  # "0"/"1" alone would collide

    annotation["val"][0]["split"] = "test"
    path.write_text(json.dumps(annotation))
    with pytest.raises(ValueError, match=r"annotation\.json: val\[0\]"):
        read_r2gen_annotation(path, dataset="iu")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        read_r2gen_annotation(tmp_path / "missing.json", dataset="iu")


def test_r2gen_annotation_mimic(tmp_path: Path) -> None:
    dicom = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
    entry = {
        "id": dicom,
        "study_id": 50414267,
        "subject_id": 10000032,
        "report": "There is no focal consolidation, pleural effusion or pneumothorax.",
        "image_path": [f"p10/p10000032/s50414267/{dicom}.jpg"],
        "split": "train",
    }
    broken = {"id": "x", "image_path": []}
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps({"train": [entry], "val": [], "test": []}))
    [record] = read_r2gen_annotation(path, dataset="mimic")
    assert record.study_id == "s50414267"
    assert record.image_keys == (dicom,)
    assert record.report == entry["report"] and record.split == "train"

    path.write_text(json.dumps({"train": [entry], "val": [], "test": [broken]}))
    with pytest.raises(ValueError, match=r"test\[0\]: missing 'report'"):
        read_r2gen_annotation(path, dataset="mimic")


# -- CheXpert Plus --------------------------------------------------------------------------

CHEXPERT_HEADER = [
    "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
    "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
    "section_history", "section_comparison", "section_technique", "section_procedure_comments",
    "section_findings", "section_impression", "section_end_of_impression", "section_summary",
    "section_accession_number", "age", "sex", "race", "ethnicity", "interpreter_needed",
    "insurance_type", "recent_bmi", "deceased", "split",
]  # fmt: skip


def _chexpert_row(path: str, findings: str, impression: str, report: str, split: str) -> dict:
    row = dict.fromkeys(CHEXPERT_HEADER, "")
    row.update(
        path_to_image=path,
        report=report,
        section_findings=findings,
        section_impression=impression,
        split=split,
    )
    return row


def _write_chexpert(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CHEXPERT_HEADER)
        writer.writeheader()
        writer.writerows(rows)


def test_chexpert_plus(tmp_path: Path) -> None:
    full = (
        "NARRATIVE:\nCHEST 2 VIEWS\n\nFINDINGS:\nClear lungs.\n\nIMPRESSION:\n1. No acute findings."
    )
    rows = [
        _chexpert_row(
            "train/patient42142/study5/view1_frontal.jpg",
            "Clear lungs.\n",
            "1. No acute findings.",
            full,
            "train",
        ),
        _chexpert_row(
            "train/patient42142/study5/view2_lateral.jpg",
            "Clear lungs.\n",
            "1. No acute findings.",
            full,
            "train",
        ),
        # No sections filled: the full report text is the training text.
        _chexpert_row(
            "valid/patient64541/study1/view1_frontal.jpg", "", "", "Portable AP.", "valid"
        ),
    ]
    path = tmp_path / "df_chexpert_plus_240401.csv"
    _write_chexpert(path, rows)
    first, second = read_chexpert_plus(path)
    assert first == ReportRecord(
        study_id="patient42142/study5",
        image_keys=("patient42142/study5/view1_frontal", "patient42142/study5/view2_lateral"),
        report="Clear lungs. 1. No acute findings.",
        findings="Clear lungs.",
        impression="1. No acute findings.",
        split="train",
    )
    assert second.study_id == "patient64541/study1" and second.split == "valid"
    assert second.report == "Portable AP." and second.findings is None
    assert len(index_by_image_key([first, second])) == 3

    rows[1]["section_impression"] = "Something else."
    _write_chexpert(path, rows)
    # The multi-line report cell makes the second record end on a later physical line.
    with pytest.raises(ValueError, match=r"line \d+: study patient42142/study5"):
        read_chexpert_plus(path)


def test_chexpert_plus_minimal_columns(tmp_path: Path) -> None:
    path = tmp_path / "minimal.csv"
    path.write_text("path_to_image,report\ntrain/patient1/study2/view1_frontal.jpg,Normal.\n")
    [record] = read_chexpert_plus(path)
    assert record.report == "Normal." and record.split is None
    (tmp_path / "bad.csv").write_text("image,report\na.jpg,x\n")
    with pytest.raises(ValueError, match="path_to_image"):
        read_chexpert_plus(tmp_path / "bad.csv")


# -- MIMIC-CXR ------------------------------------------------------------------------------

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.  Heart size: normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

MIMIC_LOWERCASE = """Findings: Lungs are clear.
Impression:  No change.
NOTIFICATION:  Discussed with Dr. ___.
"""


def test_mimic_reports(tmp_path: Path) -> None:
    patient = tmp_path / "files" / "p10" / "p10000032"
    patient.mkdir(parents=True)
    (patient / "s50414267.txt").write_text(MIMIC_REPORT)
    (patient / "s53189527.txt").write_text(MIMIC_LOWERCASE)
    (patient / "s56699142.txt").write_text("FINAL REPORT\nWET READ: no findings section.\n")
    images = patient / "s50414267"
    images.mkdir()
    for stem in ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "02aa804e-bde0afdd"):
        (images / f"{stem}.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image")

    first, second, third = read_mimic_reports(tmp_path)
    assert first.study_id == "s50414267"
    assert first.image_keys == ("02aa804e-bde0afdd", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962")
    assert first.findings == (
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular "
        "opacities that most likely represent nipple shadows. Heart size: normal."
    )
    assert first.impression == "No acute cardiopulmonary process."
    assert first.report == f"{first.findings} {first.impression}"
    assert first.split is None

    assert second.image_keys == ()
    assert second.findings == "Lungs are clear." and second.impression == "No change."
    assert third.findings is None and third.impression is None and third.report == ""

    with pytest.raises(FileNotFoundError, match=r"no sXXXXXXXX\.txt"):
        read_mimic_reports(images)
    with pytest.raises(FileNotFoundError, match="absent"):
        read_mimic_reports(tmp_path / "absent")


# -- index_by_image_key ---------------------------------------------------------------------


def test_index_conflicts_raise() -> None:
    a = ReportRecord(
        study_id="s1", image_keys=("img1", "img2"), report="a", findings="a", impression=None
    )
    b = ReportRecord(
        study_id="s2", image_keys=("img3", "img2"), report="b", findings="b", impression=None
    )
    c = ReportRecord(study_id="s1", image_keys=("img1",), report="c", findings="c", impression=None)
    index = index_by_image_key([a, a])  # the same record twice is no conflict
    assert index == {"img1": a, "img2": a}
    with pytest.raises(ValueError, match=r"'img2'.*'s1'.*'s2'"):
        index_by_image_key([a, b])
    with pytest.raises(ValueError, match=r"'img1'.*two different records of study 's1'"):
        index_by_image_key([a, c])
