"""Load DICOM radiographs as presentation-ready 2-D arrays plus a few coarse labels.

A DICOM file carries the patient's identity next to the pixels, so this module is the one
place that reads headers, and it lets out only the pixels, six coarse labels and the
SOPInstanceUID (which the caller turns into a salted id and never stores). Header values
are never logged: pydicom's own value warnings quote them, so they are silenced while a file
is read, and decoder messages are scrubbed before they become a quarantine reason.

The pixel pipeline follows the DICOM grayscale display chain (PS3.4 N.2.1.1): stored values
-> modality LUT (rescale) -> VOI LUT or window -> MONOCHROME1 inverted, so that every stored
image shows dense structures bright, as PNG radiographs do. The result is scaled by the
intensity rule shared with PNGs (`raydiology.data.images`): the range is the display chain's
output for the lowest and highest value BitsStored allows (a window maps onto its full output
range; without one the rescaled stored range counts), never the image's own min..max;
PixelPaddingValue pixels (PS3.3 C.7.5.1.1.2, with PixelPaddingRangeLimit a range, both in
stored values) are excluded from statistics and stored black.

Files whose header says BurnedInAnnotation YES (0028,0301) are refused unless the caller
allows them: text burned into the pixels (names, dates, accession numbers) would otherwise
reach the shards and every picture drawn from them. A file without the element is kept, as
most CR/DX headers leave it out.

Transfer syntaxes that decode with the declared dependencies (pydicom 3 with pylibjpeg,
pylibjpeg-openjpeg and pylibjpeg-libjpeg): Implicit/Explicit VR Little Endian, Explicit VR
Big Endian, Deflated Explicit VR Little Endian, RLE Lossless, JPEG Baseline and Extended
(1.2.840.10008.1.2.4.50/.51), JPEG Lossless (.57 and .70, the usual PACS lossless syntax),
JPEG-LS Lossless and Near-Lossless (.80/.81) and JPEG 2000 (.90/.91, HTJ2K .201-.203). Any other
(MPEG, HEVC, JPIP, ...) is quarantined with a reason naming the syntax.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.valuerep import PersonName

from raydiology.data.errors import BadImage
from raydiology.data.images import to_presentation

METADATA_KEYS = ("view", "anatomy", "sex", "age_group", "modality", "manufacturer")

MIN_SIDE = 32
MAX_SIDE = 16384

# Header fields that identify a patient, a clinician or an institution, after the PS3.15
# Annex E basic application-level confidentiality profile (Table E.1-1), with identifying
# dates/times and the instance UIDs (which embed an organisation's root and link records).
# Nothing reads them for training. `phi_values` collects their values so that tests, and the
# ingest's log scrubber, can prove that none of them reaches a corpus, a log or a quarantine
# file. Keep the list generous: a false entry costs one redundant check, a missing one a leak.
PHI_KEYWORDS: tuple[str, ...] = (
    # the patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientTelecomInformation",
    "CountryOfResidence",
    "RegionOfResidence",
    "EthnicGroup",
    "Occupation",
    "MilitaryRank",
    "BranchOfService",
    "MedicalRecordLocator",
    "PatientReligiousPreference",
    "PatientInsurancePlanCodeSequence",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "PatientComments",
    "AdditionalPatientHistory",
    "AdmissionID",
    "CurrentPatientLocation",
    # the visit: numbers, dates and free text that link back to a record
    "AccessionNumber",
    "StudyID",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "AcquisitionDateTime",
    "InstanceCreationDate",
    "PerformedProcedureStepStartDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "StudyDescription",
    "SeriesDescription",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "ImageComments",
    # clinicians and operators
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "OperatorsName",
    "ScheduledPerformingPhysicianName",
    "VerifyingObserverName",
    "ContentCreatorName",
    "PersonName",
    # the institution and its equipment
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InstitutionCodeSequence",
    "StationName",
    "PerformedStationName",
    "PerformedLocation",
    "DeviceSerialNumber",
    "DeviceUID",
    # instance UIDs: the caller salts and hashes SOPInstanceUID and never stores it
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "InstanceCreatorUID",
)
_PHI_SET = frozenset(PHI_KEYWORDS)

# DICOM's code-string (CS) alphabet; anything else in a CS field is not a code we can trust.
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
_AGE = re.compile(r"(\d{1,3})\s*([DWMY])")
_DAYS_PER_YEAR = 365.25
_AGE_GROUPS = ((18, "0-17"), (40, "18-39"), (60, "40-59"), (80, "60-79"))
_VIEW_SYNONYMS = {"LATERAL": "LAT"}


@dataclass(frozen=True, kw_only=True)
class LoadedImage:
    """One decoded radiograph and all that the corpus may keep from its header.

    `pixels` is presentation-ready (dense = bright) so that DICOM and PNG sources mix in one
    corpus. `uid` exists only so the caller can derive a salted image id; it must not be
    stored or logged.
    """

    pixels: np.ndarray  # (H, W) uint16 0..65535 under the intensity rule (module docstring)
    metadata: dict[str, str | None]  # exactly METADATA_KEYS; None where the header is silent
    uid: str | None  # SOPInstanceUID


def is_dicom(path: str | os.PathLike) -> bool:
    """True when the file has the Part 10 "DICM" magic at byte 128, whatever its name.

    Archives often drop the .dcm extension, so the ingest routes on content; reading 132
    bytes keeps the check cheap on folders of millions. Files without the preamble (raw
    ACR-NEMA streams) are not recognised, matching `load_dicom`, which refuses them too.
    An unreadable path answers False and is left to the other loaders to report.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def load_dicom(
    path: str | os.PathLike,
    *,
    allow_burned_in: bool = False,
    clip_percentile: float | None = None,
) -> LoadedImage:
    """Decode one single-frame grayscale DICOM; raises BadImage with the reason.

    `allow_burned_in` keeps files flagged BurnedInAnnotation YES (refused by default);
    `clip_percentile` is the intensity rule's optional clip (see `images.to_presentation`).

    Multi-frame files are refused rather than cut to frame 0: a projection radiograph is one
    frame, and several frames mean cine, tomosynthesis or a stack that does not belong in a
    radiograph corpus. A window that cannot be applied (zero width, unknown function) falls
    back to the full range, as viewers do, instead of losing every image from that device.
    """
    with _quiet_pydicom() as caught:
        try:
            ds = pydicom.dcmread(path, force=False)
        except InvalidDicomError:
            raise BadImage("not a DICOM file") from None
        except Exception as e:  # pydicom raises many types for broken headers
            # The message can quote header bytes; the type is enough to triage.
            raise BadImage(f"unreadable DICOM header ({type(e).__name__})") from None
        if any("End of file reached" in str(w.message) for w in caught):
            # pydicom drops an element cut short (encapsulated pixel data, say) with only a
            # warning; without this the file would be misreported as having no pixel data.
            raise BadImage("truncated file: it ends inside a data element")
        if not allow_burned_in and _code(ds, "BurnedInAnnotation") == "YES":
            # The reason names the flag only: the annotation itself may be a patient's name.
            raise BadImage(
                "burned-in annotation: the header flags text in the pixels "
                "(--allow-burned-in keeps such files)"
            )
        pixels = _presentation_pixels(ds, clip_percentile)
        metadata = _metadata(ds)
        uid = _text(ds, "SOPInstanceUID")
    return LoadedImage(pixels=pixels, metadata=metadata, uid=uid)


