"""Training targets from a corpus's labels manifest (`labels.parquet`, as `reelflow make-corpus` and
`reelflow import-labels` write it).

The manifest has one row per video: `file` (relative to the corpus) and any of the label columns
(`MANIFEST_COLUMNS`: `category`, `sentiment`, `valence`, `actions` as a list of {label, start_s, end_s},
`highlights` as a list of {start_s, end_s}, per-frame `importance`), plus an optional `split` and labelled
window. A manifest has the heads its source labels, and a null cell is a video without that label. From it:

- `read_manifest` → a `Manifest`: the rows by file, the label columns and the `LabelSet` (sorted class
  names per head; actions get the background label `"none"` for time no segment covers);
- `split_videos` → a deterministic train / validation split BY VIDEO, stratified by category;
- `step_targets` → per-frame targets of one clip (the action covering each frame's time, whether a
  highlight covers it), from which `clip_action` / `clip_importance` derive the clip's label after any
  temporal crop;
- `attach_targets` → the Ray Data UDF that adds those target columns to clip rows.

Everything here is pure (no Ray import at module level), so it runs the same in tasks and in tests.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows import storage

BACKGROUND = "none"
LABELS_FILE = "labels.parquet"  # a corpus's manifest, at its root
SPLITS = ("train", "val", "test")
ACTION_TYPE = pa.list_(
    pa.struct([("label", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64())])
)
HIGHLIGHT_TYPE = pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64())]))
# Every column but `file` is optional: a manifest has the heads its source labels. A null cell is a video
# without that label (a semi-labelled corpus); an empty `actions` list is a video labelled as action-free.
MANIFEST_COLUMNS: dict[str, pa.DataType] = {
    "file": pa.string(),  # relative to the corpus
    "category": pa.string(),
    "sentiment": pa.string(),
    "valence": pa.float64(),  # [-1, 1]
    "actions": ACTION_TYPE,
    "highlights": HIGHLIGHT_TYPE,
    "split": pa.string(),  # one of SPLITS
    "window_start_s": pa.float64(),  # the labelled window (Kinetics), clips are drawn inside it
    "window_end_s": pa.float64(),
    "importance": pa.list_(pa.float32()),  # per-frame importance (TVSum), at importance_fps
    "importance_fps": pa.float64(),
}
LABEL_COLUMNS = ("category", "sentiment", "valence", "actions", "highlights", "importance")


def manifest_schema(columns: Sequence[str]) -> pa.Schema:
    """The manifest's schema with `file` and the given columns, in MANIFEST_COLUMNS' order."""
    unknown = sorted(set(columns) - set(MANIFEST_COLUMNS))
    if unknown:
        raise ValueError(f"labels: unknown columns {unknown} (known: {list(MANIFEST_COLUMNS)})")
    return pa.schema([(c, t) for c, t in MANIFEST_COLUMNS.items() if c == "file" or c in columns])


def write_manifest(uri: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write `rows` (dicts keyed by column) as the manifest at `uri`, with exactly `file` + `columns`."""
    table = pa.Table.from_pylist(list(rows), schema=manifest_schema(columns))
    fs, path = storage.arrow_filesystem(uri)
    pq.write_table(table, path, filesystem=fs)


IGNORE = -100  # the class target of a video without that label (cross-entropy's ignore_index)
# A frame lies in a segment when its time is within the segment's ends, up to rounding of stored times.
_EDGE_S = 1e-6


@dataclass(frozen=True)
class VideoLabels:
    """The labels of one video; None where the manifest gives the video no such label."""

    file: str
    category: str | None = None
    sentiment: str | None = None
    valence: float | None = None
    actions: tuple[tuple[str, float, float], ...] | None = None  # (label, start_s, end_s)
    highlights: tuple[tuple[float, float], ...] | None = None  # (start_s, end_s)
    split: str | None = None
    window: tuple[float, float] | None = None  # (start_s, end_s): where the label holds
    importance: tuple[float, ...] | None = None  # per frame, at importance_fps
    importance_fps: float | None = None

    def has(self, head: str) -> bool:
        """Whether the video has ground truth for a head (`importance`: highlights or importance scores)."""
        if head == "importance":
            return self.highlights is not None or self.importance is not None
        return getattr(self, "actions" if head == "action" else head) is not None


