"""Training targets from a corpus's labels manifest (`labels.parquet`, as `reelflow make-corpus` writes it).

The manifest has one row per video: `file` (relative to the corpus), `category`, `sentiment`, `valence`,
`actions` (list of {label, start_s, end_s}) and `highlights` (list of {start_s, end_s}). From it:

- `read_manifest` → a `Manifest`: the rows by file and the `LabelSet` (sorted class names per head; actions
  get the background label `"none"` for time no segment covers);
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
REQUIRED_COLUMNS = ("file", "category", "sentiment", "valence", "actions", "highlights")
# A frame lies in a segment when its time is within the segment's ends, up to rounding of stored times.
_EDGE_S = 1e-6


@dataclass(frozen=True)
class VideoLabels:
    """The labels of one video."""

    file: str
    category: str
    sentiment: str
    valence: float
    actions: tuple[tuple[str, float, float], ...]  # (label, start_s, end_s)
    highlights: tuple[tuple[float, float], ...]  # (start_s, end_s)


@dataclass(frozen=True)
class LabelSet:
    """Class names per head, sorted; `actions` ends with the background label."""

    categories: tuple[str, ...]
    actions: tuple[str, ...]
    sentiments: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("categories", "actions", "sentiments"):
            values = getattr(self, name)
            if len(values) < 2 or len(set(values)) != len(values):
                raise ValueError(f"label set: {name} {list(values)} must hold >= 2 distinct names")

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


@dataclass(frozen=True)
class Manifest:
    """A labels manifest: its URI, every video's labels by relative file name, and the label set."""

    uri: str
    videos: dict[str, VideoLabels]
    labels: LabelSet


def read_manifest(uri: str) -> Manifest:
    """Read and check a labels manifest; errors are one line naming the file and the column or row."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"labels {uri}: not found")
    # Through pyarrow's filesystem: reading a Python file object here leaves a pyarrow I/O thread that
    # aborts the interpreter at exit once torch is loaded.
    fs, path = storage.arrow_filesystem(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"labels {uri}: not a Parquet file ({' '.join(str(err).split())[:200]})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"labels {uri}: missing columns {missing} (has {table.column_names})")
    videos: dict[str, VideoLabels] = {}
    for i, row in enumerate(table.select(list(REQUIRED_COLUMNS)).to_pylist()):
        video = _video_labels(uri, i, row)
        if video.file in videos:
            raise ValueError(f"labels {uri}: file {video.file!r} appears twice")
        videos[video.file] = video
    if not videos:
        raise ValueError(f"labels {uri}: no rows")
    return Manifest(storage.canonical_uri(uri), videos, label_set(videos.values(), _declared(table)))


def _video_labels(uri: str, i: int, row: dict[str, Any]) -> VideoLabels:
    where = f"labels {uri}: row {i}"
    file = row["file"]
    if not isinstance(file, str) or not file.strip() or file.startswith("/") or ".." in file.split("/"):
        raise ValueError(f"{where}: file {file!r} must be a path relative to the corpus")
    for column in ("category", "sentiment"):
        if not isinstance(row[column], str) or not row[column] or row[column] == BACKGROUND:
            raise ValueError(f"{where} ({file}): {column} {row[column]!r} must be a non-empty label name")
    valence = row["valence"]
    if not isinstance(valence, (int, float)) or not -1.0 <= valence <= 1.0:
        raise ValueError(f"{where} ({file}): valence {valence!r} must be a number in [-1, 1]")
    actions = []
    for seg in row["actions"] or []:
        label, start, end = seg.get("label"), seg.get("start_s"), seg.get("end_s")
        if not label or label == BACKGROUND or start is None or end is None or end < start:
            raise ValueError(f"{where} ({file}): bad action segment {seg!r}")
        actions.append((str(label), float(start), float(end)))
    highlights = []
    for seg in row["highlights"] or []:
        start, end = seg.get("start_s"), seg.get("end_s")
        if start is None or end is None or end < start:
            raise ValueError(f"{where} ({file}): bad highlight segment {seg!r}")
        highlights.append((float(start), float(end)))
    return VideoLabels(
        file, row["category"], row["sentiment"], float(valence), tuple(actions), tuple(highlights)
    )


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
    videos: Sequence[VideoLabels] | Any, declared: Mapping[str, Sequence[str]] | None = None
) -> LabelSet:
    """Sorted class names seen in `videos` plus any `declared` ones; the background action goes last."""
    videos = list(videos)
    declared = declared or {}
    categories = {v.category for v in videos} | set(declared.get("categories", ()))
    sentiments = {v.sentiment for v in videos} | set(declared.get("sentiments", ()))
    actions = {a[0] for v in videos for a in v.actions} | set(declared.get("actions", ()))
    return LabelSet(tuple(sorted(categories)), (*sorted(actions), BACKGROUND), tuple(sorted(sentiments)))


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
    """(action index per frame int64 [T], 1.0 where a highlight covers the frame float32 [T])."""
    action_index = labels.index()["action"]
    actions = np.full(len(times), labels.background, dtype=np.int64)
    for label, start, end in video.actions:
        actions[(times >= start - _EDGE_S) & (times <= end + _EDGE_S)] = action_index[label]
    importance = np.zeros(len(times), dtype=np.float32)
    for start, end in video.highlights:
        importance[(times >= start - _EDGE_S) & (times <= end + _EDGE_S)] = 1.0
    return actions, importance


def clip_action(steps: np.ndarray | Any, background: int) -> Any:
    """The clip's action: the label covering more than half of its frames, else `background`.

    Works on one clip ([T] → scalar) or a batch ([B, T] → [B]), numpy or torch.
    """
    import torch

    steps_t = torch.as_tensor(steps)
    squeeze = steps_t.dim() == 1
    steps_t = steps_t.reshape(-1, steps_t.shape[-1]).long()
    n_classes = int(max(int(steps_t.max()), background)) + 1
    counts = torch.zeros(steps_t.shape[0], n_classes, dtype=torch.long).scatter_add_(
        1, steps_t, torch.ones_like(steps_t)
    )
    counts[:, background] = 0
    best_count, best = counts.max(dim=1)
    out = torch.where(2 * best_count > steps_t.shape[1], best, torch.full_like(best, background))
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
    in training keeps exactly the targets of the frames it keeps.
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
        out["category"].append(index["category"][video.category])
        out["sentiment"].append(index["sentiment"][video.sentiment])
        out["valence"].append(video.valence)
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
