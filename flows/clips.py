"""The clip dataflow: a Ray Dataset of video rows (`flows.video_rows`) → a Ray Dataset of decoded clip rows.

Each video is spooled to a local file (decord must never open bytes in memory), probed, planned and
decoded in one sorted pass inside an isolated child process, so a decoder segfault or hang costs one
error row, not the job. Clip rows stream out as they are assembled; a video that fails becomes a row
in the errors side output, and one that gave clips from only part of itself a row in the partial one
(`flows.side_outputs`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from flows import decode, pyav_decoder, sampling, storage, subtitles
from flows.isolation import shared_runner
from flows.media import VideoError, VideoInfo
from flows.probe import probe
from flows.progress import report
from flows.pyav_decoder import read_audio
from flows.side_outputs import ErrorSink
from flows.timeline import Timeline
from flows.video_rows import VideoRow, list_video_rows, video_dataset

log = logging.getLogger(__name__)

SAMPLINGS = ("uniform", "sliding", "random")
DECODERS = ("auto", "decord", "pyav")
# Clip-row column → (VideoInfo field, Arrow type), carried when ClipConfig.video_info is set.
VIDEO_INFO_COLUMNS = {
    "duration_s": ("duration_s", pa.float64()),
    "fps": ("fps", pa.float64()),
    "n_frames": ("n_frames", pa.int64()),
    "width": ("width", pa.int32()),
    "height": ("height", pa.int32()),
    "rotation": ("rotation", pa.int32()),
    "codec": ("video_codec", pa.string()),
    "has_audio": ("has_audio", pa.bool_()),
}


@dataclass(frozen=True)
class ClipConfig:
    """What clips to cut from each video and how to decode them.

    `size` is the (height, width) of the decoded frames, resized inside the decoder. `sampling` picks
    the planner: `uniform` (`clips_per_video` evenly spaced), `sliding` (windows every `stride` output
    frames covering the whole video, for tagging) or `random` (`clips_per_video` seeded clips, for
    training). `window_s` plans clips only from the frames inside (start, end) seconds: a video row's
    labelled window sets it per video. `target_fps` resamples every video to the model's frame rate.
    `video_info` adds the video's probe facts (VIDEO_INFO_COLUMNS) to every clip row, for the videos table.
    `decoder_threads` is each decoder's thread count: one, because the dataflow already decodes one
    video per core, and frame threads on small frames cost more CPU than they save (0: one per core).
    """

    clip_len: int = 16
    size: tuple[int, int] = (112, 112)
    sampling: str = "uniform"
    clips_per_video: int = 4
    stride: int | None = None
    target_fps: float | None = None
    seed: int = 0
    decoder: str = "auto"
    decoder_threads: int = 1
    audio: bool = False
    audio_rate: int = 16_000
    subtitles: bool = False
    video_info: bool = False
    window_s: tuple[float, float] | None = None
    timeout_s: float = 600.0
    idle_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.size, int):
            object.__setattr__(self, "size", (self.size, self.size))
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        checks = [
            ("clip_len", self.clip_len >= 1, "must be >= 1"),
            ("size", len(self.size) == 2 and min(self.size) >= 8, "must be (height, width), each >= 8"),
            ("sampling", self.sampling in SAMPLINGS, f"must be one of {', '.join(SAMPLINGS)}"),
            ("clips_per_video", self.clips_per_video >= 1, "must be >= 1"),
            ("stride", self.stride is None or 1 <= self.stride <= self.clip_len, "must be in 1..clip_len"),
            ("target_fps", self.target_fps is None or self.target_fps > 0, "must be > 0"),
            ("decoder", self.decoder in DECODERS, f"must be one of {', '.join(DECODERS)}"),
            ("decoder_threads", self.decoder_threads >= 0, "must be >= 0 (0: one per core)"),
            ("audio_rate", self.audio_rate >= 1000, "must be >= 1000 Hz"),
            (
                "window_s",
                self.window_s is None or 0 <= self.window_s[0] < self.window_s[1],
                "must be 0 <= start < end",
            ),
            ("timeout_s", self.timeout_s > 0, "must be > 0"),
            ("idle_timeout_s", self.idle_timeout_s > 0, "must be > 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"clip config: {name}={getattr(self, name)!r} {why}")

    def plan(
        self, n_frames: int, fps: float, video_key: str, times: np.ndarray | None = None
    ) -> list[sampling.ClipPlan]:
        """The clip plans for one video (pure: the same inputs give the same plans); over `times`, the
        frames' presentation times, when the video is planned over its real timeline."""
        common = {
            "n_frames": n_frames, "fps": fps, "clip_len": self.clip_len, "target_fps": self.target_fps,
            "times": times,
        }  # fmt: skip
        if self.sampling == "sliding":
            return sampling.sliding_windows(**common, stride=self.stride or self.clip_len)
        if self.sampling == "random":
            seed = sampling.video_seed(self.seed, video_key)
            return sampling.random_clips(**common, num_clips=self.clips_per_video, seed=seed)
        return sampling.uniform_clips(**common, num_clips=self.clips_per_video)

    def audio_samples(self, fps: float) -> int:
        """Samples of audio carried by every clip: the clip's duration at the output frame rate."""
        return round(self.audio_rate * self.clip_len / (self.target_fps or fps))


