"""Labels from the public datasets' own annotation files, matched to the videos of a corpus.

Each `parse_*` function reads one source format (already read into text or rows: no I/O here) into
`Annotations`: the manifest columns it labels (`flows.labels.MANIFEST_COLUMNS`) and, per annotated video,
the names it may have in the corpus — an exact relative `file`, or a file stem found anywhere in the corpus
— best first, each with its labels. `match` resolves those names against the corpus's relative files into
manifest rows, and says which annotated videos the corpus lacks and which corpus videos no annotation names.

Errors in a source are one ValueError line naming the file and the line (text) or key (JSON), and what was
expected.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flows.labels import MANIFEST_COLUMNS

FORMATS = ("folders", "ucf101", "kinetics", "activitynet", "tvsum", "table")
SPLIT_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "validate": "val", "validation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
TABLE_LIST_COLUMNS = ("actions", "highlights", "importance")
_TEXT_COLUMNS = ("category", "sentiment")
_NUMBER_COLUMNS = ("valence", "window_start_s", "window_end_s", "importance_fps")


@dataclass(frozen=True)
class Candidate:
    """One name an annotated video may have in the corpus: a relative file, or a stem (`by_stem`)."""

    key: str
    by_stem: bool
    labels: Mapping[str, Any]


@dataclass(frozen=True)
class Annotation:
    """One annotated video: what the source calls it, and its candidate names in the corpus, best first."""

    source: str
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class Annotations:
    """A parsed source: the manifest columns it labels (`file` aside), its videos, and notes to show."""

    columns: tuple[str, ...]
    videos: tuple[Annotation, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Matched:
    """Manifest rows (sorted by file) and what did not match."""

    rows: list[dict[str, Any]]
    missing: list[str] = field(default_factory=list)  # annotated videos (source names) not in the corpus
    unlabelled: list[str] = field(default_factory=list)  # corpus files no annotation names
    repeated: list[str] = field(default_factory=list)  # corpus files named more than once (first kept)


# --- matching -----------------------------------------------------------------------------------------


def stem(file: str) -> str:
    """A relative file's name without folder and extension."""
    return posixpath.splitext(posixpath.basename(file))[0]


def match(annotations: Annotations, files: Sequence[str]) -> Matched:
    """Manifest rows for the corpus `files` (relative paths) the annotations name. A stem names every
    corpus file that has it; a file named by two annotations keeps the first one's labels."""
    by_stem: dict[str, list[str]] = {}
    for file in files:
        by_stem.setdefault(stem(file), []).append(file)
    known = set(files)
    rows: dict[str, dict[str, Any]] = {}
    missing, repeated = [], []
    for video in annotations.videos:
        found = _resolve(video, known, by_stem)
        if not found:
            missing.append(video.source)
        for file, labels in found:
            if file in rows:
                repeated.append(file)
            else:
                rows[file] = {"file": file, **labels}
    unlabelled = [f for f in files if f not in rows]
    return Matched([rows[f] for f in sorted(rows)], missing, unlabelled, sorted(set(repeated)))


def _resolve(
    video: Annotation, known: set[str], by_stem: Mapping[str, list[str]]
) -> list[tuple[str, Mapping[str, Any]]]:
    """The corpus files the video's first candidate to name any names, each with that candidate's labels."""
    for candidate in video.candidates:
        if candidate.by_stem:
            files = by_stem.get(candidate.key, [])
        else:
            files = [candidate.key] if candidate.key in known else []
        if files:
            return [(f, candidate.labels) for f in files]
    return []


# --- folders ------------------------------------------------------------------------------------------


def parse_folders(files: Iterable[str]) -> Annotations:
    """Category = each video's parent folder; videos at the corpus root have none (left unlabelled)."""
    videos = tuple(
        Annotation(f, (Candidate(f, False, {"category": posixpath.basename(posixpath.dirname(f))}),))
        for f in files
        if "/" in f
    )
    return Annotations(("category",), videos)


# --- UCF101 -------------------------------------------------------------------------------------------


def parse_ucf101(class_index: str, train_list: str, test_list: str, names: Sequence[str]) -> Annotations:
    """UCF101's classInd.txt and one split's trainlist/testlist texts; `names` are their three file names."""
    classes = _ucf_classes(class_index, names[0])
    videos = []
    for text, name, split in ((train_list, names[1], "train"), (test_list, names[2], "test")):
        for n, line in _lines(text):
            path, category = _ucf_entry(
                line, classes, f"ucf101 {name} line {n}", needs_index=split == "train"
            )
            videos.append(Annotation(path, (Candidate(path, False, {"category": category, "split": split}),)))
    return Annotations(("category", "split"), tuple(videos))


