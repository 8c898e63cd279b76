"""A fast rule-based labeler of chest X-ray reports for the 14 CheXpert observations.

Clinical efficacy (CE) scores a generated report by the findings it states, not its words:
both the generated and the reference report are labeled and the labels compared. The
CheXpert labeler does this with a dependency parser (a few reports per second); report
generation papers evaluate thousands of reports per checkpoint, so this labeler does the same
job with regular expressions at thousands of reports per second on one core.

How a report is labeled:
1. Normalise: lower case, "and/or" and "a/b" read as "or", whitespace collapsed; INDICATION /
   HISTORY sections (why the study was done) are dropped, up to the next FINDINGS or
   IMPRESSION header, else to their sentence end.
2. Find mentions (phrase lists in `labeler_phrases`, compiled into one regex; exclusions such
   as "pericardial effusion" are alternatives tried first, so they swallow the text) and cues
   (negation, uncertainty, one more regex). Common misspellings are phrases too ("effusoin",
   "pleural fusion", "pnuemothorax").
3. Cut the text into clauses: a clause ends at a sentence end (. ! ? ; or a blank line) or
   at a contrastive word ("but", "however", "other than"). A cue acts only inside its clause.
4. A cue before a mention ("no", "may represent") acts on mentions within its word window
   after it; the nearest such cue decides. A cue after a mention ("is not seen", "cannot be
   excluded") acts on the nearest mention before it within its window, and on earlier
   mentions joined to that one by a list ("heart size and mediastinal contours are normal").
5. Each mention is uncertain if an outranking uncertainty cue ("cannot exclude", "no new")
   acts on it, else negative if a negation acts (also "has resolved", "no longer seen"), else
   uncertain if an uncertainty cue acts ("may", "possible", "suspicious for", "suggestive of";
   or the phrase is only suggestive, "vascular congestion"), else positive. The reader who
   commits is believed: "likely", "probable", "consistent with", "XXXX representing" leave a
   finding positive, and so do "stable", "unchanged", "no change in" (still there today) and
   a hedge on change or degree ("questionable increased opacity").
   An anatomy mention ("the heart", "cardiac silhouette") is positive only when its clause
   calls it enlarged, uncertain when "borderline" or only "stable", negative when normal or
   at the upper limits of normal, and otherwise not a mention at all.
   Alternatives: a diagnosis offered beside another ("atelectasis versus pneumonia", "edema
   or fibrosis") is uncertain; a descriptive finding so offered ("scarring or atelectasis",
   "effusion versus thickening") stays positive.
6. Per observation: positive if any mention is positive, else uncertain if any is, else
   negative; not mentioned stays None. A finding said to have resolved is negative even when
   another sentence still calls it "resolving". "chf"/"heart failure" stated or suspected adds
   an uncertain cardiomegaly (it is not lung edema). No Finding is positive when nothing but
   support devices is positive or uncertain (other abnormalities such as emphysema count), and
   None otherwise.

The conventions for the eight observations the issue-16 gold scores (what counts as a lesion,
when a hedge makes a finding uncertain) follow `docs/labeler_annotation_guide.md`.

Labels: 1 positive, 0 negative, -1 uncertain, None not mentioned (CheXpert's convention).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import statistics
import time
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from raydiology.evaluation import labeler_phrases as phrases

OBSERVATIONS = phrases.OBSERVATIONS
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
Label = int | None

# Words that may join the items of a list ("heart size, mediastinum and hila").
_GLUE = frozenset({"and", "or", "nor", "the", "xxxx", "&", "also"})


@dataclass(frozen=True)
class Mention:
    start: int
    end: int
    text: str
    observations: tuple[str, ...]
    kind: str  # "finding" | "anatomy" | "hedge"
    label: int
    note: str = ""  # "resolved" (negated as gone) | "resolving" (positive, on its way out)


@dataclass(frozen=True)
class _Cue:
    kind: str  # "neg" | "unc" | "unc_first" | "stable" | "resolved" | "resolving"
    direction: str  # "pre" | "post" | "both"
    window: int | None
    restrict: str | None


def normalize(text: str) -> str:
    """Lower case, paragraph breaks as sentence ends, slashes read as "or", single spaces."""
    text = text.lower()
    if "\n" in text:
        text = _PARAGRAPH.sub(" . ", text)
    if "/" in text:
        text = _W_O.sub("without", text)
        text = _R_O.sub("rule out", text)
        text = text.replace("and/or", "or")
        text = _SLASH.sub(" or ", text)
    return " ".join(text.split())


_PARAGRAPH = re.compile(r"\n[ \t\r]*\n")
_W_O = re.compile(r"\bw/o\b")
_R_O = re.compile(r"\br/o\b")
_SLASH = re.compile(r"(?<=[a-z])/(?=[a-z])")


class ReportLabeler:
    """Compiled phrase and cue regexes; `label(report)` -> {observation: 1/0/-1/None}."""

    name = "raydiology-rules"  # recorded with every set of labels and CE scores

    def __init__(self) -> None:
        mentions = [*phrases.SKIPS, *(fragment for fragment, _, _ in phrases.MENTIONS)]
        self._mention_info: list[tuple[tuple[str, ...], str] | None] = [
            *(None for _ in phrases.SKIPS),
            *((observations, kind) for _, observations, kind in phrases.MENTIONS),
        ]
        self._mention_parts = [re.compile(f) for f in mentions]
        self._mentions = re.compile(r"\b(?:" + _dispatch(mentions) + ")")

        cues = [fragment for fragment, *_ in phrases.CUES]
        self._cue_info: list[_Cue | None] = [
            None if kind == "pseudo" else _Cue(kind, direction, window, restrict)
            for _, kind, direction, window, restrict in phrases.CUES
        ]
        self._cue_parts = [re.compile(f"(?:{f})(?!\\w)") for f in cues]
        words = [f for f in cues if not f.startswith("\\?")]
        marks = [f for f in cues if f.startswith("\\?")]
        self._cues = re.compile(r"\b(?:" + _dispatch(words) + r")(?!\w)|" + "|".join(marks))
        self._which: dict[tuple[int, str], int] = {}  # (regex id, matched text) -> phrase index
        self._bounds = re.compile(
            r"(?P<end>[.!?;]+(?=\s|$|[a-z]))|\b(?:" + _dispatch([phrases.TERMINATORS]) + r")\b"
        )
        self._enlarged = re.compile(r"\b(?:" + phrases.ENLARGED + r")")
        self._borderline = re.compile(r"\b(?:" + phrases.BORDERLINE + r")")
        self._alt_after = re.compile(r" ?,? (?:" + phrases.ALTERNATIVE + r")\b")
        self._context = re.compile(r"\b(?:" + phrases.CONTEXT_SECTIONS + r") ?:")
        self._report_section = re.compile(r"\b(?:" + phrases.REPORT_SECTIONS + r") ?:")
        self._sentence_end = re.compile(r"[.;!?](?: |$)")
        self._state_before = re.compile(r"\b(?:" + phrases.STATES + r") $")
        self._alt_before = re.compile(r"\b(?:" + phrases.ALTERNATIVE + r") (?:[\w-]+ ){0,2}$")

    def _identify(self, which: int, parts: list[re.Pattern[str]], m: re.Match[str]) -> int | None:
        """Index of the first phrase that matches exactly where the combined regex did."""
        key = (which, m.group())
        index = self._which.get(key)
        if index is None:
            text, start, end = m.string, m.start(), m.end()
            index = next(
                (i for i, p in enumerate(parts) if (x := p.match(text, start)) and x.end() == end),
                None,
            )
            if index is None:  # cannot happen while _dispatch is exact; ignore, never crash
                return None
            if len(self._which) < 100_000:
                self._which[key] = index
        return index

    # -- one report ---------------------------------------------------------------------------

    def mentions(self, report: str) -> list[Mention]:
        """Every mention with its own label (before aggregation), in text order."""
        text = normalize(report)
        if ":" in text:
            text = self._drop_context(text)
        bounds = [
            m.end() if m.lastgroup == "end" else m.start() for m in self._bounds.finditer(text)
        ]
        found = []
        for m in self._mentions.finditer(text):
            index = self._identify(0, self._mention_parts, m)
            info = None if index is None else self._mention_info[index]
            if info is not None:
                found.append((m.start(), m.end(), *info))
        if not found:
            return []
        cues = []
        for m in self._cues.finditer(text):
            index = self._identify(1, self._cue_parts, m)
            cue = None if index is None else self._cue_info[index]
            if cue is not None:
                cues.append((m.start(), m.end(), cue))

        starts = [start for start, *_ in found]
        clause = [bisect_right(bounds, start) for start in starts]
        flags: list[set[str]] = [set() for _ in found]  # kinds of cue acting on each mention
        for c_start, _, cue in cues:
            c_clause = bisect_right(bounds, c_start)
            if cue.direction == "pre":
                continue
            # Post cue: the nearest mention before it, then list-joined ones before that.
            j = bisect_right(starts, c_start) - 1
            while j >= 0 and found[j][1] > c_start:  # a mention overlapping the cue
                j -= 1
            if j < 0 or clause[j] != c_clause:
                continue
            if cue.window is not None and _words(text, found[j][1], c_start) > cue.window:
                continue
            while True:
                if cue.restrict is None or found[j][3] == cue.restrict:
                    flags[j].add(cue.kind)
                if j == 0 or clause[j - 1] != c_clause:
                    break
                if not self._listed(text, found, j):
                    break
                j -= 1

        # A mention inside a cue's words ("of normal size and contour") is what it describes.
        for c_start, c_end, cue in cues:
            j = bisect_right(starts, c_end - 1) - 1
            while j >= 0 and found[j][1] > c_start:
                if cue.restrict is None or found[j][3] == cue.restrict:
                    flags[j].add(cue.kind)
                j -= 1

        pre = [(s, e, c) for s, e, c in cues if c.direction != "post"]
        acted_by: list[int | None] = [None] * len(found)  # the pre cue acting on each mention
        for i, (m_start, _, _, kind) in enumerate(found):
            for k in range(len(pre) - 1, -1, -1):
                c_start, c_end, cue = pre[k]
                if c_end > m_start:
                    continue
                if bisect_right(bounds, c_start) != clause[i]:
                    break
                # Out of reach, unless listed after a mention the cue reaches
                # ("normal heart size and mediastinal contours").
                if (
                    cue.window is not None
                    and _words(text, c_end, m_start) > cue.window
                    and not (i and acted_by[i - 1] == k and self._listed(text, found, i))
                ):
                    continue
                if cue.restrict is not None and cue.restrict != kind:
                    continue
                flags[i].add(cue.kind)
                if cue.kind == "resolving":  # a note, not a verdict: look further back
                    continue
                acted_by[i] = k
                break  # the nearest cue before a mention decides

        labels: list[int | None] = []
        for i, ((_, _, _, kind), f) in enumerate(zip(found, flags, strict=True)):
            if "unc_first" in f:
                labels.append(UNCERTAIN)
            elif "neg" in f or "resolved" in f:
                labels.append(NEGATIVE)
            elif "unc" in f or kind == "hedge":
                labels.append(UNCERTAIN)
            elif kind != "anatomy":
                labels.append(POSITIVE)
            else:
                # A structure said to be enlarged is positive, also when stable ("stable
                # enlargement of the heart"), and uncertain when borderline; one only said to
                # be stable is uncertain; one named without a state ("shift of the heart")
                # says nothing.
                lo = bounds[clause[i] - 1] if clause[i] else 0
                hi = bounds[clause[i]] if clause[i] < len(bounds) else len(text)
                if self._borderline.search(text, lo, hi):
                    labels.append(UNCERTAIN)  # "borderline enlarged", "borderline in size"
                elif self._enlarged.search(text, lo, hi):
                    labels.append(POSITIVE)
                else:
                    labels.append(UNCERTAIN if "stable" in f else None)
        self._alternatives(text, found, labels)
        notes = [
            "resolved"
            if "resolved" in f and lab == NEGATIVE
            else "resolving"
            if "resolving" in f
            else ""
            for f, lab in zip(flags, labels, strict=True)
        ]
        return [
            Mention(start=s, end=e, text=text[s:e], observations=o, kind=k, label=lab, note=n)
            for (s, e, o, k), lab, n in zip(found, labels, notes, strict=True)
            if lab is not None
        ]

    def _drop_context(self, text: str) -> str:
        """Text without INDICATION / HISTORY sections (why the study was done, not what it
        shows): each runs to the next FINDINGS / IMPRESSION header, else to its sentence end."""
        while m := self._context.search(text):
            header = self._report_section.search(text, m.end())
            if header is not None:
                end = header.start()
            else:
                stop = self._sentence_end.search(text, m.end())
                end = len(text) if stop is None else stop.end()
            text = f"{text[: m.start()]} . {text[end:]}"
        return text

    def _alternatives(
        self,
        text: str,
        found: list[tuple[int, int, tuple[str, ...], str]],
        labels: list[int | None],
    ) -> None:
        """A diagnosis offered as an alternative ("X versus pneumonia") becomes uncertain,
        unless the alternative names the same observation ("infection or pneumonia")."""
        for i, (start, end, observations, _) in enumerate(found):
            if labels[i] != POSITIVE or not phrases.DIAGNOSES.intersection(observations):
                continue
            after = self._alt_after.match(text, end)
            if after:
                same = i + 1 < len(found) and found[i + 1][2] == observations
                if not (same and found[i + 1][0] - after.end() <= 20):
                    labels[i] = UNCERTAIN
                    continue
            before = self._alt_before.search(text, max(0, start - 40), start)
            if before and not self._state_before.search(
                text, max(0, before.start() - 20), before.start()
            ):
                same = i > 0 and found[i - 1][2] == observations
                if not (same and 0 <= before.start() - found[i - 1][1] <= 3):
                    labels[i] = UNCERTAIN

    @staticmethod
    def _listed(text: str, found: list[tuple[int, int, tuple[str, ...], str]], i: int) -> bool:
        """Whether mention i follows mention i-1 as the next item of a list."""
        between = text[found[i - 1][1] : found[i][0]].replace(",", " ").split()
        return sum(w not in _GLUE for w in between) <= 1

    def label(self, report: str) -> dict[str, Label]:
        """{observation: 1 positive / 0 negative / -1 uncertain / None not mentioned}."""
        seen: dict[str, set[int]] = {}
        resolved: set[str] = set()  # said to have resolved somewhere in the report
        lasting: set[str] = set()  # positive somewhere other than as "resolving"
        for m in self.mentions(report):
            for observation in m.observations:
                seen.setdefault(observation, set()).add(m.label)
                if m.note == "resolved":
                    resolved.add(observation)
                elif m.label == POSITIVE and m.note != "resolving":
                    lasting.add(observation)
            if m.label != NEGATIVE and m.text in (
                "chf",
                "heart failure",
                "congestive heart failure",
            ):
                seen.setdefault("Cardiomegaly", set()).add(UNCERTAIN)
        out: dict[str, Label] = {}
        finding = False
        for observation in (*OBSERVATIONS[1:], phrases.OTHER):
            labels = seen.get(observation)
            if labels is None:
                value: Label = None
            elif POSITIVE in labels and (observation in lasting or observation not in resolved):
                value = POSITIVE
            elif UNCERTAIN in labels:
                value = UNCERTAIN
            else:
                value = NEGATIVE
            if value in (POSITIVE, UNCERTAIN) and observation != "Support Devices":
                finding = True
            if observation != phrases.OTHER:
                out[observation] = value
        return {"No Finding": None if finding else POSITIVE, **out}

    def label_many(self, reports: Iterable[str]) -> list[dict[str, Label]]:
        return [self.label(r) for r in reports]

    def provenance(self) -> dict[str, str]:
        """What made the labels, for the sidecar beside a labels CSV."""
        return {"labeler": self.name}


# -- compiling phrase lists into one fast alternation ------------------------------------------
# Python's regex engine skips an alternative whose first character is a literal that does not
# match without any bookkeeping, but tries every other alternative in full at each position.
# So each phrase is expanded until it starts with a letter ("(?:the )?heart" becomes "the heart"
# and "heart"), and the phrases are grouped by that letter: "a(?:telecta\w*|...)|b(?:...)".
# At a given word only one group gets past its first letter: ~8x faster than a plain "|".join.
# Within a letter the phrases keep their order, so the first listed still wins.


def _split_top(pattern: str) -> list[str]:
    """Split at the '|'s outside any group."""
    parts: list[str] = []
    current: list[str] = []
    depth, i = 0, 0
    while i < len(pattern):
        c = pattern[i]
        step = 2 if c == "\\" else (pattern.index("]", i + 1) + 1 - i if c == "[" else 1)
        token = pattern[i : i + step]
        depth += (c == "(") - (c == ")")
        if c == "|" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(token)
        i += step
    parts.append("".join(current))
    return parts


def _group_end(pattern: str) -> int:
    """Index of the ')' closing the group that opens at index 0."""
    depth, i = 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            i = pattern.index("]", i + 1) + 1
            continue
        depth += (c == "(") - (c == ")")
        if depth == 0:
            return i
        i += 1
    raise ValueError(f"unbalanced group in {pattern!r}")


def _expand(pattern: str) -> list[str]:
    """Equivalent alternatives, in match-preference order, that start outside any group."""
    out = []
    for alt in _split_top(pattern):
        if not alt.startswith("(?:"):
            out.append(alt)
            continue
        end = _group_end(alt)
        inner, rest = alt[3:end], alt[end + 1 :]
        optional = rest.startswith("?") and not rest.startswith("??")
        rest = rest[1:] if optional else rest
        if rest[:1] in ("*", "+", "{", "?"):  # a repeated group: leave it whole
            out.append(alt)
            continue
        for variant in _split_top(inner):
            out += _expand(variant + rest)
        if optional:  # greedy "?": with the group first, then without
            out += _expand(rest)
    return out


def _dispatch(fragments: list[str]) -> str:
    """One alternation of all fragments, factored by first letter where that is literal."""
    groups: dict[str, list[str]] = {}
    rest = []
    for variant in (v for f in fragments for v in _expand(f)):
        if variant[:1].isalpha() and variant[1:2] not in ("?", "*", "+", "{"):
            groups.setdefault(variant[0], []).append(variant[1:])
        else:
            rest.append(f"(?:{variant})")
    # A fragment that cannot start with a letter is tried after the letter groups; no phrase
    # list has both kinds at one position, so the order between them does not matter.
    return "|".join([*(f"{k}(?:{'|'.join(v)})" for k, v in groups.items()), *rest])


def _words(text: str, start: int, end: int) -> int:
    """Words strictly between two character offsets."""
    return len(text[start:end].split())


@functools.cache
def default_labeler() -> ReportLabeler:
    """One compiled labeler per process (compiling the regexes takes a few milliseconds)."""
    return ReportLabeler()


def label_reports(reports: Iterable[str]) -> list[dict[str, Label]]:
    """Label each report: a list of {observation: 1 / 0 / -1 / None} in OBSERVATIONS order."""
    return default_labeler().label_many(reports)


# -- files and benchmark ---------------------------------------------------------------------


def read_reports_file(path: str | os.PathLike) -> tuple[str, list[str], list[str]]:
    """(first output column, ids, report texts) from a CSV or JSONL file of reports.

    JSONL: objects with `report` and optionally `id`. CSV with a header naming a `report`
    column (and optionally `id`), or the CheXpert labeler's input: a headerless CSV whose first
    column is the report. Ids default to the row number; for headerless input the first output
    column is "Reports" holding the text itself, as the CheXpert labeler writes it.
    """
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        ids: list[str] = []
        texts: list[str] = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {number}: invalid JSON: {e.msg}") from e
                if not isinstance(record, dict) or not isinstance(record.get("report"), str):
                    raise ValueError(f"{path}: line {number}: expected an object with 'report'")
                ids.append(str(record.get("id", len(ids))))
                texts.append(record["report"])
        return "id", ids, texts
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "report" in header:
        col, id_col = header.index("report"), header.index("id") if "id" in header else None
        body = rows[1:]
        texts = [row[col] if col < len(row) else "" for row in body]
        ids = [row[id_col] if id_col is not None else str(i) for i, row in enumerate(body)]
        return "id", ids, texts
    texts = [row[0] if row else "" for row in rows]
    return "Reports", texts, texts


def labels_sidecar(path: str | os.PathLike) -> Path:
    """`labels.csv` -> `labels.labeler.json`: which labeler wrote the CSV."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".csv") + ".labeler.json")