# --- per-video work -------------------------------------------------------------------------------


@dataclass
class _Clip:
    clip_index: int
    start_s: float
    end_s: float
    frames: np.ndarray
    audio: np.ndarray | None = None
    text: str | None = None


@dataclass
class _VideoDone:
    info: VideoInfo
    planned_frames: int
    decoded_frames: int
    clips: int
    losses: list[str]  # why only part of the video gave clips


def decode_video(path: str, video_key: str, config: ClipConfig, sidecar_cues: list | None = None) -> Iterator:
    """Probe, plan and decode one local video file; yields its VideoInfo (again, corrected, when it is
    planned over its real timeline), then `_Clip`s, then `_VideoDone`.

    Runs inside the isolated decoder process.
    """
    info = probe(path)
    yield info
    # The scan is what the decoders index frames by; it also shows whether the header told the truth.
    table = pyav_decoder.scan(path, info)
    timeline = Timeline.of(table, info)
    times, first, losses = None, 0, []
    if timeline is not None:
        losses = timeline.losses(info)
        doubts = [d for d in (info.header_doubt, *timeline.disagreements(info), *losses) if d]
        if doubts:
            info = timeline.corrected(info, doubts)
            times, first = timeline.planned_times, timeline.first
            log.debug("%s: planned over the stream's timeline: %s", path, info.header_doubt)
            yield info
    if info.n_frames < 1 or info.fps <= 0:
        raise VideoError("probe", "NoFrames", f"{path}: no video frames (n_frames={info.n_frames})")
    n_frames = info.n_frames
    if config.window_s is not None:
        times = times if times is not None else np.arange(n_frames) / info.fps
        span = sampling.window_frames(times, config.window_s)
        if span is None:
            start, end = config.window_s
            losses.append(
                f"the labelled window {start:g}-{end:g} s holds no frame; clips from the whole video"
            )
        else:
            times, first = times[span[0] : span[1]], first + span[0]
        n_frames = len(times)
    plans = sampling.shifted(config.plan(n_frames, info.fps, video_key, times), first)
    out_frames = sampling.grid_frames(n_frames, info.fps, config.target_fps, times=times)
    if out_frames < config.clip_len:
        losses.append(f"shorter than a clip: {out_frames} of {config.clip_len} frames, the last one repeated")
    cues = sidecar_cues
    if config.subtitles and cues is None:
        cues = subtitles.read_embedded_subtitles(path)
    track = None
    if config.audio and info.has_audio:
        # One read for the whole span the clips need: audio is small next to frames.
        last_s = max(p.end_s for p in plans) + config.clip_len / (config.target_fps or info.fps)
        track = read_audio(path, 0.0, last_s, config.audio_rate, info=info)

    frames = decode.iter_frames(
        path, info, sampling.needed_frames(plans), config.size, config.decoder, config.decoder_threads,
        table=table,
    )  # fmt: skip
    assembly = sampling.assemble_clips(plans, frames)
    n_clips = 0
    for clip in assembly:
        start_s, end_s = float(clip.times_s[0]), float(clip.times_s[-1])
        out = _Clip(clip.plan.clip_index, start_s, end_s, clip.frames)
        if config.audio:
            out.audio = _audio_span(track, start_s, config.audio_samples(info.fps), config.audio_rate)
        if config.subtitles:
            out.text = subtitles.text_for_span(cues or [], start_s, end_s)
        n_clips += 1
        yield out
    missing = assembly.planned_frames - assembly.decoded_frames
    if missing:
        losses.append(f"{missing} of {assembly.planned_frames} planned frames did not decode")
    yield _VideoDone(info, assembly.planned_frames, assembly.decoded_frames, n_clips, losses)


def _audio_span(track: np.ndarray | None, start_s: float, n_samples: int, rate: int) -> np.ndarray:
    """A fixed-length mono slice of the track (which starts at the first frame); silence past its end."""
    out = np.zeros(n_samples, dtype=np.float32)
    if track is None:
        return out
    first = max(0, round(start_s * rate))
    piece = track[first : first + n_samples]
    out[: len(piece)] = piece
    return out


