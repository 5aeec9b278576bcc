"""`reelflow bench timeline`: what planning from the stream's real timeline costs, against decoding.

For each kind of lying header (`jobs.suspect_videos`, written at `size`) and for an honest MP4 of the same
size, in one run:
- timeline pass: the demux scan (`pyav_decoder.scan`) and the timeline built and checked from it;
- decode: the rest of the clip dataflow's work on that file (`flows.clips.decode_video`: probe, plan,
  decode and assemble the tag job's sliding windows), the scan taken out.
The limit: the timeline pass costs at most 10 % of decoding a suspect file. An honest file pays only the
check, since its scan already ran before this change (the decoders index frames by it).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flows import pyav_decoder
from flows.clips import ClipConfig, decode_video
from flows.probe import probe
from flows.timeline import Timeline
from jobs import benchmarks, suspect_videos
from jobs.runtime import console

LIMIT = 0.10


@dataclass(frozen=True)
class BenchTimelineConfig:
    """Frame size (height, width) of the generated files, and how many times each is timed (best kept)."""

    size: tuple[int, int] = (360, 640)
    repeats: int = 3
    record: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1 or min(self.size) < 64:
            raise ValueError(
                f"bench timeline: repeats >= 1 and size >= 64 px, got {self.repeats}, {self.size}"
            )


TAG_CLIPS = ClipConfig(clip_len=16, size=(112, 112), sampling="sliding", target_fps=15.0)


def _best(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(path: Path, repeats: int) -> tuple[float, float, float]:
    """(scan seconds, timeline check seconds, decode seconds without the scan) for one file."""
    info = probe(str(path))
    table = pyav_decoder.scan(str(path), info)
    scan_s = _best(repeats, lambda: pyav_decoder.scan(str(path), info))

    def check() -> None:
        timeline = Timeline.of(table, info)
        if timeline is not None:
            timeline.disagreements(info)
            timeline.losses(info)

    check_s = _best(repeats, check)
    total_s = _best(repeats, lambda: list(decode_video(str(path), path.name, TAG_CLIPS)))
    return scan_s, check_s, max(total_s - scan_s - check_s, 1e-9)


def main(config: BenchTimelineConfig) -> list[tuple[str, float, float]]:
    """Time the timeline pass against decoding on every suspect kind; returns (name, ratio, limit) rows."""
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = suspect_videos.write_all(folder, config.size)
        times = [i / 25 for i in range(250)]
        files["honest_mp4"] = suspect_videos.write_video(folder / "honest.mp4", times, fmt="mp4", rate=25,
                                                         size=config.size)  # fmt: skip
        for name, path in files.items():
            scan_s, check_s, decode_s = measure(path, config.repeats)
            honest = name == "honest_mp4"
            cost = check_s if honest else scan_s + check_s  # an honest file's scan is not new
            ratio = cost / decode_s
            rows.append((name, ratio, LIMIT))
            what = "check only" if honest else "scan + check"
            line = (f"| {name} | {scan_s * 1000:.1f} | {check_s * 1000:.2f} | {decode_s * 1000:.0f} | "
                    f"{ratio:.3f} ({what}) | {'ok' if ratio <= LIMIT else 'OVER'} |")  # fmt: skip
            lines.append(line)
            console.print(line)
    body = "\n".join(
        [
            f"Files of {config.size[1]}×{config.size[0]} px; decode = the tag job's sliding windows "
            f"(16 frames at 15 fps, 112×112) without the scan; best of {config.repeats}. "
            f"Limit: timeline pass ≤ {LIMIT:.0%} of decoding.",
            "",
            "| file | scan ms | check ms | decode ms | ratio | vs limit |",
            "|---|---|---|---|---|---|",
            *lines,
        ]
    )
    if config.record:
        benchmarks.record("Timeline pass vs decoding", body)
    return rows
