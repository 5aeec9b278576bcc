"""Clip planning (property tests) and clip assembly from a decoder's frame stream."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flows import sampling
from flows.media import DecodedFrame
from flows.sampling import ClipPlan, assemble_clips, needed_frames

# Real-world frame rates, so the tests exercise NTSC rates without float pathologies.
RATES = [8.0, 10.0, 12.0, 15.0, 23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 59.94, 60.0, 120.0]

n_frames_st = st.integers(1, 2000)
fps_st = st.sampled_from(RATES)
target_st = st.none() | st.sampled_from(RATES)
clip_len_st = st.integers(1, 40)
num_clips_st = st.integers(1, 12)


def grid_frames(n_frames: int, fps: float, target_fps: float | None) -> list[int]:
    """Source frames on the output grid, the slow, obvious way: the frame nearest to each time k/target.

    (k·(fps/target) rounded half up, the planner's float formula, so exact half-way ties agree.)
    """
    step = fps / (target_fps or fps)
    out, k = [], 0
    while k * step <= n_frames - 1 + 1e-9:
        out.append(min(n_frames - 1, int(np.floor(k * step + 0.5))))
        k += 1
    return out


def check_plans(plans: list[ClipPlan], n_frames: int, fps: float, clip_len: int) -> None:
    """What every planner promises about every plan."""
    assert [p.clip_index for p in plans] == list(range(len(plans)))
    for p in plans:
        assert len(p.frame_indices) == clip_len
        assert all(0 <= i < n_frames for i in p.frame_indices)
        assert list(p.frame_indices) == sorted(p.frame_indices)
        assert p.start_s == pytest.approx(p.frame_indices[0] / fps)
        assert p.end_s == pytest.approx(p.frame_indices[-1] / fps)


# --- planners: properties -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(n_frames_st, fps_st, clip_len_st, num_clips_st, target_st)
def test_uniform_clips_properties(n_frames, fps, clip_len, num_clips, target_fps):
    plans = sampling.uniform_clips(n_frames, fps, clip_len, num_clips, target_fps=target_fps)
    assert len(plans) == num_clips
    check_plans(plans, n_frames, fps, clip_len)
    starts = [p.frame_indices[0] for p in plans]
    assert starts == sorted(starts)
    if target_fps is None and n_frames - clip_len + 1 >= num_clips:
        assert len(set(starts)) == num_clips, "enough room: clips must not repeat"


@settings(max_examples=300, deadline=None)
@given(n_frames_st, fps_st, clip_len_st, st.data(), target_st)
def test_sliding_windows_cover_the_whole_video(n_frames, fps, clip_len, data, target_fps):
    stride = data.draw(st.integers(1, clip_len))
    plans = sampling.sliding_windows(n_frames, fps, clip_len, stride, target_fps=target_fps)
    check_plans(plans, n_frames, fps, clip_len)
    grid = grid_frames(n_frames, fps, target_fps)
    covered = {i for p in plans for i in p.frame_indices}
    assert covered == set(grid), "every frame on the output grid lies in a window, and nothing else"
    assert plans[0].frame_indices[0] == 0
    assert plans[-1].frame_indices[-1] == grid[-1]
    if target_fps is None or target_fps <= fps:  # upsampling repeats source frames, and so may windows
        assert len({p.frame_indices for p in plans}) == len(plans), "no duplicate windows"
    if target_fps is None:
        starts = [p.frame_indices[0] for p in plans]
        assert starts[:-1] == list(range(0, stride * (len(plans) - 1), stride))
        if len(starts) > 1:
            assert 0 < starts[-1] - starts[-2] <= stride


@settings(max_examples=300, deadline=None)
@given(n_frames_st, fps_st, clip_len_st, num_clips_st, st.integers(0, 2**63), target_st)
def test_random_clips_properties_and_determinism(n_frames, fps, clip_len, num_clips, seed, target_fps):
    plans = sampling.random_clips(n_frames, fps, clip_len, num_clips, seed, target_fps=target_fps)
    assert len(plans) == num_clips
    check_plans(plans, n_frames, fps, clip_len)
    again = sampling.random_clips(n_frames, fps, clip_len, num_clips, seed, target_fps=target_fps)
    assert again == plans, "same seed, same plans"
    starts = [p.frame_indices[0] for p in plans]
    assert starts == sorted(starts), "numbered in time order"
    if target_fps is None and n_frames - clip_len + 1 >= num_clips:
        assert len(set(starts)) == num_clips, "distinct starts while there are enough"


def test_random_clips_differ_across_seeds_and_reach_both_ends():
    by_seed = {s: sampling.random_clips(1000, 30.0, 16, 4, seed=s) for s in range(200)}
    assert len({tuple(p.frame_indices for p in plans) for plans in by_seed.values()}) == 200
    firsts = [p.frame_indices[0] for plans in by_seed.values() for p in plans]
    assert min(firsts) < 50 and max(firsts) > 1000 - 16 - 50, "starts spread over the whole video"


def test_video_seed_is_stable_and_separates_videos():
    assert sampling.video_seed(7, "a.mp4") == sampling.video_seed(7, "a.mp4")
    assert len({sampling.video_seed(s, k) for s in (0, 1) for k in ("a.mp4", "b.mp4")}) == 4


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3000), fps_st, st.integers(2, 40), num_clips_st, fps_st)
def test_resampling_keeps_timing(n_frames, fps, clip_len, num_clips, target_fps):
    """Frames of a clip sit 1/target_fps apart (within a source frame): clips last what the model expects."""
    assume((n_frames - 1) / fps >= (clip_len - 1) / target_fps)  # long enough: no padding
    for plans in (
        sampling.uniform_clips(n_frames, fps, clip_len, num_clips, target_fps=target_fps),
        sampling.sliding_windows(n_frames, fps, clip_len, clip_len, target_fps=target_fps),
    ):
        for p in plans:
            gaps = np.diff(np.array(p.frame_indices) / fps)
            assert np.abs(gaps - 1 / target_fps).max() <= 1 / fps + 1e-9
            assert p.end_s - p.start_s == pytest.approx((clip_len - 1) / target_fps, abs=1 / fps + 1e-9)
            if target_fps <= fps:  # each frame is the source frame nearest its time on the target grid
                grid_start = round(p.start_s * target_fps) / target_fps
                ideal = grid_start + np.arange(clip_len) / target_fps
                assert np.abs(np.array(p.frame_indices) / fps - ideal).max() <= 0.5 / fps + 1e-9


def test_60_to_15_fps_takes_every_fourth_frame():
    plans = sampling.sliding_windows(600, 60.0, 16, 16, target_fps=15.0)
    assert plans[0].frame_indices == tuple(range(0, 64, 4))
    assert plans[1].start_s == pytest.approx(64 / 60)
    assert all(np.all(np.diff(p.frame_indices) == 4) for p in plans)
    assert plans[-1].frame_indices[-1] == 596  # last frame on the 15 fps grid of a 10 s video
    assert plans[0].end_s - plans[0].start_s == pytest.approx(15 / 15)


def test_ntsc_to_15_fps_is_evenly_spaced():
    (plan,) = sampling.center_clip(300, 29.97, 8, target_fps=15.0)
    assert set(np.diff(plan.frame_indices)) == {2}


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 15), fps_st, st.integers(16, 32), num_clips_st)
def test_short_videos_are_padded_with_the_last_frame(n_frames, fps, clip_len, num_clips):
    padded = (*range(n_frames), *[n_frames - 1] * (clip_len - n_frames))
    for plans in (
        sampling.uniform_clips(n_frames, fps, clip_len, num_clips),
        sampling.random_clips(n_frames, fps, clip_len, num_clips, seed=3),
    ):
        assert [p.frame_indices for p in plans] == [padded] * num_clips
    assert [p.frame_indices for p in sampling.sliding_windows(n_frames, fps, clip_len, 4)] == [padded]


def test_single_frame_video():
    (plan,) = sampling.sliding_windows(1, 25.0, 4, 2)
    assert plan == ClipPlan(0, (0, 0, 0, 0), 0.0, 0.0)


def test_center_clip_is_in_the_middle():
    (plan,) = sampling.center_clip(101, 25.0, 11)
    assert plan.frame_indices == tuple(range(45, 56))


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: sampling.uniform_clips(0, 30.0, 16, 4), "n_frames"),
        (lambda: sampling.uniform_clips(10.5, 30.0, 16, 4), "n_frames"),
        (lambda: sampling.uniform_clips(100, 0.0, 16, 4), "fps"),
        (lambda: sampling.uniform_clips(100, float("nan"), 16, 4), "fps"),
        (lambda: sampling.uniform_clips(100, 30.0, 0, 4), "clip_len"),
        (lambda: sampling.uniform_clips(100, 30.0, 16, 0), "num_clips"),
        (lambda: sampling.uniform_clips(100, 30.0, 16, 4, target_fps=-15.0), "target_fps"),
        (lambda: sampling.sliding_windows(100, 30.0, 16, 0), "stride"),
        (lambda: sampling.sliding_windows(100, 30.0, 16, 17), "stride"),
        (lambda: sampling.random_clips(100, 30.0, 16, 4, seed=-1), "seed"),
        (lambda: sampling.random_clips(100, 30.0, 16, 4, seed=True), "seed"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}: ") as err:
        call()
    assert "\n" not in str(err.value)


def test_needed_frames_is_the_sorted_union():
    plans = [ClipPlan(0, (5, 6, 6), 0, 0), ClipPlan(1, (1, 2, 5), 0, 0)]
    assert needed_frames(plans) == [1, 2, 5, 6]


# --- assembly -----------------------------------------------------------------------------------------


def image(i: int) -> np.ndarray:
    """A tiny frame that encodes its index, so a test can tell which frame went where."""
    return np.array([[[i % 256, i // 256 % 256, 7]]], dtype=np.uint8)


def index_of(frames: np.ndarray) -> list[int]:
    return [int(f[0, 0, 0]) + 256 * int(f[0, 0, 1]) for f in frames]


def frame_stream(indices: Iterable[int], fps: float = 10.0) -> Iterator[DecodedFrame]:
    for i in indices:
        yield DecodedFrame(i, i / fps + 0.5, image(i))  # +0.5: times come from the stream, not the plan


class Watched:
    """Hands frames to an assembly and checks, at every pull, what the assembly holds."""

    def __init__(self, plans: list[ClipPlan], indices: list[int], exact: bool = True) -> None:
        self.plans, self.indices, self.exact = plans, indices, exact
        self.assembly = None
        self.pulled = 0
        self.max_held = 0

    def __iter__(self) -> Iterator[DecodedFrame]:
        for n, frame in enumerate(frame_stream(self.indices)):
            self.check(self.indices[:n])
            self.pulled += 1
            yield frame
        self.check(self.indices)

    def check(self, arrived: list[int]) -> None:
        held = self.assembly.buffered_indices
        self.max_held = max(self.max_held, len(held))
        if not self.exact:
            return
        frontier = arrived[-1] if arrived else -1
        waiting = {i for p in self.plans if max(p.frame_indices) > frontier for i in p.frame_indices}
        assert set(held) == waiting & set(arrived), "holds exactly the arrived frames that waiting clips need"


def run_watched(plans: list[ClipPlan], indices: list[int], exact: bool = True):
    watched = Watched(plans, indices, exact)
    assembly = assemble_clips(plans, watched)
    watched.assembly = assembly
    clips = []
    for clip in assembly:
        clips.append((clip, watched.pulled))
    return assembly, clips, watched


@st.composite
def plans_and_stream(draw):
    n = draw(st.integers(1, 150))
    clip_len = draw(st.integers(1, 16))
    kind = draw(st.sampled_from(["uniform", "sliding", "random"]))
    target = draw(st.none() | st.sampled_from([7.5, 15.0, 45.0]))
    if kind == "uniform":
        plans = sampling.uniform_clips(n, 30.0, clip_len, draw(num_clips_st), target_fps=target)
    elif kind == "sliding":
        stride = draw(st.integers(1, clip_len))
        plans = sampling.sliding_windows(n, 30.0, clip_len, stride, target_fps=target)
    else:
        plans = sampling.random_clips(n, 30.0, clip_len, draw(num_clips_st), draw(st.integers(0, 99)), target)
    needed = needed_frames(plans)
    dropped = draw(st.sets(st.sampled_from(needed), max_size=len(needed)))
    cut = draw(st.integers(0, n))  # the stream may end early, like a truncated file
    return plans, [i for i in needed if i not in dropped and i < cut]


@settings(max_examples=200, deadline=None)
@given(plans_and_stream())
def test_assembly_holds_only_needed_frames_and_pads_what_is_missing(case):
    plans, indices = case
    assembly, clips, _ = run_watched(plans, indices)
    arrived = set(indices)
    expected = [p for p in plans if arrived & set(p.frame_indices)]
    assert [c.plan for c, _ in clips] == expected, "every clip with a decoded frame, in clip_index order"
    for clip, pulled in clips:
        got = index_of(clip.frames)
        assert clip.frames.dtype == np.uint8 and clip.frames.shape == (len(got), 1, 1, 3)
        assert len(got) == len(clip.plan.frame_indices)
        for want, have in zip(clip.plan.frame_indices, got, strict=True):
            assert have in arrived and have in clip.plan.frame_indices
            if want in arrived:
                assert have == want
        np.testing.assert_allclose(clip.times_s, np.array(got) / 10.0 + 0.5)
        if max(clip.plan.frame_indices) in arrived:  # yielded before the next frame is pulled
            assert pulled == indices.index(max(clip.plan.frame_indices)) + 1
    assert assembly.planned_frames == len(needed_frames(plans))
    assert assembly.decoded_frames == len(indices)
    assert assembly.complete == (len(indices) == assembly.planned_frames)


def test_complete_stream_gives_every_clip_exactly():
    plans = sampling.sliding_windows(100, 10.0, 16, 8)
    assembly, clips, _ = run_watched(plans, needed_frames(plans))
    assert [index_of(c.frames) for c, _ in clips] == [list(p.frame_indices) for p in plans]
    assert assembly.complete and assembly.decoded_frames == 100


def test_truncated_stream_pads_with_the_last_decoded_frame():
    plans = sampling.sliding_windows(100, 10.0, 10, 10)  # clips 0-9, 10-19, ...
    assembly, clips, _ = run_watched(plans, list(range(0, 24)))
    assert [c.plan.clip_index for c, _ in clips] == [0, 1, 2]
    assert index_of(clips[2][0].frames) == [20, 21, 22, 23, 23, 23, 23, 23, 23, 23]
    assert (assembly.planned_frames, assembly.decoded_frames, assembly.complete) == (100, 24, False)


def test_gaps_are_filled_within_the_clip():
    plans = [ClipPlan(0, (0, 1, 2, 3, 4), 0.0, 0.4)]
    _, clips, _ = run_watched(plans, [2, 4])  # 0, 1 and 3 lost to corrupt packets
    assert index_of(clips[0][0].frames) == [2, 2, 2, 2, 4]


def test_long_video_memory_is_bounded_by_the_pending_clips():
    plans = sampling.sliding_windows(30_000, 30.0, 16, 4)
    assembly, clips, watched = run_watched(plans, needed_frames(plans), exact=False)
    assert len(clips) == len(plans) == 7497 and assembly.complete
    assert watched.max_held <= 16, "never more than one clip's frames, whatever the video's length"


def test_frames_out_of_order_are_refused():
    plans = sampling.uniform_clips(10, 10.0, 4, 1)
    with pytest.raises(ValueError, match="frames: index 3 came after 4"):
        list(assemble_clips(plans, frame_stream([0, 1, 4, 3])))


def test_frames_nobody_needs_are_ignored():
    plans = [ClipPlan(0, (2, 4), 0.2, 0.4)]
    (clip,) = assemble_clips(plans, frame_stream(range(10)))
    assert index_of(clip.frames) == [2, 4]


def test_assembles_real_decoded_frames(shared_videos):
    from flows.decode import iter_frames
    from flows.probe import probe

    path = str(shared_videos / "mmaction2" / "demo.mp4")
    info = probe(path)
    plans = sampling.uniform_clips(info.n_frames, info.fps, 8, 3, target_fps=info.fps / 2)
    assembly = assemble_clips(plans, iter_frames(path, info, needed_frames(plans), (32, 48), "pyav"))
    clips = list(assembly)
    assert [c.plan for c in clips] == plans and assembly.complete
    for clip in clips:
        assert clip.frames.shape == (8, 32, 48, 3) and clip.frames.dtype == np.uint8
        np.testing.assert_allclose(clip.times_s, np.array(clip.plan.frame_indices) / info.fps, atol=1e-3)


# --- planning over real presentation times ------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    gaps=st.lists(st.sampled_from([0.004, 0.033, 0.04, 0.1, 0.8, 5.0]), min_size=1, max_size=300),
    target=st.sampled_from([5.0, 15.0, 30.0]),
    clip_len=clip_len_st,
)
def test_planning_over_times_takes_the_frame_nearest_each_grid_second(gaps, target, clip_len) -> None:
    times = np.concatenate([[2.0], 2.0 + np.cumsum(gaps)])
    plans = sampling.sliding_windows(len(times), 25.0, clip_len, clip_len, target, times=times)
    n_out = sampling.grid_frames(len(times), 25.0, target, times=times)
    assert n_out == int(np.floor((times[-1] - times[0]) * target + 1e-6)) + 1
    for plan in plans:
        start = plan.clip_index * clip_len if plan is not plans[-1] else max(0, n_out - clip_len)
        grid = np.minimum(np.arange(start, start + clip_len), n_out - 1)
        wanted = times[0] + grid / target
        got = times[list(plan.frame_indices)]
        assert np.allclose(np.abs(got - wanted), np.abs(times[None, :] - wanted[:, None]).min(axis=1))
        assert (plan.start_s, plan.end_s) == (got[0], got[-1])


def test_planning_over_times_without_a_target_rate_takes_consecutive_frames() -> None:
    times = np.array([0.0, 0.01, 0.02, 1.5, 1.51, 4.0])
    plans = sampling.uniform_clips(6, 30.0, 3, 2, times=times)
    assert [p.frame_indices for p in plans] == [(1, 2, 3), (3, 4, 5)]
    assert [(p.start_s, p.end_s) for p in plans] == [(0.01, 1.5), (1.5, 4.0)]
    assert [p.frame_indices for p in sampling.shifted(plans, 10)] == [(11, 12, 13), (13, 14, 15)]


@pytest.mark.parametrize(
    ("times", "message"),
    [
        ([0.0, 0.1], "one time per frame"),
        ([0.0, 0.1, 0.1], "strictly increasing"),
        ([0, 1, np.nan], "finite"),
    ],
)
def test_bad_times_are_refused(times, message) -> None:
    with pytest.raises(ValueError, match=message):
        sampling.uniform_clips(3, 30.0, 2, 1, times=times)


def test_window_frames_are_the_frames_inside_a_labelled_window() -> None:
    times = np.arange(30) / 10.0  # 3 s at 10 fps
    assert sampling.window_frames(times, (1.0, 2.0)) == (10, 21)  # both ends inside, rounding forgiven
    assert sampling.window_frames(times + 1e-9, (1.0, 2.0)) == (10, 21)
    assert sampling.window_frames(times, (1.05, 1.15)) == (11, 12)
    assert sampling.window_frames(times, (5.0, 9.0)) is None  # past the video: no frame