def write_labels_csv(
    path: str | os.PathLike,
    first_column: str,
    ids: list[str],
    labels: list[dict[str, Label]],
    *,
    labeler: dict[str, str] | None = None,
) -> Path:
    """CheXpert labeler layout: id (or report text) then the 14 observations as 1/0/-1/blank.

    The CSV stays exactly the CheXpert layout; which labeler made it (`labeler`, default the
    built-in rules) goes to a JSON sidecar, `labels_sidecar(path)`, whose path is returned.
    """
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([first_column, *OBSERVATIONS])
        for key, row in zip(ids, labels, strict=True):
            writer.writerow([key, *("" if row[o] is None else str(row[o]) for o in OBSERVATIONS)])
    sidecar = labels_sidecar(path)
    record = {**(labeler or {"labeler": ReportLabeler.name}), "reports": len(ids)}
    sidecar.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return sidecar


_LABEL_VALUES: dict[str, Label] = {"": None, "1": 1, "0": 0, "-1": -1, "1.0": 1, "0.0": 0,
                                   "-1.0": -1}  # fmt: skip


@dataclass(frozen=True)
class LabelsFile:
    """A labels CSV in the CheXpert labeler's layout, as `read_labels_csv` found it."""

    keys: list[str]  # the first column: ids, or the report text (the labeler's "Reports")
    labels: list[dict[str, Label]]
    labeler: str  # from the sidecar `raydiology label` writes; else the CheXpert labeler