def _ucf_classes(text: str, name: str) -> dict[int, str]:
    classes: dict[int, str] = {}
    for n, line in _lines(text):
        index, _, label = line.partition(" ")
        if not index.isdigit() or not label.strip() or " " in label.strip():
            raise ValueError(f'ucf101 {name} line {n}: expected "<class index> <class name>", got {line!r}')
        classes[int(index)] = label.strip()
    if not classes:
        raise ValueError(f"ucf101 {name}: no classes")
    return classes


def _ucf_entry(line: str, classes: Mapping[int, str], where: str, needs_index: bool) -> tuple[str, str]:
    """(path, class) of one list line: "<path> <class index>" (train) or "<path>" (test)."""
    parts = line.split()
    has_index = len(parts) == 2 and parts[1].isdigit()
    if not (has_index or (len(parts) == 1 and not needs_index)):
        expected = '"<path> <class index>"' if needs_index else '"<path>"'
        raise ValueError(f"{where}: expected {expected}, got {line!r}")
    path = _relative(parts[0], where)
    folder_class = posixpath.basename(posixpath.dirname(path))
    if has_index:
        index = int(parts[1])
        if index not in classes:
            raise ValueError(
                f"{where}: class index {index} is not in classInd ({min(classes)}..{max(classes)})"
            )
        # The folder is the class in UCF101's layout: a disagreement means a list from another index.
        if folder_class in classes.values() and folder_class != classes[index]:
            raise ValueError(
                f"{where}: class index {index} is {classes[index]!r} but the folder is {folder_class!r}"
            )
        return path, classes[index]
    if folder_class not in classes.values():
        raise ValueError(f"{where}: expected a path under a class folder of classInd, got {line!r}")
    return path, folder_class


# --- Kinetics -----------------------------------------------------------------------------------------


def parse_kinetics(text: str, name: str) -> Annotations:
    """A Kinetics CSV (label,youtube_id,time_start,time_end[,split][,file])."""
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    if not {"time_start", "time_end"} <= set(fields) or not {"youtube_id", "file"} & set(fields):
        raise ValueError(
            f"kinetics {name} line 1: expected a header with youtube_id (or file), time_start, time_end "
            f"(and label, split), got {','.join(fields)!r}"
        )
    optional = {"label": "category", "split": "split"}
    columns = (*(c for f, c in optional.items() if f in fields), "window_start_s", "window_end_s")
    videos = tuple(_kinetics_row(row, f"kinetics {name} line {reader.line_num}") for row in reader)
    return Annotations(columns, videos)


def _kinetics_row(row: Mapping[str, str | None], where: str) -> Annotation:
    start, end = (
        _number(row.get(k), f"{where}: {k}", "a number of seconds") for k in ("time_start", "time_end")
    )
    if not 0 <= start < end:
        raise ValueError(f"{where}: expected 0 <= time_start < time_end, got {start:g}, {end:g}")
    labels: dict[str, Any] = {}
    if "label" in row:
        labels["category"] = (row["label"] or "").strip() or None  # Kinetics' test lists leave it out
    if "split" in row:
        labels["split"] = _split(row["split"], f"{where}: split")
    # The download tools name a trimmed clip {youtube_id}_{start:06d}_{end:06d}; its window is the whole file.
    suffix = f"_{int(start):06d}_{int(end):06d}"
    trimmed = {**labels, "window_start_s": 0.0, "window_end_s": end - start}
    untrimmed = {**labels, "window_start_s": start, "window_end_s": end}
    if (row.get("file") or "").strip():
        path = _relative(row["file"].strip(), where)
        return Annotation(
            path, (Candidate(path, False, trimmed if stem(path).endswith(suffix) else untrimmed),)
        )
    youtube_id = (row.get("youtube_id") or "").strip()
    if not youtube_id:
        raise ValueError(f"{where}: expected a youtube_id (or a file), got an empty cell")
    candidates = (Candidate(youtube_id + suffix, True, trimmed), Candidate(youtube_id, True, untrimmed))
    return Annotation(youtube_id + suffix, candidates)


# --- ActivityNet --------------------------------------------------------------------------------------