@dataclass(frozen=True)
class LabelSet:
    """Class names per head, sorted; `actions` ends with the background label. A head the manifest does
    not label has no names."""

    categories: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    sentiments: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("categories", "actions", "sentiments"):
            values = getattr(self, name)
            if values and (len(values) < 2 or len(set(values)) != len(values)):
                raise ValueError(f"label set: {name} {list(values)} must hold >= 2 distinct names")
        if self.actions and self.actions[-1] != BACKGROUND:
            raise ValueError(f"label set: actions {list(self.actions)} must end with {BACKGROUND!r}")

    @property
    def background(self) -> int:
        """Index of the background action label."""
        return self.actions.index(BACKGROUND)

    def index(self) -> dict[str, dict[str, int]]:
        """{head: {label: class index}} for the three classification heads."""
        return {
            "category": {v: i for i, v in enumerate(self.categories)},
            "action": {v: i for i, v in enumerate(self.actions)},
            "sentiment": {v: i for i, v in enumerate(self.sentiments)},
        }

    def swap_permutation(self, pairs: Mapping[str, str]) -> list[int]:
        """Action index → its index after a horizontal flip: labels naming a direction swap per `pairs`."""
        perm = list(range(len(self.actions)))
        for a, b in pairs.items():
            for name in (a, b):
                if name not in self.actions:
                    raise ValueError(
                        f"flip pair {a!r} ↔ {b!r}: no action label {name!r} in {list(self.actions)}"
                    )
            perm[self.actions.index(a)] = self.actions.index(b)
            perm[self.actions.index(b)] = self.actions.index(a)
        return perm


# The head each label column trains (the importance head learns from highlights or importance scores).
COLUMN_HEADS = {
    "category": "category",
    "sentiment": "sentiment",
    "valence": "valence",
    "actions": "action",
    "highlights": "importance",
    "importance": "importance",
}


@dataclass(frozen=True)
class Manifest:
    """A labels manifest: its URI, every video's labels by relative file name, the label set and the
    label columns it has."""

    uri: str
    videos: dict[str, VideoLabels]
    labels: LabelSet
    columns: tuple[str, ...] = ("category", "sentiment", "valence", "actions", "highlights")

    @property
    def heads(self) -> tuple[str, ...]:
        """The heads some video has ground truth for."""
        return tuple(dict.fromkeys(COLUMN_HEADS[c] for c in self.columns if c in COLUMN_HEADS))

    @property
    def has_split(self) -> bool:
        return "split" in self.columns


def read_manifest(uri: str) -> Manifest:
    """Read and check a labels manifest; errors are one line naming the file and the column or row."""
    table = read_parquet(uri, "labels")
    if "file" not in table.column_names:
        raise ValueError(f"labels {uri}: missing column 'file' (has {table.column_names})")
    columns = tuple(c for c in MANIFEST_COLUMNS if c in table.column_names and c != "file")
    if not any(c in LABEL_COLUMNS for c in columns):
        raise ValueError(
            f"labels {uri}: no label column (has {table.column_names}; any of {list(LABEL_COLUMNS)})"
        )
    videos: dict[str, VideoLabels] = {}
    for i, row in enumerate(table.select(["file", *columns]).to_pylist()):
        video = _video_labels(uri, i, row)
        if video.file in videos:
            raise ValueError(f"labels {uri}: file {video.file!r} appears twice")
        videos[video.file] = video
    if not videos:
        raise ValueError(f"labels {uri}: no rows")
    return Manifest(
        storage.canonical_uri(uri), videos, label_set(videos.values(), _declared(table), columns), columns
    )


