"""`reelflow bench decode`: the `reelflow clips` command against the machine's decode limit, per resolution.

For each resolution, one run measures over the same frames:
- command: `reelflow clips` end to end (`jobs.clips.main`: listing, PyAV probe, decoder routing, crash
  isolation, Parquet write), on a corpus and on a third of it, the faster of two runs each; its marginal
  rate between the two, (clips_large - clips_small) / (seconds_large - seconds_small), cancels what a run
  pays once;
- limit: a plain decord loop over exactly the frames the command wrote (read back from its output by
  start time), one process per core, no Ray.
The command's peak memory on both corpora shows that it does not grow with the number of videos. The peer,
Ray Data's `read_videos` with a group-by per video, is timed at the first resolution only.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from flows import tensor_parquet
from flows.clips import ClipConfig, list_video_rows
from flows.probe import probe
from jobs import benchmarks
from jobs.runtime import console, init_ray

LIMIT_RATIO = 0.85  # the command's marginal rate against the decode limit
PEER_RATIO = 5.0
MEMORY_RATIO = 1.2  # peak memory, large corpus over small
WIDESCREEN = {360: 640, 720: 1280, 1080: 1920}


@dataclass(frozen=True)
class BenchDecodeConfig:
    """The corpora to decode (generated per height unless `corpus` is given) and the clips to cut."""

    corpus: str | None = None
    heights: tuple[int, ...] = (360, 720, 1080)
    videos: int = 48  # at 1080p; more at smaller heights (`videos_at`)
    distinct: int = 8  # videos encoded per height; the rest are copies (decoding costs the same)
    duration_s: float = 10.0
    fps: int = 25
    gop_s: float = 2.0
    clips_per_video: int = 4
    clip_len: int = 16
    size: int = 112
    peer: bool = True
    record: bool = True

    def __post_init__(self) -> None:
        for name in ("videos", "distinct", "fps", "clips_per_video", "clip_len", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench decode: {name}={getattr(self, name)} must be >= 1")
        if self.videos < 3:
            raise ValueError(f"bench decode: videos={self.videos} must be >= 3 (a third of them is a run)")
        bad = [h for h in self.heights if h < 32 or h % 2]
        if bad or not self.heights:
            raise ValueError(f"bench decode: heights={self.heights} must be even pixel counts >= 32")

    @property
    def clip_config(self) -> ClipConfig:
        return ClipConfig(
            clip_len=self.clip_len, size=(self.size, self.size), clips_per_video=self.clips_per_video
        )


@dataclass(frozen=True)
class Run:
    """One timed run: clips produced, seconds and peak memory of the process tree."""

    videos: int
    clips: int
    seconds: float
    peak_gib: float


@dataclass(frozen=True)
class Row:
    """One resolution: the command's two runs, its marginal rate, and the limit over the same frames."""

    corpus: str
    small: Run
    large: Run
    limit_clips_per_s: float

    @property
    def command_clips_per_s(self) -> float:
        return (self.large.clips - self.small.clips) / max(self.large.seconds - self.small.seconds, 1e-9)

    @property
    def ratio(self) -> float:
        return self.command_clips_per_s / self.limit_clips_per_s

    @property
    def memory_ratio(self) -> float:
        return self.large.peak_gib / self.small.peak_gib


def main(config: BenchDecodeConfig) -> list[Row]:
    """Measure every resolution (or the given corpus), print the ratios and append them to BENCHMARKS.md."""
    init_ray()
    rows, peer = [], None
    with tempfile.TemporaryDirectory(prefix="reelflow-bench-") as tmp:
        work = Path(tmp)
        _warm_up(work, config)
        corpora = [(config.corpus, "given corpus")] if config.corpus else []
        for height in [] if config.corpus else config.heights:
            corpus = work / f"{height}p"
            _generate_corpus(corpus, height, config)
            corpora.append((str(corpus), f"{_width(height)}×{height}"))
        for corpus, name in corpora:
            rows.append(_measure(corpus, name, work / "out", config))
            if config.peer and peer is None:
                peer = _measure_peer(corpus, work / "out", config)
    _report(rows, peer, config)
    return rows