# A generator run in the isolated process: (local path, video key, config, sidecar cues) → VideoInfo,
# clips, then a _VideoDone. Replaceable, e.g. to wrap the decoder or to inject faults in tests.
DecodeFn = Callable[[str, str, ClipConfig, "list | None"], Iterator[Any]]


@dataclass
class VideoResult:
    """What happened to one video: its probe (when it got that far) and the error, if any."""

    row: VideoRow
    info: VideoInfo | None = None
    clips: int = 0
    status_reason: str | None = None  # why the video gave clips from only part of itself


def iter_video_clips(
    row: VideoRow,
    config: ClipConfig,
    result: VideoResult | None = None,
    decode_fn: DecodeFn = decode_video,
) -> Iterator[dict[str, Any]]:
    """Clip rows of one video, decoded by `decode_fn` in the shared isolated decoder process.

    Raises VideoError when the video cannot be read; clips yielded before the failure stand.
    `result`, when given, is filled with the probe, the clip count and why the video is partial.
    """
    result = result or VideoResult(row)
    path = None
    try:
        sidecar = _sidecar_cues(row.uri) if config.subtitles else None
        if row.window_s is not None:
            config = replace(config, window_s=row.window_s)
        with storage.local_copy(row.uri) as path:
            items = shared_runner().iter(
                decode_fn,
                path,
                row.video_id,
                config,
                sidecar,
                timeout_s=config.timeout_s,
                idle_timeout_s=config.idle_timeout_s,
            )
            for item in items:
                if isinstance(item, VideoInfo):
                    result.info = item
                elif isinstance(item, _VideoDone):
                    result.status_reason = _status_reason(row, item)
                else:
                    result.clips += 1
                    yield _clip_row(row, item, config, result.info)
    except VideoError as err:
        message = err.message
        if path is not None and storage.is_s3(row.uri):  # name the object, not its temp copy
            message = message.replace(f"{path}: ", "").replace(path, row.uri)
        if not message.startswith(row.uri):
            message = f"{row.uri}: {message}"
        raise VideoError(err.stage, err.error_type, message) from None
    except (OSError, PermissionError) as err:
        message = str(err) if str(err).startswith(row.uri) else f"{row.uri}: {err}"
        raise VideoError("read", type(err).__name__, message) from None


def _status_reason(row: VideoRow, done: _VideoDone) -> str | None:
    """Why a video gave clips from only part of itself (None: from all of it); an error when it gave none."""
    if done.clips == 0:
        raise VideoError(
            "decode",
            "NoFrames",
            f"{row.uri}: none of the {done.planned_frames} planned frames decoded "
            f"(the stream holds {done.info.n_frames} frames: undecodable)",
        )
    return "; ".join(done.losses) or None


def _sidecar_cues(video_uri: str) -> list | None:
    """Cues of a sidecar .srt/.vtt beside the video, or None when there is none."""
    return subtitles.load_sidecar(video_uri, _read_if_exists)


def _read_if_exists(uri: str) -> bytes | None:
    return storage.read_bytes(uri) if storage.exists(uri) else None


def _clip_row(row: VideoRow, clip: _Clip, config: ClipConfig, info: VideoInfo | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "video_id": row.video_id,
        "uri": row.uri,
        "clip_index": clip.clip_index,
        "start_s": clip.start_s,
        "end_s": clip.end_s,
        "frames": clip.frames,
    }
    if config.audio:
        out["audio"] = clip.audio
    if config.subtitles:
        out["text"] = clip.text or ""
    if config.video_info and info is not None:
        out.update({column: getattr(info, field) for column, (field, _) in VIDEO_INFO_COLUMNS.items()})
    return out


# --- the Ray Data stage -----------------------------------------------------------------------------


ClipStreamFn = Callable[[Iterator[pa.Table]], Iterator[Any]]


def _clips_udf(
    batch: dict[str, np.ndarray],
    config: ClipConfig,
    errors_uri: str,
    decode_fn: DecodeFn,
    partial_uri: str | None,
    then: ClipStreamFn | None = None,
    progress: Any | None = None,
) -> Iterator[Any]:
    """map_batches UDF: one video row in, its clips out a few at a time (bounded memory), or what `then`
    makes of them."""
    tables = _clip_tables(batch, config, errors_uri, decode_fn, partial_uri, progress)
    yield from then(tables) if then is not None else tables