def read_parquet(uri: str, what: str) -> pa.Table:
    """A whole Parquet file (local or s3://); a missing or unreadable one is a one-line error naming
    `what` it is and its URI."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"{what} {uri}: not found")
    # Through pyarrow's filesystem: reading a Python file object here leaves a pyarrow I/O thread that
    # aborts the interpreter at exit once torch is loaded.
    fs, path = storage.arrow_filesystem(uri)
    try:
        return pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{what} {uri}: not a Parquet file ({' '.join(str(err).split())[:200]})") from None


def _video_labels(uri: str, i: int, row: dict[str, Any]) -> VideoLabels:
    where = f"labels {uri}: row {i}"
    file = row["file"]
    if not isinstance(file, str) or not file.strip() or file.startswith("/") or ".." in file.split("/"):
        raise ValueError(f"{where}: file {file!r} must be a path relative to the corpus")
    where = f"{where} ({file})"
    for column in ("category", "sentiment"):
        value = row.get(column)
        if value is not None and (not isinstance(value, str) or not value or value == BACKGROUND):
            raise ValueError(f"{where}: {column} {value!r} must be a non-empty label name")
    valence = row.get("valence")
    if valence is not None and (not isinstance(valence, (int, float)) or not -1.0 <= valence <= 1.0):
        raise ValueError(f"{where}: valence {valence!r} must be a number in [-1, 1]")
    split = row.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: split {split!r} must be one of {', '.join(SPLITS)}")
    return VideoLabels(
        file,
        category=row.get("category"),
        sentiment=row.get("sentiment"),
        valence=None if valence is None else float(valence),
        actions=_actions(where, row.get("actions")),
        highlights=_highlights(where, row.get("highlights")),
        split=split,
        window=_window(where, row.get("window_start_s"), row.get("window_end_s")),
        importance=_importance(where, row.get("importance"), row.get("importance_fps")),
        importance_fps=row.get("importance_fps"),
    )


def _actions(where: str, segments: list | None) -> tuple[tuple[str, float, float], ...] | None:
    if segments is None:
        return None
    actions = []
    for seg in segments:
        label, start, end = seg.get("label"), seg.get("start_s"), seg.get("end_s")
        if not label or label == BACKGROUND or start is None or end is None or end < start:
            raise ValueError(f"{where}: bad action segment {seg!r}")
        actions.append((str(label), float(start), float(end)))
    return tuple(actions)


def _highlights(where: str, segments: list | None) -> tuple[tuple[float, float], ...] | None:
    if segments is None:
        return None
    highlights = []
    for seg in segments:
        start, end = seg.get("start_s"), seg.get("end_s")
        if start is None or end is None or end < start:
            raise ValueError(f"{where}: bad highlight segment {seg!r}")
        highlights.append((float(start), float(end)))
    return tuple(highlights)


def _window(where: str, start: float | None, end: float | None) -> tuple[float, float] | None:
    if start is None and end is None:
        return None
    if start is None or end is None or start < 0 or end <= start:
        raise ValueError(f"{where}: window_start_s {start!r} / window_end_s {end!r} must be 0 <= start < end")
    return float(start), float(end)


def _importance(where: str, scores: list | None, fps: float | None) -> tuple[float, ...] | None:
    if scores is None:
        return None
    if not scores or fps is None or not fps > 0:
        raise ValueError(f"{where}: importance needs scores and an importance_fps > 0 (got {fps!r})")
    values = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{where}: importance holds a missing or non-finite score")
    return tuple(float(v) for v in values)


def _declared(table: pa.Table) -> dict[str, list[str]]:
    """Class lists the corpus generator stored in the schema metadata (all classes, even absent ones)."""
    raw = (table.schema.metadata or {}).get(b"reelflow.corpus")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return {
        k: list(meta[k]) for k in ("categories", "sentiments", "actions") if isinstance(meta.get(k), list)
    }


def label_set(
    videos: Sequence[VideoLabels] | Any,
    declared: Mapping[str, Sequence[str]] | None = None,
    columns: Sequence[str] = ("category", "sentiment", "actions"),
) -> LabelSet:
    """Sorted class names seen in `videos` plus any `declared` ones, for the label `columns` the manifest
    has; the background action goes last."""
    videos = list(videos)
    declared = declared or {}
    names = {}
    for column, key, values in (
        ("category", "categories", [v.category for v in videos]),
        ("sentiment", "sentiments", [v.sentiment for v in videos]),
        ("actions", "actions", [a[0] for v in videos for a in v.actions or ()]),
    ):
        names[key] = (
            tuple(sorted({x for x in values if x is not None} | set(declared.get(key, ()))))
            if column in columns
            else ()
        )
    actions = (*names["actions"], BACKGROUND) if "actions" in columns else ()
    return LabelSet(names["categories"], actions, names["sentiments"])


# --- the split ----------------------------------------------------------------------------------------


def split_videos(
    files: Sequence[str], strata: Sequence[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, validation) file lists: within each stratum (e.g. category), `fraction` of the videos,
    chosen by a permutation seeded from (seed, stratum), go to validation. Deterministic; disjoint."""
    if len(files) != len(strata):
        raise ValueError(f"split: {len(files)} files but {len(strata)} strata")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split: validation fraction {fraction} must be in [0, 1)")
    groups: dict[str, list[str]] = {}
    for file, stratum in zip(files, strata, strict=True):
        groups.setdefault(stratum, []).append(file)
    validation: set[str] = set()
    for stratum, members in groups.items():
        members = sorted(members)
        n_val = round(fraction * len(members))
        if fraction > 0 and n_val == 0 and len(members) >= 2:
            n_val = 1  # every stratum is represented in validation when it can spare a video
        rng = np.random.default_rng([seed, zlib.crc32(stratum.encode())])
        validation.update(members[i] for i in rng.permutation(len(members))[:n_val])
    train = sorted(f for f in files if f not in validation)
    return train, sorted(validation)