def phi_values(dataset: Dataset) -> set[str]:
    """Non-empty string values of the PHI_KEYWORDS elements, nested sequences included.

    Every person-name (PN) element counts too, whatever its keyword, because a name in an
    unlisted or private field is still a name. Values can be short (a StudyID of "1"), so a
    log scrubber should match them as whole tokens.
    """
    found: set[str] = set()
    with _quiet_pydicom():
        for element in dataset.iterall():
            if element.keyword not in _PHI_SET and element.VR != "PN":
                continue
            value = element.value
            values = value if isinstance(value, MultiValue | list) else [value]
            for item in values:
                if isinstance(item, str | PersonName):
                    text = str(item).strip()
                    if text:
                        found.add(text)
    return found


def _presentation_pixels(ds: Dataset, clip_percentile: float | None) -> np.ndarray:
    """Header checks first (cheap), then decode, display chain, intensity rule."""
    if "PixelData" not in ds:
        raise BadImage("no pixel data")
    _check_transfer_syntax(ds)
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadImage(f"photometric interpretation {photometric or '(missing)'} not supported")
    samples = _int(ds, "SamplesPerPixel", default=1)
    if samples != 1:
        raise BadImage(f"{samples} samples per pixel not supported (grayscale only)")
    frames = _int(ds, "NumberOfFrames", default=1)
    if frames > 1:
        raise BadImage(f"multi-frame DICOM ({frames} frames) is not a projection radiograph")
    _check_size(_int(ds, "Rows", default=0), _int(ds, "Columns", default=0))

    try:
        stored = ds.pixel_array
    except Exception as e:  # decoder plugins raise their own types; all mean the same
        raise BadImage(f"undecodable pixel data: {_scrubbed(str(e), ds)}") from None
    if stored.ndim != 2:
        raise BadImage(f"not a 2-D image (shape {stored.shape})")
    _check_size(*stored.shape)

    values = _display_chain(stored, ds)
    if not np.isfinite(values).all():
        raise BadImage("non-finite values after rescale (bad slope/intercept)")
    # The range is what the chain makes of the stored range's two ends (see module docstring).
    ends = _display_chain(_stored_range(ds, stored.dtype), ds)
    if not np.isfinite(ends).all():
        raise BadImage("non-finite values after rescale (bad slope/intercept)")
    lo, hi = float(ends.min()), float(ends.max())
    if lo == hi:  # a constant modality LUT, or a window whose ends coincide
        lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        raise BadImage("zero variance after rescale and windowing")
    return to_presentation(
        values,
        lo,
        hi,
        invert=photometric == "MONOCHROME1",  # low values are bright in MONOCHROME1
        padding=_padding(ds, stored),
        clip_percentile=clip_percentile,
    )