def _clip_tables(
    batch: dict[str, np.ndarray],
    config: ClipConfig,
    errors_uri: str,
    decode_fn: DecodeFn,
    partial_uri: str | None,
    progress: Any | None = None,
) -> Iterator[pa.Table]:
    sink = ErrorSink(errors_uri)
    partial_sink = ErrorSink(partial_uri) if partial_uri else None
    for i in range(len(batch["uri"])):
        row = VideoRow(**{k: _scalar(batch[k][i]) for k in ("video_id", "uri", "size_bytes", "etag")})
        if "window_start_s" in batch and math.isfinite(batch["window_start_s"][i]):
            row = replace(row, window_s=(float(batch["window_start_s"][i]), float(batch["window_end_s"][i])))
        pending: list[dict[str, Any]] = []
        result = VideoResult(row)
        failed = 0
        try:
            for clip in iter_video_clips(row, config, result, decode_fn=decode_fn):
                pending.append(clip)
                if len(pending) >= CLIPS_PER_OUTPUT_BATCH:
                    yield _clip_table(pending)
                    pending = []
        except VideoError as err:
            log.warning("%s: %s", err.error_type, err.message)
            sink.write(row, err, result.clips)
            failed = 1
        else:
            if result.status_reason:
                log.info("%s: partial: %s", row.uri, result.status_reason)
                if partial_sink is not None:
                    partial_sink.partial(row, result.status_reason, result.clips)
        if pending:
            yield _clip_table(pending)
        report(progress, videos=1, clips=result.clips, failed=failed)


CLIPS_PER_OUTPUT_BATCH = 8


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _clip_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Clip rows as an Arrow table with a fixed schema: frames a tensor column, audio a float list.

    Audio is a list column because its length follows each video's frame rate (unless the config
    resamples), and Parquet files of one output must share a schema to be read back together.
    """
    from ray.data.extensions import ArrowTensorArray

    columns: dict[str, Any] = {
        "video_id": pa.array([r["video_id"] for r in rows], pa.string()),
        "uri": pa.array([r["uri"] for r in rows], pa.string()),
        "clip_index": pa.array([r["clip_index"] for r in rows], pa.int32()),
        "start_s": pa.array([r["start_s"] for r in rows], pa.float64()),
        "end_s": pa.array([r["end_s"] for r in rows], pa.float64()),
        "frames": ArrowTensorArray.from_numpy(np.stack([r["frames"] for r in rows])),
    }
    if "audio" in rows[0]:
        columns["audio"] = pa.array([r["audio"] for r in rows], pa.list_(pa.float32()))
    if "text" in rows[0]:
        columns["text"] = pa.array([r["text"] for r in rows], pa.string())
    for column, (_, dtype) in VIDEO_INFO_COLUMNS.items():
        if column in rows[0]:
            columns[column] = pa.array([r[column] for r in rows], dtype)
    return pa.table(columns)


# A decode task reserves 0.9 of a CPU and a CPU inference actor 0.1 (flows.predict): a node with C CPUs
# runs C decode tasks next to up to C actors, and neither ever lands on a head node that declares 0 CPUs.
DECODE_TASK_CPUS = 0.9


def clip_dataset(
    videos: Any,
    config: ClipConfig,
    errors_uri: str,
    num_cpus: float = DECODE_TASK_CPUS,
    decode_fn: DecodeFn = decode_video,
    partial_uri: str | None = None,
    then: ClipStreamFn | None = None,
    progress: Any | None = None,
) -> Any:
    """Ray Dataset of video rows → lazy Ray Dataset of clip rows; failures go to `errors_uri`, and the
    reasons of videos that gave clips from only part of themselves to `partial_uri` (`flows.side_outputs`).

    Clip rows: {video_id, uri, clip_index, start_s, end_s, frames uint8[T,H,W,3]} plus `audio`
    float32[S] when `config.audio` and `text` when `config.subtitles`. `start_s`/`end_s` are the
    decoded times of the clip's first and last frame, in seconds from the video's first frame.

    `then` (picklable) runs inside each decode task on its stream of clip tables, and what it yields are the
    stage's rows instead: work fused into decoding, so that the clips never leave the process that decoded
    them (CPU inference, `flows.inference`). Each decode task adds the videos, clips and failed videos it
    has done to `progress` (a `flows.progress` counter), when given.
    """
    return videos.map_batches(
        _clips_udf,
        batch_size=1,
        fn_kwargs={
            "config": config,
            "errors_uri": errors_uri,
            "decode_fn": decode_fn,
            "partial_uri": partial_uri,
            "then": then,
            "progress": progress,
        },
        num_cpus=num_cpus,
    )


def corpus_clips(
    corpus_uri: str, config: ClipConfig, errors_uri: str, partial_uri: str | None = None
) -> tuple[Any, list[VideoRow]]:
    """List a corpus and return (lazy clip dataset, the listed videos)."""
    videos = list_corpus(corpus_uri)
    return clip_dataset(video_dataset(videos), config, errors_uri, partial_uri=partial_uri), videos


def list_corpus(corpus_uri: str) -> list[VideoRow]:
    """The corpus's videos; an error naming the corpus when it has none."""
    videos = list_video_rows(corpus_uri)
    if not videos:
        raise FileNotFoundError(f"{corpus_uri}: no video files found")
    return videos
