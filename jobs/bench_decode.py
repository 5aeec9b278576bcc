"""`reelflow bench decode`: the clip dataflow against the decode limit and against Ray's `read_videos`.

All three are measured in one run over the same clip plans:
- limit: a plain decord loop, one process per core, no Ray — what decoding alone can do here;
- dataflow: `flows.clips` on local Ray (probe, routing, isolation, streaming included);
- peer: `ray.data.read_videos(resize=...)` (one row per frame), then the same clips assembled from
  its frame rows with a group-by per video.
Peak memory of the process tree is sampled for each, and the dataflow runs again on a corpus `scale`
times larger to show that its memory does not grow with the number of videos.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flows import sampling
from flows.clips import ClipConfig, VideoRow, clip_dataset, list_video_rows, video_dataset
from flows.probe import probe
from jobs import benchmarks, make_corpus
from jobs.runtime import console, init_ray


@dataclass(frozen=True)
class BenchDecodeConfig:
    """The corpus to decode (generated when `corpus` is None) and the clips to cut from it."""

    corpus: str | None = None
    videos: int = 24
    frame_size: int = 360
    duration_s: float = 12.0
    fps: int = 30
    clips_per_video: int = 4
    clip_len: int = 16
    size: int = 112
    scale: int = 4
    record: bool = True

    def __post_init__(self) -> None:
        for name in ("videos", "frame_size", "fps", "clips_per_video", "clip_len", "size", "scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench decode: {name}={getattr(self, name)} must be >= 1")

    @property
    def clip_config(self) -> ClipConfig:
        return ClipConfig(
            clip_len=self.clip_len, size=(self.size, self.size), clips_per_video=self.clips_per_video
        )


@dataclass(frozen=True)
class Measurement:
    name: str
    videos: int
    clips: int
    seconds: float
    peak_gib: float

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds


def main(config: BenchDecodeConfig) -> dict[str, Measurement]:
    """Run the three measurements, print the ratios and append them to BENCHMARKS.md."""
    with tempfile.TemporaryDirectory(prefix="reelflow-bench-") as tmp:
        corpus = config.corpus or _generate_corpus(config, Path(tmp) / "corpus")
        every_video = list_video_rows(corpus)
        small = every_video[: max(1, len(every_video) // config.scale)]
        plans = _plans([v.uri for v in every_video], config.clip_config)
        console.print(f"bench decode: {len(small)} videos (and {len(every_video)} for the memory check)")

        limit = _measure_limit([v.uri for v in small], plans, config)
        init_ray()
        errors = str(Path(tmp) / "errors")
        # Warm-up, not measured: Ray workers, their decoder processes and imports start once per run.
        _measure_dataflow("warm-up", every_video[:2], config, errors)
        flow = _measure_dataflow("dataflow", small, config, errors)
        flow_large = _measure_dataflow(f"dataflow ×{config.scale}", every_video, config, errors)
        peer = _measure_peer(small, plans, config)

    results = {m.name: m for m in (limit, flow, flow_large, peer)}
    _report(results, flow, limit, peer, flow_large, config)
    return results


def _generate_corpus(config: BenchDecodeConfig, out: Path) -> str:
    make_corpus.main(
        make_corpus.CorpusConfig(
            out=str(out),
            videos=config.videos * config.scale,
            seed=7,
            size=config.frame_size,
            duration_s=config.duration_s,
            fps=config.fps,
            audio=False,
            subtitle_fraction=0.0,
        )
    )
    return str(out)


def _plans(uris: list[str], clip_config: ClipConfig) -> dict[str, list[sampling.ClipPlan]]:
    plans = {}
    for uri in uris:
        info = probe(uri)
        plans[uri] = clip_config.plan(info.n_frames, info.fps, uri)
    return plans


# --- (a) the decode limit: plain decord, one process per core ---------------------------------------


def _decord_clips(args: tuple[str, list[sampling.ClipPlan], int]) -> int:
    import decord

    uri, plans, size = args
    reader = decord.VideoReader(uri, ctx=decord.cpu(0), width=size, height=size, num_threads=1)
    wanted = sampling.needed_frames(plans)
    frames = dict(zip(wanted, reader.get_batch(wanted).asnumpy(), strict=True))
    clips = [np.stack([frames[i] for i in plan.frame_indices]) for plan in plans]
    return len(clips)


def _measure_limit(uris: list[str], plans: dict, config: BenchDecodeConfig) -> Measurement:
    jobs = [(uri, plans[uri], config.size) for uri in uris]
    with benchmarks.PeakMemory() as mem, mp.get_context("spawn").Pool(os.cpu_count()) as pool:
        n_clips, seconds = benchmarks.timed(lambda: sum(pool.imap_unordered(_decord_clips, jobs)))
    return Measurement("decode limit (decord loop)", len(uris), n_clips, seconds, mem.peak_gib)


# --- (b) the clip dataflow ---------------------------------------------------------------------------


def _measure_dataflow(
    name: str, videos: list[VideoRow], config: BenchDecodeConfig, errors: str
) -> Measurement:
    def consume() -> int:
        dataset = clip_dataset(video_dataset(videos), config.clip_config, errors)
        return sum(len(batch["clip_index"]) for batch in dataset.iter_batches(batch_size=None))

    with benchmarks.PeakMemory() as mem:
        n_clips, seconds = benchmarks.timed(consume)
    return Measurement(name, len(videos), n_clips, seconds, mem.peak_gib)


# --- (c) the peer: ray.data.read_videos + clips assembled from frame rows ----------------------------


def _measure_peer(videos: list[VideoRow], plans: dict, config: BenchDecodeConfig) -> Measurement:
    import ray.data

    def assemble(group: dict[str, np.ndarray]) -> dict[str, Any]:
        uri = str(group["path"][0])
        by_index = dict(zip(group["frame_index"].tolist(), group["frame"], strict=True))
        video_plans = plans_by_path[uri]
        clips = [np.stack([by_index[i] for i in p.frame_indices if i in by_index]) for p in video_plans]
        return {"uri": [uri] * len(clips), "clip_index": [p.clip_index for p in video_plans], "frames": clips}

    plans_by_path = {os.path.abspath(v.uri): plans[v.uri] for v in videos}

    def consume() -> int:
        frames = ray.data.read_videos(
            list(plans_by_path), include_paths=True, resize=(config.size, config.size)
        )
        clips = frames.groupby("path").map_groups(assemble)
        return sum(len(batch["clip_index"]) for batch in clips.iter_batches(batch_size=None))

    with benchmarks.PeakMemory() as mem:
        n_clips, seconds = benchmarks.timed(consume)
    return Measurement("peer (read_videos + group-by)", len(videos), n_clips, seconds, mem.peak_gib)


def _report(
    results: dict[str, Measurement],
    flow: Measurement,
    limit: Measurement,
    peer: Measurement,
    flow_large: Measurement,
    config: BenchDecodeConfig,
) -> None:
    from rich.table import Table

    table = Table(title="bench decode")
    for column in ("measurement", "videos", "clips", "seconds", "clips/s", "peak GiB"):
        table.add_column(column)
    lines = ["| measurement | videos | clips | seconds | clips/s | peak GiB |", "|---|---|---|---|---|---|"]
    for m in results.values():
        cells = (
            m.name,
            str(m.videos),
            str(m.clips),
            f"{m.seconds:.1f}",
            f"{m.clips_per_s:.1f}",
            f"{m.peak_gib:.2f}",
        )
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    ratios = [
        f"dataflow / decode limit = {flow.clips_per_s / limit.clips_per_s:.2f} (target ≥ 0.8)",
        f"dataflow / peer = {flow.clips_per_s / peer.clips_per_s:.2f} (target ≥ 5)",
        f"peak memory ×{config.scale} videos / ×1 = {flow_large.peak_gib / flow.peak_gib:.2f} (target ≤ 1.2)",
    ]
    console.print(table)
    for line in ratios:
        console.print(line)
    if config.record:
        clip = f"{config.clips_per_video} clips × {config.clip_len} frames at {config.size}×{config.size}"
        corpus = (
            config.corpus or f"generated {config.frame_size}px, {config.duration_s:g} s at {config.fps} fps"
        )
        body = "\n".join([f"Corpus: {corpus}; {clip}.", "", *lines, "", *[f"- {r}" for r in ratios]])
        benchmarks.record("Decode (`reelflow bench decode`)", body)