def _display_chain(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT (rescale) then VOI LUT or the first window, as float64."""
    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError) as e:
        raise BadImage(f"unusable modality LUT or rescale ({type(e).__name__})") from None
    # A malformed window or VOI LUT keeps the full range (see load_dicom).
    with suppress(ValueError, TypeError, IndexError, AttributeError):
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    return values


def _stored_range(ds: Dataset, dtype: np.dtype) -> np.ndarray:
    """The lowest and highest stored value BitsStored and PixelRepresentation allow."""
    bits = min(_int(ds, "BitsStored", default=8 * dtype.itemsize), 8 * dtype.itemsize)
    if bits < 1:
        raise BadImage("BitsStored is not positive")
    if _int(ds, "PixelRepresentation", default=0) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=dtype)
    return np.array([0, 2**bits - 1], dtype=dtype)


def _padding(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Mask of stored values equal to PixelPaddingValue (or within PixelPaddingRangeLimit)."""
    if _text(ds, "PixelPaddingValue") is None:
        return None
    first = _int(ds, "PixelPaddingValue", default=0)
    last = _int(ds, "PixelPaddingRangeLimit", default=first)
    low, high = min(first, last), max(first, last)
    mask = (stored >= low) & (stored <= high)
    return mask if mask.any() else None


def _check_transfer_syntax(ds: Dataset) -> None:
    """Refuse up front what no installed decoder can read, naming the syntax to install for."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        raise BadImage("no transfer syntax in the file meta information")
    described = f"transfer syntax {uid} ({uid.name})"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise BadImage(f"{described} has no pixel data decoder in pydicom") from None
    if not decoder.is_available:
        raise BadImage(f"{described} cannot be decoded with the installed plugins")


def _check_size(height: int, width: int) -> None:
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        raise BadImage(f"absurd size {height}x{width}")


def _metadata(ds: Dataset) -> dict[str, str | None]:
    """The six coarse labels; each is None unless the header states it plainly."""
    view = _code(ds, "ViewPosition")
    anatomy = _code(ds, "BodyPartExamined")
    sex = _code(ds, "PatientSex")
    return {
        "view": _VIEW_SYNONYMS.get(view, view) if view else None,
        "anatomy": anatomy.lower() if anatomy else None,
        "sex": sex if sex in ("M", "F", "O") else None,
        "age_group": _age_group(_text(ds, "PatientAge")),
        "modality": _code(ds, "Modality"),
        "manufacturer": _text(ds, "Manufacturer"),
    }


def _age_group(age: str | None) -> str | None:
    """Bucket an Age String ("045Y", "003M", ...) so the exact age never leaves the file.

    The age is not worked out from birth and study dates: those are identifiers, and a
    missing PatientAge is recorded as missing.
    """
    match = _AGE.fullmatch(age.upper()) if age else None
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2)
    years = {
        "Y": float(number),
        "M": number / 12,
        "W": number * 7 / _DAYS_PER_YEAR,
        "D": number / _DAYS_PER_YEAR,
    }[unit]
    for upper, label in _AGE_GROUPS:
        if years < upper:
            return label
    return "80+"


def _text(ds: Dataset, keyword: str) -> str | None:
    """A header value as stripped text (first value if several); None if absent or empty."""
    try:
        value: Any = ds.get(keyword)
    except (ValueError, TypeError, KeyError, UnicodeError):
        return None  # an undecodable value is as good as absent
    if isinstance(value, MultiValue | list):
        value = value[0] if len(value) else None
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _code(ds: Dataset, keyword: str) -> str | None:
    """A code-string value uppercased; None unless it looks like a DICOM code."""
    text = _text(ds, keyword)
    if text is None:
        return None
    text = text.upper()
    return text if _CODE_STRING.fullmatch(text) else None


def _int(ds: Dataset, keyword: str, *, default: int) -> int:
    text = _text(ds, keyword)
    if text is None:
        return default
    try:
        return int(float(text))
    except ValueError:
        raise BadImage(f"{keyword} is not a number") from None


def _scrubbed(message: str, ds: Dataset) -> str:
    """Drop any identifying header value that a decoder message might quote."""
    for value in sorted(phi_values(ds), key=len, reverse=True):
        message = message.replace(value, "<redacted>")
    return message


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def _quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """Silence pydicom while it touches a header, yielding the warnings it raised.

    Its value-validation warnings and log records quote header values ("Invalid value for
    VR UI: '...'"), which must never reach a log; the caller may still read the recorded
    warnings to classify a failure. The settings are process-wide; loaders run one file at
    a time per worker.
    """
    # pydicom logs through "pydicom" and through module loggers beneath it; a filter on a
    # parent does not see its children's records, so each one gets it.
    names = [n for n in logging.root.manager.loggerDict if n.startswith("pydicom.")]
    loggers = [logging.getLogger(n) for n in ("pydicom", *names)]
    drop = _DropRecords()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with (
            pydicom_config.disable_value_validation(),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            yield caught
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
