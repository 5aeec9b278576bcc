"""`reelflow bench decode` on a tiny corpus: the `clips` command and the decord loop cut the same clips.

(64 px clips: decord2 fails on some small widths, 32 px among them, where the command falls back to PyAV.)
"""

from __future__ import annotations

import pytest

from jobs import bench_decode


def test_bench_decode_times_the_command_against_the_limit_over_the_same_frames(ray_session: None) -> None:
    config = bench_decode.BenchDecodeConfig(
        heights=(64,), videos=3, distinct=2, duration_s=3.0, fps=10, clips_per_video=2, clip_len=4, size=64,
        record=False,
    )  # fmt: skip
    rows = bench_decode.main(config)
    [row] = rows
    # Small frames get 3× the videos (runs long enough to time), a third of them in the small run.
    assert (row.corpus, row.small.videos, row.large.videos) == ("112×64", 3, 9)
    assert (row.small.clips, row.large.clips) == (6, 18)  # the limit loop checks it cut these 18 too
    assert row.command_clips_per_s > 0 and row.limit_clips_per_s > 0 and row.small.peak_gib > 0


def test_bench_decode_rejects_a_config_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="videos=2 must be >= 3"):
        bench_decode.BenchDecodeConfig(videos=2)
    with pytest.raises(ValueError, match=r"heights=\(361,\)"):
        bench_decode.BenchDecodeConfig(heights=(361,))