# --- per-clip targets ---------------------------------------------------------------------------------


def frame_times(start_s: float, end_s: float, n_frames: int) -> np.ndarray:
    """Times of a clip's frames, evenly spaced from its first to its last decoded frame."""
    return np.linspace(start_s, end_s, n_frames) if n_frames > 1 else np.array([start_s], dtype=np.float64)


def step_targets(video: VideoLabels, times: np.ndarray, labels: LabelSet) -> tuple[np.ndarray, np.ndarray]:
    """(action index per frame int64 [T], importance per frame float32 [T]): 1.0 where a highlight covers
    the frame, or the video's importance score scaled to [0, 1]. Frames without ground truth get
    IGNORE (actions) and NaN (importance), which the losses and metrics leave out."""
    actions = np.full(len(times), IGNORE, dtype=np.int64)
    if video.actions is not None and labels.actions:
        action_index = labels.index()["action"]
        actions[:] = labels.background
        for label, start, end in video.actions:
            actions[(times >= start - _EDGE_S) & (times <= end + _EDGE_S)] = action_index[label]
    importance = np.full(len(times), np.nan, dtype=np.float32)
    if video.highlights is not None:
        importance[:] = 0.0
        for start, end in video.highlights:
            importance[(times >= start - _EDGE_S) & (times <= end + _EDGE_S)] = 1.0
    elif video.importance is not None:
        scores = scaled_importance(video.importance)
        index = np.clip(np.round(times * float(video.importance_fps)).astype(np.int64), 0, len(scores) - 1)
        importance[:] = scores[index]
    return actions, importance


