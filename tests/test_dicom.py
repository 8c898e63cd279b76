"""DICOM loading on real files: pydicom-data's chest PA (RG1), uncompressed and JPEG 2000.

RG1 is a 1955x1841 computed radiograph, 15 bits stored, MONOCHROME1 (dense = dark in the
file), with a window of 15000/30000 and no PatientAge.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pydicom_data = pytest.importorskip("pydicom.data", reason="pydicom-data (test files) missing")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from raydiology.data.dicom import (  # noqa: E402
    METADATA_KEYS,
    LoadedImage,
    is_dicom,
    load_dicom,
    phi_values,
)
from raydiology.data.errors import BadImage  # noqa: E402

PLANTED = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-314159",
    "PatientBirthDate": "19450704",
    "InstitutionName": "St. Planted Hospital",
}


def _testdata(name: str) -> Path:
    path = pydicom_data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in the installed pydicom-data")
    return Path(path)


@pytest.fixture(scope="module")
def rg1_uncr() -> Path:
    return _testdata("RG1_UNCR.dcm")


@pytest.fixture(scope="module")
def rg1_j2kr() -> Path:
    return _testdata("RG1_J2KR.dcm")


@pytest.fixture(scope="module")
def rg1(rg1_uncr: Path) -> LoadedImage:
    return load_dicom(rg1_uncr)


def _edited_copy(source: Path, target: Path, **tags: object) -> Path:
    """Save `source` to `target` with header tags set (None deletes the tag)."""
    ds = pydicom.dcmread(source)
    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(target)
    return target


def _small_dicom(path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2", **tags):
    """A minimal secondary-capture DICOM file; `pixels=None` leaves out the pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, 8 * pixels.dtype.itemsize)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _gradient(height: int = 64, width: int = 48) -> np.ndarray:
    return (np.arange(height * width, dtype=np.uint16) * 7).reshape(height, width)


# ---- pixels -------------------------------------------------------------------------------


def test_uncompressed_and_jpeg2000_give_the_same_pixels(rg1: LoadedImage, rg1_j2kr: Path):
    j2k = load_dicom(rg1_j2kr)
    assert rg1.pixels.dtype == np.uint16 and rg1.pixels.shape == (1955, 1841)
    assert np.array_equal(rg1.pixels, j2k.pixels)  # lossless, so exactly equal
    assert rg1.metadata == j2k.metadata


def test_monochrome1_is_stored_dense_bright(rg1: LoadedImage):
    """The spine/mediastinum strip must be brighter than both lung fields (regions picked
    by looking at the image)."""
    pixels = rg1.pixels.astype(np.float64)
    h, w = pixels.shape

    def mean(y0: float, y1: float, x0: float, x1: float) -> float:
        return float(pixels[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)].mean())

    centre = mean(0.30, 0.70, 0.45, 0.55)
    lung_right = mean(0.25, 0.50, 0.18, 0.32)  # patient's right, image left
    lung_left = mean(0.25, 0.50, 0.68, 0.82)
    assert centre > lung_right + 10000 and centre > lung_left + 10000


def test_monochrome2_is_not_inverted(rg1: LoadedImage, rg1_uncr: Path, tmp_path: Path):
    flipped = _edited_copy(
        rg1_uncr, tmp_path / "mono2.dcm", PhotometricInterpretation="MONOCHROME2"
    )
    negative = load_dicom(flipped).pixels.astype(np.int64)
    assert np.abs(negative - (65535 - rg1.pixels.astype(np.int64))).max() <= 1


