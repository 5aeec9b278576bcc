"""`reelflow import-labels`: a public dataset's annotation files → the corpus's `labels.parquet`.

Parsing and matching are `flows.annotations`'; this job reads the source, lists the corpus, probes the frame
rate of TVSum's videos (its scores are per decoded frame), writes the manifest with the columns the source
labels, and says in one line each what did not match.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flows import annotations as fa
from flows import storage
from flows.labels import LABEL_COLUMNS, LABELS_FILE, SPLITS, read_parquet, relative_file, write_manifest
from jobs.runtime import console

EXAMPLES = 3  # names shown in a summary line
# A matched TVSum video whose frame count is this far from its score count is likely another video.
FRAME_COUNT_SLACK = 0.02


@dataclass(frozen=True)
class ImportLabelsConfig:
    """Which annotations to read (`format` of `flows.annotations.FORMATS`, at `src`) for which corpus."""

    format: str
    src: str  # a file, UCF101's folder of lists, or (folders) the corpus itself or "-"
    corpus: str
    split: int | None = None  # UCF101's split, 1 to 3 (default 1)


@dataclass(frozen=True)
class ImportLabelsResult:
    """The manifest written, and the lines that told the user what did not match."""

    uri: str
    videos: int
    columns: tuple[str, ...]  # besides `file`
    splits: dict[str, int]
    missing: tuple[str, ...]  # annotated videos not in the corpus
    unlabelled: tuple[str, ...]  # corpus videos no annotation names
    lines: tuple[str, ...]


def main(config: ImportLabelsConfig) -> ImportLabelsResult:
    """Write CORPUS/labels.parquet from the annotations (overwriting it) and report what did not match."""
    if config.format not in fa.FORMATS:
        raise ValueError(f"import-labels: format {config.format!r} is not one of {', '.join(fa.FORMATS)}")
    if config.split is not None and config.format != "ucf101":
        raise ValueError(f"import-labels: --split is UCF101's, not {config.format}'s")
    files = [relative_file(obj.uri, config.corpus) for obj in storage.list_videos(config.corpus)]
    annotations = _read_source(config, files)
    matched = fa.match(annotations, files)
    rows, lines = matched.rows, [*annotations.notes, *_summary(matched)]
    if config.format == "tvsum":
        rows, probe_lines = _with_frame_rates(rows, config.corpus)
        lines += probe_lines
    if not rows:
        raise ValueError(
            f"import-labels: none of the {len(annotations.videos)} videos {config.format} {config.src} "
            f"annotates is in the corpus {config.corpus} ({len(files)} videos)"
        )
    uri = storage.join_uri(config.corpus, LABELS_FILE)
    write_manifest(uri, rows, annotations.columns)
    splits = dict(Counter(row["split"] or "none" for row in rows)) if "split" in annotations.columns else {}
    lines.append(_done_line(uri, len(rows), annotations.columns, splits))
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)  # file names may hold [brackets]
    missing, unlabelled = tuple(matched.missing), tuple(matched.unlabelled)
    return ImportLabelsResult(uri, len(rows), annotations.columns, splits, missing, unlabelled, tuple(lines))


# --- reading the source -------------------------------------------------------------------------------


def _read_source(config: ImportLabelsConfig, files: Sequence[str]) -> fa.Annotations:
    """The source's annotations, read through `flows.storage` (local or s3://)."""
    src, name = config.src, posixpath.basename(config.src.rstrip("/"))
    if config.format == "folders":
        if src != "-" and storage.canonical_uri(src) != storage.canonical_uri(config.corpus):
            raise ValueError(f"folders: SRC must be the corpus itself or -, got {src}")
        return fa.parse_folders(files)
    if config.format == "ucf101":
        return _read_ucf101(src, config.split or 1)
    if config.format == "table" and src.lower().endswith((".parquet", ".pq")):
        table = read_parquet(src, "table")
        return fa.parse_table_rows(table.to_pylist(), table.column_names, name)
    if config.format == "table" and not src.lower().endswith(".csv"):
        raise ValueError(f"table {src}: expected a .csv or .parquet file")
    parse = {
        "kinetics": fa.parse_kinetics,
        "activitynet": fa.parse_activitynet,
        "tvsum": fa.parse_tvsum,
        "table": fa.parse_table_csv,
    }[config.format]
    return parse(_read_text(src, config.format), name)


def _read_ucf101(folder: str, split: int) -> fa.Annotations:
    names = ("classInd.txt", f"trainlist{split:02d}.txt", f"testlist{split:02d}.txt")
    texts = [_read_text(storage.join_uri(folder, name), "ucf101") for name in names]
    return fa.parse_ucf101(*texts, names=names)


def _read_text(uri: str, format: str) -> str:
    if not storage.exists(uri):
        raise FileNotFoundError(f"{format} {uri}: not found")
    try:
        return storage.read_bytes(uri).decode("utf-8-sig")  # -sig: spreadsheets save CSV with a BOM
    except UnicodeDecodeError as err:
        raise ValueError(f"{format} {uri}: expected UTF-8 text ({err.reason} at byte {err.start})") from None


# --- TVSum's frame rates ------------------------------------------------------------------------------


def _with_frame_rates(
    rows: Sequence[Mapping[str, Any]], corpus: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows with `importance_fps` probed from each video; a video the probe cannot read is left out."""
    from flows.media import VideoError
    from flows.probe import probe

    out, unreadable, miscounted = [], [], []
    for row in rows:
        try:
            with storage.local_copy(storage.join_uri(corpus, row["file"])) as path:
                info = probe(path)
        except VideoError as err:
            unreadable.append(f"{row['file']} ({err.error_type})")
            continue
        n_scores = len(row["importance"])
        if abs(info.n_frames - n_scores) > max(1, FRAME_COUNT_SLACK * n_scores):
            miscounted.append(f"{row['file']} ({info.n_frames} frames, {n_scores} scores)")
        out.append({**row, "importance_fps": info.fps})
    kinds = (
        (unreadable, "matched videos the probe cannot read (left out)"),
        (miscounted, "videos whose frame count is not their number of scores"),
    )
    return out, [_examples(items, what) for items, what in kinds if items]


# --- what the user reads ------------------------------------------------------------------------------


def _summary(matched: fa.Matched) -> list[str]:
    """One line per kind of mismatch, with a count and the first examples."""
    kinds = (
        (matched.missing, "annotated videos not in the corpus"),
        (matched.unlabelled, "corpus videos without annotations"),
        (matched.repeated, "corpus videos annotated more than once (the first annotation kept)"),
    )
    return [_examples(items, what) for items, what in kinds if items]


def _examples(items: Sequence[str], what: str) -> str:
    more = ", ..." if len(items) > EXAMPLES else ""
    return f"{len(items)} {what}, e.g. {', '.join(items[:EXAMPLES])}{more}"


def _done_line(uri: str, n: int, columns: Sequence[str], splits: Mapping[str, int]) -> str:
    heads = ", ".join(c for c in columns if c in LABEL_COLUMNS) or "none"
    order = [*SPLITS, "none"]
    split = " / ".join(f"{s} {splits[s]}" for s in order if s in splits)
    return f"import-labels: wrote {n} videos (heads {heads}{'; split ' + split if split else ''}) to {uri}"