def parse_activitynet(text: str, name: str) -> Annotations:
    """ActivityNet's JSON: {"database": {ID: {"subset", "duration", "annotations": [...]}}}."""
    where = f"activitynet {name}"
    try:
        data = json.loads(text)
    except ValueError as err:
        line = getattr(err, "lineno", "?")
        raise ValueError(
            f"{where} line {line}: expected JSON, got a syntax error ({_first_line(err)})"
        ) from None
    database = data.get("database") if isinstance(data, dict) else None
    if not isinstance(database, dict):
        raise ValueError(f"{where}: database: expected an object of videos by ID, got {_short(database)}")
    videos, dropped = [], 0
    for video_id, entry in database.items():
        labels = _activitynet_video(entry, f"{where}: database.{video_id}")
        dropped += len(entry.get("annotations", [])) - len(labels["actions"] or [])
        # ActivityNet's downloads name the files v_{ID}; others keep the bare ID.
        candidates = (Candidate(video_id, True, labels), Candidate(f"v_{video_id}", True, labels))
        videos.append(Annotation(video_id, candidates))
    notes = (
        [f"{where}: dropped {dropped} segments that start after their video's duration"] if dropped else []
    )
    return Annotations(("actions", "split"), tuple(videos), tuple(notes))


def _activitynet_video(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with subset and annotations, got {_short(entry)}")
    subset = entry.get("subset")
    if subset not in ("training", "validation", "testing"):
        raise ValueError(f"{where}.subset: expected training, validation or testing, got {_short(subset)}")
    duration = entry.get("duration")
    if duration is not None and not (_is_number(duration) and duration >= 0):
        raise ValueError(f"{where}.duration: expected a number of seconds, got {_short(duration)}")
    annotations = entry.get("annotations", [])
    if not isinstance(annotations, list):
        raise ValueError(f"{where}.annotations: expected a list, got {_short(annotations)}")
    segments = [_activitynet_segment(a, f"{where}.annotations[{i}]") for i, a in enumerate(annotations)]
    # A test video without annotations has no ground truth, not "no action".
    no_truth = subset == "testing" and not segments
    return {"actions": None if no_truth else _within(segments, duration), "split": SPLIT_NAMES[subset]}


def _within(segments: list[dict[str, Any]], duration: float | None) -> list[dict[str, Any]]:
    """Segments sorted by start, ends clipped to the duration; one starting after it is dropped (it lies
    in no frame of the video)."""
    if duration is not None:
        segments = [{**s, "end_s": min(s["end_s"], duration)} for s in segments if s["start_s"] <= duration]
    return sorted(segments, key=lambda a: (a["start_s"], a["end_s"], a["label"]))


def _activitynet_segment(item: Any, where: str) -> dict[str, Any]:
    segment = item.get("segment") if isinstance(item, dict) else None
    label = item.get("label") if isinstance(item, dict) else None
    if not (isinstance(segment, list) and len(segment) == 2 and all(_is_number(x) for x in segment)):
        raise ValueError(f"{where}.segment: expected [start, end] numbers, got {_short(segment)}")
    start, end = float(segment[0]), float(segment[1])
    if not 0 <= start <= end:
        raise ValueError(f"{where}.segment: expected 0 <= start <= end, got {_short(segment)}")
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{where}.label: expected a non-empty label, got {_short(label)}")
    return {"label": label.strip(), "start_s": start, "end_s": end}


# --- TVSum --------------------------------------------------------------------------------------------


def parse_tvsum(text: str, name: str) -> Annotations:
    """ydata-tvsum50-anno.tsv: per video, the per-frame mean of its annotators' scores as `importance`.

    `importance_fps` is the video's frame rate, which only its file knows: the caller probes each matched
    video and fills it in.
    """
    scores: dict[str, list[np.ndarray]] = {}
    for n, line in _lines(text):
        where = f"tvsum {name} line {n}"
        parts = line.split("\t")
        if len(parts) != 3 or not parts[0].strip():
            raise ValueError(f'{where}: expected "<video id>\\t<category>\\t<scores>", got {_short(line)}')
        video_id = parts[0].strip()
        values = _scores(parts[2], where)
        earlier = scores.setdefault(video_id, [])
        if earlier and len(values) != len(earlier[0]):
            raise ValueError(
                f"{where}: expected {len(earlier[0])} scores for {video_id}, as its first annotator gave, "
                f"got {len(values)}"
            )
        earlier.append(values)
    videos = tuple(
        Annotation(v, (Candidate(v, True, {"importance": np.mean(s, axis=0).astype(np.float32).tolist()}),))
        for v, s in scores.items()
    )
    return Annotations(("importance", "importance_fps"), videos)


def _scores(text: str, where: str) -> np.ndarray:
    try:
        values = np.array([float(x) for x in text.split(",")], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{where}: expected comma-separated numbers, got {_short(text)}") from None
    if not np.isfinite(values).all():
        raise ValueError(f"{where}: expected finite scores, got {_short(text)}")
    return values


# --- a table of manifest columns ----------------------------------------------------------------------


def parse_table_csv(text: str, name: str) -> Annotations:
    """A CSV with a `file` column and any manifest columns: lists as JSON text, empty cells null."""
    reader = csv.DictReader(io.StringIO(text))
    # The reader's line number, read once the row is: a quoted cell may span lines.
    located = ((row, f"table {name} line {reader.line_num}") for row in reader)
    return _table(reader.fieldnames or [], located, name)


def parse_table_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], name: str) -> Annotations:
    """Rows of a Parquet table (`pyarrow.Table.to_pylist()`) with a `file` column and manifest columns."""
    return _table(columns, ((row, f"table {name} row {i}") for i, row in enumerate(rows)), name)