def _width(height: int) -> int:
    return WIDESCREEN.get(height, height * 16 // 9 // 2 * 2)


# --- corpora ---------------------------------------------------------------------------------------------


def videos_at(height: int, config: BenchDecodeConfig) -> int:
    """Videos generated at `height`: `config.videos` at 1080p and more for smaller frames, up to 3× at 360p,
    so that each height's runs last about as long; at 360p a run of 48 videos decodes in 2.5 s, and Ray Data
    sometimes runs one task for a dataset's first second (docs/decisions.md), which then moves the marginal
    rate by a fifth."""
    return config.videos * max(1, min(3, round(1080 / height)))


def _generate_corpus(folder: Path, height: int, config: BenchDecodeConfig) -> None:
    """`videos_at(height)` H.264 files of one resolution, under folder/small (a third) and folder/rest."""
    videos = videos_at(height, config)
    distinct = folder / "distinct"
    distinct.mkdir(parents=True)
    jobs = [(str(distinct / f"v{i}.mp4"), _width(height), height, config, i) for i in range(config.distinct)]
    with mp.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        encoded = pool.map(_encode, jobs)
    n_small = videos // 3
    for i in range(videos):
        part = folder / ("small" if i < n_small else "rest")
        part.mkdir(exist_ok=True)
        shutil.copyfile(encoded[i % len(encoded)], part / f"video{i:04d}.mp4")
    shutil.rmtree(distinct)


def _encode(job: tuple[str, int, int, BenchDecodeConfig, int]) -> str:
    """A video with the detail and motion of real footage: a panning textured scene, H.264, GOP `gop_s`."""
    import av

    path, width, height, config, seed = job
    rng = np.random.default_rng(seed)
    pad = max(16, height // 8)
    cells = ((height + 2 * pad) // 8 + 1, (width + 2 * pad) // 8 + 1, 3)
    blocks = rng.integers(0, 256, cells, dtype=np.uint8)
    scene = blocks.repeat(8, 0).repeat(8, 1)
    with av.open(path, "w") as out:
        gop = str(max(1, round(config.gop_s * config.fps)))
        stream = out.add_stream("libx264", rate=config.fps, options={"g": gop, "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(round(config.duration_s * config.fps)):
            x, y = (round(pad + pad * np.sin(i / period + seed)) for period in (20.0, 27.0))
            image = np.ascontiguousarray(scene[y : y + height, x : x + width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


# --- the command, and the limit over its frames -----------------------------------------------------------


def _warm_up(work: Path, config: BenchDecodeConfig) -> None:
    """One small command run first: Ray's workers, their decoder processes and imports start once."""
    folder = work / "warm-up"
    folder.mkdir()
    _encode((str(folder / "warm.mp4"), 160, 96, replace(config, duration_s=2.0), 0))
    _run_command(str(folder), work / "out", config)


def _run_command(corpus: str, out: Path, config: BenchDecodeConfig, measure_memory: bool = False) -> Run:
    """One `reelflow clips` run; its peak memory only when asked (0 otherwise)."""
    from jobs.clips import ClipsJobConfig
    from jobs.clips import main as clips_main

    memory = benchmarks.PeakMemory() if measure_memory else None
    with memory or contextlib.nullcontext():
        summary = clips_main(ClipsJobConfig(corpus, str(out), config.clip_config))
    return Run(summary.videos, summary.clips, summary.seconds, memory.peak_gib if memory else 0.0)


def _measure(corpus: str, name: str, out: Path, config: BenchDecodeConfig) -> Row:
    small_corpus = os.path.join(corpus, "small")
    if not os.path.isdir(small_corpus):  # a given corpus: its first third, copied
        small_corpus = _first_third(corpus, out.parent / "small")
    # Each size timed twice, interleaved, the faster run of each kept: one slow run (a page-cache miss, a
    # neighbour) would otherwise move the marginal rate, a difference of two times, by tens of percent. Peak
    # memory comes from one more run of each: sampling it reads every process's page map, a few percent of
    # the cores that the timed runs would lose and the limit loop would not.
    small, large = _run_command(small_corpus, out, config), _run_command(corpus, out, config)
    small = min(small, _run_command(small_corpus, out, config), key=lambda run: run.seconds)
    large = min(large, _run_command(corpus, out, config), key=lambda run: run.seconds)
    small = replace(small, peak_gib=_run_command(small_corpus, out, config, measure_memory=True).peak_gib)
    large = replace(large, peak_gib=_run_command(corpus, out, config, measure_memory=True).peak_gib)
    jobs = _frames_written(out / "clips", config.clip_len)
    with mp.get_context("spawn").Pool(os.cpu_count(), initializer=_import_decord) as pool:
        n_clips, seconds = benchmarks.timed(lambda: sum(pool.imap_unordered(_decord_clips, jobs)))
    if n_clips != large.clips:
        raise RuntimeError(f"bench decode: the limit loop cut {n_clips} clips, the command {large.clips}")
    return Row(name, small, large, n_clips / seconds)


def _first_third(corpus: str, folder: Path) -> str:
    rows = list_video_rows(corpus)
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows[: max(1, len(rows) // 3)]:
        shutil.copyfile(row.uri, folder / f"{row.video_id.replace('/', '_')}{Path(row.uri).suffix}")
    return str(folder)


def _frames_written(clips_dir: Path, clip_len: int) -> list[tuple[str, list[list[int]], tuple[int, int]]]:
    """(video, every clip's frame indices, clip size), from the start times of the command's own clips."""
    table = pq.read_table(clips_dir, columns=["uri", "start_s", "frames"])
    _, height, width, _ = json.loads(table.schema.field("frames").metadata[tensor_parquet.SHAPE_KEY])
    by_video: dict[str, list[float]] = {}
    for uri, start in zip(table.column("uri").to_pylist(), table.column("start_s").to_pylist(), strict=True):
        by_video.setdefault(uri, []).append(start)
    jobs = []
    for uri, starts in by_video.items():
        fps = probe(uri).fps
        clips = [list(range(round(s * fps), round(s * fps) + clip_len)) for s in sorted(starts)]
        jobs.append((uri, clips, (height, width)))
    return jobs


def _import_decord() -> None:
    import decord  # noqa: F401


def _decord_clips(job: tuple[str, list[list[int]], tuple[int, int]]) -> int:
    import decord

    uri, clips, (height, width) = job
    reader = decord.VideoReader(uri, ctx=decord.cpu(0), width=width, height=height, num_threads=1)
    wanted = sorted({i for clip in clips for i in clip if i < len(reader)})
    frames = dict(zip(wanted, reader.get_batch(wanted).asnumpy(), strict=True))
    return len([np.stack([frames[i] for i in clip if i in frames]) for clip in clips])


# --- the peer: ray.data.read_videos + clips assembled from frame rows --------------------------------------


def _measure_peer(corpus: str, out: Path, config: BenchDecodeConfig) -> tuple[float, float]:
    """(peer clips/s, the command's clips/s) on the small corpus of the first resolution."""
    import ray.data

    small_corpus = os.path.join(corpus, "small") if os.path.isdir(os.path.join(corpus, "small")) else corpus
    videos = list_video_rows(small_corpus)
    plans = {}
    for video in videos:
        info = probe(video.uri)
        plans[os.path.abspath(video.uri)] = config.clip_config.plan(info.n_frames, info.fps, video.uri)

    def assemble(group: dict[str, np.ndarray]) -> dict[str, Any]:
        video_plans = plans[str(group["path"][0])]
        by_index = dict(zip(group["frame_index"].tolist(), group["frame"], strict=True))
        clips = [np.stack([by_index[i] for i in p.frame_indices if i in by_index]) for p in video_plans]
        return {"clip_index": [p.clip_index for p in video_plans], "frames": clips}

    def consume() -> int:
        frames = ray.data.read_videos(list(plans), include_paths=True, resize=(config.size, config.size))
        clips = frames.groupby("path").map_groups(assemble)
        return sum(len(batch["clip_index"]) for batch in clips.iter_batches(batch_size=None))

    n_clips, seconds = benchmarks.timed(consume)
    command = _run_command(small_corpus, out, config)
    return n_clips / seconds, command.clips / command.seconds


def _report(rows: list[Row], peer: tuple[float, float] | None, config: BenchDecodeConfig) -> None:
    from rich.table import Table

    columns = (
        "corpus", "videos", "command clips/s", "limit clips/s", "command / limit", "peak GiB (⅓ → all)"
    )  # fmt: skip
    table = Table(title="bench decode: `reelflow clips` against the decode limit")
    for column in columns:
        table.add_column(column)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (
            row.corpus,
            f"{row.small.videos} → {row.large.videos}",
            f"{row.command_clips_per_s:.1f}",
            f"{row.limit_clips_per_s:.1f}",
            f"{row.ratio:.2f}",
            f"{row.small.peak_gib:.2f} → {row.large.peak_gib:.2f}",
        )
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    ratios = [
        f"{row.corpus}: command / decode limit = {row.ratio:.2f} (target ≥ {LIMIT_RATIO}); peak memory "
        f"×{row.large.videos / row.small.videos:.0f} videos = {row.memory_ratio:.2f} "
        f"(target ≤ {MEMORY_RATIO})"
        for row in rows
    ]
    if peer is not None:
        versus = peer[1] / peer[0]
        ratios.append(f"command / peer (read_videos + group-by) = {versus:.2f} (target ≥ {PEER_RATIO})")
    console.print(table)
    for line in ratios:
        console.print(line)
    if config.record:
        clips = f"{config.clips_per_video} clips × {config.clip_len} frames at {config.size}×{config.size}"
        corpus = config.corpus or (
            f"generated H.264, {config.duration_s:g} s at {config.fps} fps, GOP {config.gop_s:g} s"
        )
        body = "\n".join([f"Corpus: {corpus}; {clips}.", "", *lines, "", *[f"- {r}" for r in ratios]])
        benchmarks.record("Decode (`reelflow bench decode`)", body)