def read_labels_csv(path: str | os.PathLike) -> LabelsFile:
    """Labels from a CSV in the CheXpert labeler's layout (its own output, CheXbert's, or
    `raydiology label --out`): a first column, then the 14 observations by name, values
    1 / 0 / -1 / blank (1.0 / 0.0 / -1.0 too, as the CheXpert labeler writes them). Errors
    name the file, line and column."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise ValueError(f"{path}: empty labels file")
    header = [c.strip() for c in rows[0]]
    missing = [o for o in OBSERVATIONS if o not in header]
    if missing:
        raise ValueError(f"{path}: header lacks the CheXpert columns {missing}")
    where = {o: header.index(o) for o in OBSERVATIONS}
    keys, labels = [], []
    for number, row in enumerate(rows[1:], start=2):
        row = row + [""] * (len(header) - len(row))
        parsed: dict[str, Label] = {}
        for name, col in where.items():
            value = row[col].strip()
            if value not in _LABEL_VALUES:
                raise ValueError(f"{path}: line {number}: {name} = {value!r}, not 1/0/-1/blank")
            parsed[name] = _LABEL_VALUES[value]
        keys.append(row[0])
        labels.append(parsed)
    sidecar = labels_sidecar(path)
    labeler = "chexpert-labeler"  # a CSV without our sidecar: the CheXpert labeler's own layout
    if sidecar.is_file():
        labeler = str(json.loads(sidecar.read_text(encoding="utf-8")).get("labeler", labeler))
    return LabelsFile(keys=keys, labels=labels, labeler=labeler)


def benchmark(reports: list[str], *, repeats: int = 5) -> dict[str, float | int]:
    """Reports/s of one labeler on one core: median over `repeats` passes over `reports`.

    Rates use the process's CPU time (one thread, so one core), which a busy machine distorts
    far less than wall time; wall-time rates are given too.
    """
    if not reports:
        raise ValueError("no reports to benchmark")
    labeler = ReportLabeler()
    labeler.label_many(reports[: min(len(reports), 200)])  # warm the phrase cache
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        labeler.label_many(reports)
        cpu.append(len(reports) / max(time.process_time() - c0, 1e-9))
        wall.append(len(reports) / max(time.perf_counter() - w0, 1e-9))
    return {
        "reports": len(reports),
        "repeats": repeats,
        "mean_chars": round(sum(map(len, reports)) / len(reports), 1),
        "reports_per_s": round(statistics.median(cpu), 1),
        "reports_per_s_wall": round(statistics.median(wall), 1),
        "reports_per_s_min": round(min(cpu), 1),
        "reports_per_s_max": round(max(cpu), 1),
    }