def _table(columns: Sequence[str], rows: Iterable[tuple[Mapping[str, Any], str]], name: str) -> Annotations:
    """Annotations from (row, where it is in the source) pairs."""
    if "file" not in columns:
        raise ValueError(f"table {name}: expected a file column, got columns {list(columns)}")
    known = [c for c in columns if c in MANIFEST_COLUMNS and c != "file"]
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    notes = (f"table {name}: ignored unknown columns {unknown}",) if unknown else ()
    videos = []
    for row, at in rows:
        path = _relative(_text(row.get("file"), f"{at}: file") or "", f"{at}: file")
        labels = {c: _table_value(c, row.get(c), f"{at}: {c}") for c in known}
        videos.append(Annotation(path, (Candidate(path, False, labels),)))
    return Annotations(tuple(known), tuple(videos), notes)


def _table_value(column: str, raw: Any, where: str) -> Any:
    """One cell as the manifest stores it; CSV cells arrive as text, Parquet cells typed."""
    if raw is None or raw == "":
        return None
    if column in _TEXT_COLUMNS:
        return _text(raw, where)
    if column == "split":
        return _split(raw, where)
    if column in _NUMBER_COLUMNS:
        value = _number(raw, where, "a number")
        if column == "valence" and not -1 <= value <= 1:
            raise ValueError(f"{where}: expected a number in [-1, 1], got {value:g}")
        return value
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ValueError(f"{where}: expected a JSON list, got {_short(raw)}") from None
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list, got {_short(raw)}")
    if column == "importance":
        return [_number(x, where, "a list of numbers") for x in raw]
    return [_segment(s, where, with_label=column == "actions") for s in raw]


def _segment(item: Any, where: str, with_label: bool) -> dict[str, Any]:
    keys = ("label", "start_s", "end_s") if with_label else ("start_s", "end_s")
    expected = f"a list of {{{', '.join(keys)}}} with start_s <= end_s"
    ok = isinstance(item, dict) and all(_is_number(item.get(k)) for k in keys[-2:])
    if not ok or item["start_s"] > item["end_s"] or (with_label and not isinstance(item.get("label"), str)):
        raise ValueError(f"{where}: expected {expected}, got {_short(item)}")
    return {k: item[k] if k == "label" else float(item[k]) for k in keys}


# --- small checks -------------------------------------------------------------------------------------


def _lines(text: str) -> Iterable[tuple[int, str]]:
    """(1-based line number, stripped line) of the non-blank lines (UCF101's lists end lines in CR LF)."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield n, line.strip()


def _relative(path: str, where: str) -> str:
    """A path relative to the corpus, normalised ("./a/b" → "a/b")."""
    norm = posixpath.normpath(path.strip())
    if not path.strip() or norm.startswith("/") or norm == "." or norm.split("/")[0] == "..":
        raise ValueError(f"{where}: expected a path relative to the corpus, got {path!r}")
    return norm


def _split(raw: Any, where: str) -> str | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    split = SPLIT_NAMES.get(str(raw).strip().lower())
    if split is None:
        raise ValueError(f"{where}: expected train, val (validate, validation) or test, got {_short(raw)}")
    return split


def _text(raw: Any, where: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError(f"{where}: expected text, got {_short(raw)}")
    return raw.strip() or None


def _number(raw: Any, where: str, expected: str) -> float:
    try:
        value = float(raw) if isinstance(raw, str) else raw
    except ValueError:
        value = None
    if not _is_number(value):
        raise ValueError(f"{where}: expected {expected}, got {_short(raw)}")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    """A value for an error line: its repr, on one line, at most 80 characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _first_line(err: BaseException) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