def test_window_is_applied(rg1: LoadedImage, rg1_uncr: Path, tmp_path: Path):
    stored = pydicom.dcmread(rg1_uncr).pixel_array.astype(np.float64)
    centre, width = float(np.median(stored)), 2000.0
    windowed = load_dicom(
        _edited_copy(rg1_uncr, tmp_path / "w.dcm", WindowCenter=centre, WindowWidth=width)
    ).pixels
    # DICOM's LINEAR window (PS3.3 C.11.2.1.2.1), then MONOCHROME1 inverted; the window's
    # output range is what the intensity rule maps onto 0..65535.
    expected = np.clip((stored - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    expected = np.round((1.0 - expected) * 65535)
    assert np.abs(windowed.astype(np.float64) - expected).max() <= 1
    saturated = np.mean((windowed == 0) | (windowed == 65535))
    assert saturated > 0.3 > np.mean((rg1.pixels == 0) | (rg1.pixels == 65535))


def test_first_of_several_windows_is_used(rg1_uncr: Path, tmp_path: Path):
    one = load_dicom(
        _edited_copy(rg1_uncr, tmp_path / "1.dcm", WindowCenter=9000, WindowWidth=3000)
    ).pixels
    two = load_dicom(
        _edited_copy(
            rg1_uncr, tmp_path / "2.dcm", WindowCenter=[9000, 20000], WindowWidth=[3000, 500]
        )
    ).pixels
    assert np.array_equal(one, two)


def test_without_window_bits_stored_set_the_range(rg1_uncr: Path, tmp_path: Path):
    """No window: RG1's 15 bits stored (0..32767), not its own min..max, map to 0..65535."""
    plain = load_dicom(
        _edited_copy(rg1_uncr, tmp_path / "nowin.dcm", WindowCenter=None, WindowWidth=None)
    ).pixels
    stored = pydicom.dcmread(rg1_uncr).pixel_array.astype(np.float64)
    expected = np.round((32767 - stored) * 65535 / 32767)  # MONOCHROME1: inverted
    assert np.abs(plain.astype(np.float64) - expected).max() <= 1


def test_unusable_window_falls_back_to_the_full_range(rg1_uncr: Path, tmp_path: Path):
    plain = load_dicom(
        _edited_copy(rg1_uncr, tmp_path / "nowin.dcm", WindowCenter=None, WindowWidth=None)
    ).pixels
    zero_width = load_dicom(
        _edited_copy(rg1_uncr, tmp_path / "zero.dcm", WindowCenter=100, WindowWidth=0)
    ).pixels
    assert np.array_equal(plain, zero_width)


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path):
    """A negative slope flips the ramp: the modality LUT runs before anything else."""
    ramp = _gradient()
    plain = load_dicom(_small_dicom(tmp_path / "a.dcm", ramp)).pixels
    flipped = load_dicom(
        _small_dicom(tmp_path / "b.dcm", ramp, RescaleSlope=-2, RescaleIntercept=100)
    ).pixels
    assert plain[0, 0] == 0 and plain[-1, -1] == ramp[-1, -1]  # 16 bits stored: same scale
    assert np.abs(flipped.astype(np.int64) - (65535 - plain.astype(np.int64))).max() <= 1


# ---- metadata ------------------------------------------------------------------------------


def test_metadata_is_coarse_and_complete(rg1: LoadedImage):
    assert tuple(rg1.metadata) == METADATA_KEYS
    assert rg1.metadata == {
        "view": "PA",
        "anatomy": "chest",
        "sex": "F",
        "age_group": None,  # RG1 has no PatientAge, and none is worked out from dates
        "modality": "CR",
        "manufacturer": "Philips Medical Systems",
    }
    assert rg1.uid and rg1.uid.startswith("1.")


def test_age_is_bucketed_on_a_real_file(rg1_uncr: Path, tmp_path: Path):
    loaded = load_dicom(_edited_copy(rg1_uncr, tmp_path / "age.dcm", PatientAge="045Y"))
    assert loaded.metadata["age_group"] == "40-59"
    assert "45" not in str(loaded.metadata)


@pytest.mark.parametrize(
    ("age", "group"),
    [
        ("000D", "0-17"),
        ("030D", "0-17"),
        ("010W", "0-17"),
        ("006M", "0-17"),
        ("017Y", "0-17"),
        ("018Y", "18-39"),
        ("039Y", "18-39"),
        ("040Y", "40-59"),
        ("072Y", "60-79"),
        ("080Y", "80+"),
        ("999M", "80+"),
        ("104Y", "80+"),
        ("", None),
        ("45", None),
        ("abcY", None),
    ],
)
def test_age_groups(tmp_path: Path, age: str, group: str | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly warns when writing a bad AS
        path = _small_dicom(tmp_path / "x.dcm", _gradient(), PatientAge=age)
    assert load_dicom(path).metadata["age_group"] == group


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # written deliberately
def test_header_values_are_normalised_or_dropped(tmp_path: Path):
    path = _small_dicom(
        tmp_path / "n.dcm",
        _gradient(),
        ViewPosition="lateral",
        BodyPartExamined="Chest",
        PatientSex="X",
        Modality="dx",
        Manufacturer="  Acme   Imaging ",
    )
    assert load_dicom(path).metadata == {
        "view": "LAT",
        "anatomy": "chest",
        "sex": None,
        "age_group": None,
        "modality": "DX",
        "manufacturer": "Acme Imaging",
    }
    bare = _small_dicom(tmp_path / "bare.dcm", _gradient(), Modality="", ViewPosition="")
    assert load_dicom(bare).metadata == dict.fromkeys(METADATA_KEYS)


# ---- PHI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["planted.dcm", "planted_without_extension"])
def test_planted_phi_never_leaves(
    rg1_uncr: Path, tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
):
    path = _edited_copy(rg1_uncr, tmp_path / name, PatientAge="045Y", **PLANTED)
    assert is_dicom(path)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_dicom(path)
    emitted = caplog.text + " ".join(str(w.message) for w in caught)
    visible = repr(loaded.metadata)
    for value in PLANTED.values():
        assert value not in visible and value not in emitted
        assert value.split("^")[0] not in visible
    assert set(PLANTED.values()) <= phi_values(pydicom.dcmread(path))


def test_pydicom_warnings_that_quote_values_are_silenced(
    rg1_uncr: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """pydicom's reading validation quotes the bad value ("Invalid value for VR UI: ...")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = _edited_copy(rg1_uncr, tmp_path / "baduid.dcm", SOPInstanceUID="Doe^Jane")
    caplog.clear()  # writing it was logged too, before the code under test ran
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_dicom(path)
    assert loaded.uid == "Doe^Jane"  # the caller salts and hashes it, never stores it
    assert "Doe^Jane" not in caplog.text
    assert not [w for w in caught if "Doe^Jane" in str(w.message)]


def test_phi_values_reads_nested_and_unlisted_names(tmp_path: Path):
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = ""  # empty values are not returned
    other = Dataset()
    other.PatientID = "ALT-27"
    ds.OtherPatientIDsSequence = [other]
    ds.add_new(0x00081070, "PN", "Roe^Richard")  # OperatorsName, added by tag
    ds.add_new(0x00091010, "PN", "Private^Name")  # a private person-name element
    ds.Manufacturer = "Acme"  # not identifying
    assert phi_values(ds) == {"Doe^Jane", "ALT-27", "Roe^Richard", "Private^Name"}


def test_is_dicom(rg1_uncr: Path, tmp_path: Path):
    assert is_dicom(rg1_uncr)
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    short = tmp_path / "short"
    short.write_bytes(b"DICM")
    assert not is_dicom(png)
    assert not is_dicom(short)
    assert not is_dicom(tmp_path)  # a folder, not a file
    assert not is_dicom(tmp_path / "missing.dcm")


# ---- files that cannot become training images ---------------------------------------------


def _random_bytes(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    path = tmp_path / "random.dcm"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path, "not a DICOM file"


def _magic_then_garbage(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(bytes(128) + b"DICM" + np.random.default_rng(1).bytes(4096))
    return path, "no pixel data|unreadable DICOM header"


def _truncated(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    data = rg1_uncr.read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])  # the header is a few kB; this cuts pixels
    return path, "undecodable pixel data: The number of bytes of pixel data is less than"


def _truncated_jpeg2000(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    data = _testdata("RG1_J2KR.dcm").read_bytes()
    path = tmp_path / "truncated_j2k.dcm"
    path.write_bytes(data[: len(data) * 2 // 3])  # cut inside the encapsulated stream
    return path, "truncated file"


def _no_pixels(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    path = _small_dicom(tmp_path / "nopix.dcm", None, PatientName="Doe^Jane", PatientSex="F")
    return path, "no pixel data"


def _rgb(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    rgb = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return _small_dicom(tmp_path / "rgb.dcm", rgb, "RGB"), (
        "photometric interpretation RGB not supported"
    )


def _multi_frame(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    frames = np.stack([_gradient(), _gradient()[::-1]])
    return _small_dicom(tmp_path / "cine.dcm", frames), "multi-frame DICOM (2 frames)"


def _tiny(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    return _small_dicom(tmp_path / "tiny.dcm", _gradient(16, 20)), "absurd size 16x20"


def _constant(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    flat = np.full((64, 64), 1000, dtype=np.uint16)
    return _small_dicom(tmp_path / "flat.dcm", flat), "zero variance"


def _encapsulated(path: Path, syntax: str) -> Path:
    """A well-formed header whose pixel data claims a syntax we cannot decode."""
    ds = pydicom.dcmread(_small_dicom(path, _gradient()))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8 not really compressed \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_ls(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    # pylibjpeg-libjpeg is a dependency, so a JPEG-LS file gets as far as its decoder.
    return _encapsulated(tmp_path / "jls.dcm", JPEGLSLossless), "undecodable pixel data"


def _mpeg2(tmp_path: Path, rg1_uncr: Path) -> tuple[Path, str]:
    path = _encapsulated(tmp_path / "mpeg.dcm", MPEG2MPML)
    return path, f"transfer syntax {MPEG2MPML} (MPEG2 Main Profile / Main Level) has no"


@pytest.mark.parametrize(
    "make",
    [
        _random_bytes,
        _magic_then_garbage,
        _truncated,
        _truncated_jpeg2000,
        _no_pixels,
        _rgb,
        _multi_frame,
        _tiny,
        _constant,
        _jpeg_ls,
        _mpeg2,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_files_raise_bad_image(make, rg1_uncr: Path, tmp_path: Path):
    path, reason = make(tmp_path, rg1_uncr)
    with pytest.raises(BadImage) as raised:
        load_dicom(path)
    # `reason` lists acceptable substrings, separated by "|"
    assert any(part in str(raised.value) for part in reason.split("|")), str(raised.value)
    assert "Traceback" not in str(raised.value)


def test_truncated_reason_quotes_no_header_value(rg1_uncr: Path, tmp_path: Path):
    source = _edited_copy(rg1_uncr, tmp_path / "planted.dcm", **PLANTED)
    data = source.read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(BadImage) as raised:
        load_dicom(cut)
    for value in PLANTED.values():
        assert value not in str(raised.value)


def test_dicom_without_extension_loads(rg1: LoadedImage, rg1_uncr: Path, tmp_path: Path):
    bare = tmp_path / "IM0001"
    shutil.copyfile(rg1_uncr, bare)
    assert is_dicom(bare) and os.path.splitext(bare)[1] == ""
    assert np.array_equal(load_dicom(bare).pixels, rg1.pixels)


# ---- hospital transfer syntaxes (issue 19) -------------------------------------------------


def test_jpeg_lossless_decodes_to_pydicoms_reference_values():
    """JPEG Lossless SV1 (1.2.840.10008.1.2.4.70), the usual PACS archive syntax, decodes with
    the declared dependencies. Reference values: pydicom's tests/pixels/pixels_reference.py
    (JPGS_16_16_1_1_1F_M2, "JPEG-LL.dcm")."""
    path = _testdata("JPEG-LL.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    pixels = load_dicom(path).pixels.astype(np.int64)
    # 16 bits stored, signed, no rescale or window: the rule's range is -32768..32767, so a
    # stored value v is kept as v + 32768.
    assert tuple(pixels[400, 124:132] - 32768) == (60, 58, 61, 68, 59, 65, 64, 67)
    assert tuple(pixels[600, 124:132] - 32768) == (3, 1, 2, 0, 2, 1, 2, 0)


def test_jpeg_ls_decodes_exactly_like_the_uncompressed_copy():
    """JPEG-LS lossless (1.2.840.10008.1.2.4.80) gives exactly the uncompressed file's image."""
    path = _testdata("MR_small_jpeg_ls_lossless.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    loaded, reference = load_dicom(path), load_dicom(_testdata("MR_small.dcm"))
    assert loaded.pixels.shape == (64, 64)
    assert np.array_equal(loaded.pixels, reference.pixels)


def test_documented_syntaxes_have_installed_decoders():
    """Every syntax the module docstring lists has an installed decoder."""
    promised = [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    ]
    missing = [uid for uid in promised if not pydicom.pixels.get_decoder(uid).is_available]
    assert not missing, f"no installed decoder for {missing}"


# ---- burned-in annotation (issue 19) -------------------------------------------------------


def test_burned_in_annotation_is_refused_by_default(rg1_uncr: Path, tmp_path: Path):
    burned = _edited_copy(rg1_uncr, tmp_path / "burned.dcm", BurnedInAnnotation="YES", **PLANTED)
    with pytest.raises(BadImage, match="burned-in annotation") as raised:
        load_dicom(burned)
    for value in PLANTED.values():
        assert value not in str(raised.value)
    kept = load_dicom(burned, allow_burned_in=True)
    assert kept.pixels.shape == (1955, 1841)
    clean = _edited_copy(rg1_uncr, tmp_path / "clean.dcm", BurnedInAnnotation="NO")
    assert np.array_equal(load_dicom(clean).pixels, kept.pixels)


def test_ingest_quarantines_burned_in_unless_allowed(rg1_uncr: Path, tmp_path: Path):
    from raydiology.data.ingest import ingest_images

    src = tmp_path / "src"
    src.mkdir()
    _edited_copy(rg1_uncr, src / "burned.dcm", BurnedInAnnotation="YES", **PLANTED)
    refused = ingest_images(
        [src], tmp_path / "refused", size=64, salt="s", parallel=False, progress=False
    )
    assert (refused.ingested, refused.quarantined) == (0, 1)
    assert "burned-in annotation" in refused.reasons
    side_files = "".join(p.read_text() for p in (tmp_path / "refused").glob("*.jsonl"))
    for value in PLANTED.values():
        assert value not in side_files
    allowed = ingest_images(
        [src],
        tmp_path / "allowed",
        size=64,
        salt="s",
        allow_burned_in=True,
        parallel=False,
        progress=False,
    )
    assert (allowed.ingested, allowed.quarantined) == (1, 0)


def test_cli_ingest_offers_allow_burned_in():
    from typer.testing import CliRunner

    from raydiology.cli import app

    result = CliRunner().invoke(app, ["ingest", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--allow-burned-in" in result.output