def scaled_importance(scores: Sequence[float]) -> np.ndarray:
    """Importance scores scaled to [0, 1] per video (TVSum's 1-5 means; constant scores give 0)."""
    values = np.asarray(scores, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def clip_action(steps: np.ndarray | Any, background: int) -> Any:
    """The clip's action: the label covering more than half of its frames, else `background`; IGNORE
    for a clip without action ground truth.

    Works on one clip ([T] → scalar) or a batch ([B, T] → [B]), numpy or torch.
    """
    import torch

    steps_t = torch.as_tensor(steps)
    squeeze = steps_t.dim() == 1
    steps_t = steps_t.reshape(-1, steps_t.shape[-1]).long()
    unlabelled = (steps_t < 0).all(dim=1)
    steps_t = steps_t.clamp(min=0)
    n_classes = int(max(int(steps_t.max()), background)) + 1
    counts = torch.zeros(steps_t.shape[0], n_classes, dtype=torch.long).scatter_add_(
        1, steps_t, torch.ones_like(steps_t)
    )
    counts[:, background] = 0
    best_count, best = counts.max(dim=1)
    out = torch.where(2 * best_count > steps_t.shape[1], best, torch.full_like(best, background))
    out = torch.where(unlabelled, torch.full_like(out, IGNORE), out)
    if isinstance(steps, np.ndarray):
        return out[0].item() if squeeze else out.numpy()
    return out[0] if squeeze else out


def clip_importance(steps: np.ndarray | Any) -> Any:
    """The clip's importance target: the fraction of its frames inside a highlight ([T] or [B, T])."""
    return steps.mean(axis=-1) if isinstance(steps, np.ndarray) else steps.float().mean(dim=-1)


def relative_file(uri: str, corpus_uri: str) -> str:
    """A video's path relative to the corpus root (the manifest's `file`)."""
    root = storage.canonical_uri(corpus_uri).rstrip("/") + "/"
    canonical = storage.canonical_uri(uri)
    if not canonical.startswith(root):
        raise ValueError(f"{uri}: not under the corpus {corpus_uri}")
    return canonical[len(root) :]


TARGET_COLUMNS = ("file", "category", "sentiment", "valence", "action_steps", "importance_steps")


def attach_targets(
    batch: dict[str, np.ndarray], videos: Mapping[str, VideoLabels], labels: LabelSet, corpus_uri: str
) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` UDF (numpy format): clip rows + `TARGET_COLUMNS`.

    Per-frame targets (`action_steps`, `importance_steps`) cover every decoded frame, so a temporal crop
    in training keeps exactly the targets of the frames it keeps. A label the video lacks is IGNORE
    (classes) or NaN (valence, importance).
    """
    index = labels.index()
    n = len(batch["uri"])
    n_frames = batch["frames"].shape[1] if n else 0
    out = {name: [] for name in TARGET_COLUMNS}
    for i in range(n):
        file = relative_file(str(batch["uri"][i]), corpus_uri)
        video = videos[file]
        times = frame_times(float(batch["start_s"][i]), float(batch["end_s"][i]), n_frames)
        actions, importance = step_targets(video, times, labels)
        out["file"].append(file)
        out["category"].append(index["category"].get(video.category, IGNORE))
        out["sentiment"].append(index["sentiment"].get(video.sentiment, IGNORE))
        out["valence"].append(np.nan if video.valence is None else video.valence)
        out["action_steps"].append(actions)
        out["importance_steps"].append(importance)
    result = dict(batch)
    result["file"] = np.array(out["file"], dtype=object)
    result["category"] = np.array(out["category"], dtype=np.int64)
    result["sentiment"] = np.array(out["sentiment"], dtype=np.int64)
    result["valence"] = np.array(out["valence"], dtype=np.float32)
    result["action_steps"] = np.stack(out["action_steps"]) if n else np.zeros((0, 0), np.int64)
    result["importance_steps"] = np.stack(out["importance_steps"]) if n else np.zeros((0, 0), np.float32)
    return result
