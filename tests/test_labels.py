"""Per-clip training targets from a labels manifest, the split by video, and the training augmentation:
pure functions on real manifests written by the corpus generator (no video encoding needed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flows import labels as fl
from flows.transforms import Augment, augment, crop_resize, flip_labels, temporal_crop
from jobs import make_corpus


@pytest.fixture(scope="module")
def manifest_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """labels.parquet of a 40-video corpus plan (the generator's own labels, without the videos)."""
    config = make_corpus.CorpusConfig(out=str(tmp_path_factory.mktemp("corpus")), videos=40, seed=3)
    plans = [make_corpus.plan_video(config, i) for i in range(config.videos)]
    path = f"{config.out}/labels.parquet"
    pq.write_table(make_corpus.labels_table(plans, config), path)
    return path


def test_manifest_label_names_are_sorted_with_background_last(manifest_uri: str) -> None:
    manifest = fl.read_manifest(manifest_uri)
    assert len(manifest.videos) == 40
    assert manifest.labels.categories == tuple(sorted(make_corpus.CATEGORIES))
    assert manifest.labels.sentiments == ("negative", "neutral", "positive")
    assert manifest.labels.actions == (*sorted(make_corpus.ACTIONS), fl.BACKGROUND)
    video = manifest.videos["video_00000.mp4"]
    assert video.actions and all(start < end for _, start, end in video.actions)


def test_declared_classes_count_even_when_no_video_has_them(tmp_path) -> None:
    config = make_corpus.CorpusConfig(out=str(tmp_path), videos=2, seed=0)
    plans = [make_corpus.plan_video(config, i) for i in range(2)]
    pq.write_table(make_corpus.labels_table(plans, config), tmp_path / "labels.parquet")
    manifest = fl.read_manifest(str(tmp_path / "labels.parquet"))
    # Two videos show at most two categories; the class list still has all five (stable indices).
    assert len({v.category for v in manifest.videos.values()}) <= 2
    assert manifest.labels.categories == tuple(sorted(make_corpus.CATEGORIES))


def test_bad_manifests_give_one_line_errors(tmp_path, manifest_uri: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"labels .*missing\.parquet: not found"):
        fl.read_manifest(str(tmp_path / "missing.parquet"))
    table = pq.read_table(manifest_uri)
    pq.write_table(table.drop(["file"]), tmp_path / "no_file.parquet")
    with pytest.raises(ValueError, match=r"missing column 'file'") as err:
        fl.read_manifest(str(tmp_path / "no_file.parquet"))
    assert "\n" not in str(err.value)
    pq.write_table(table.select(["file", "duration_s"]), tmp_path / "no_labels.parquet")
    with pytest.raises(ValueError, match=r"no_labels.parquet: no label column"):
        fl.read_manifest(str(tmp_path / "no_labels.parquet"))
    rows = table.to_pylist()
    rows[5]["valence"] = 3.0
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "bad_valence.parquet")
    with pytest.raises(
        ValueError, match=r"row 5 \(video_00005.mp4\): valence 3.0 must be a number in \[-1, 1\]"
    ):
        fl.read_manifest(str(tmp_path / "bad_valence.parquet"))
    (tmp_path / "text.parquet").write_text("file,category\n")
    with pytest.raises(ValueError, match="not a Parquet file"):
        fl.read_manifest(str(tmp_path / "text.parquet"))


def test_split_is_by_video_deterministic_and_stratified(manifest_uri: str) -> None:
    manifest = fl.read_manifest(manifest_uri)
    files = sorted(manifest.videos)
    strata = [manifest.videos[f].category for f in files]
    train, val = fl.split_videos(files, strata, 0.25, seed=7)
    assert not set(train) & set(val)
    assert sorted(train + val) == files
    assert len(val) == 10  # 8 videos per category, 2 of each to validation
    assert {manifest.videos[f].category for f in val} == set(make_corpus.CATEGORIES)
    assert fl.split_videos(list(reversed(files)), list(reversed(strata)), 0.25, seed=7) == (train, val)
    assert fl.split_videos(files, strata, 0.25, seed=8)[1] != val


def test_step_targets_follow_segments_and_clip_labels_need_a_majority() -> None:
    labels = fl.LabelSet(("a", "b"), ("pulse", "slide", fl.BACKGROUND), ("negative", "positive"))
    video = fl.VideoLabels("v.mp4", "a", "positive", 0.5, (("slide", 1.0, 2.0),), ((1.5, 1.8),))
    times = fl.frame_times(0.5, 2.5, 9)  # every 0.25 s
    actions, importance = fl.step_targets(video, times, labels)
    slide, none = labels.actions.index("slide"), labels.background
    assert actions.tolist() == [none, none, slide, slide, slide, slide, slide, none, none]
    assert importance.tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert fl.clip_action(actions, none) == slide  # 5 of 9 frames
    assert fl.clip_action(actions[:4], none) == none  # 2 of 4 frames
    assert fl.clip_action(np.array([slide, slide, slide, none]), none) == slide
    assert fl.clip_action(np.array([slide, slide, none, none]), none) == none  # half is not most
    batch = torch.tensor([[0, 0, 0, none], [none, none, 1, 1]])
    assert fl.clip_action(batch, none).tolist() == [0, none]
    assert fl.clip_importance(importance) == pytest.approx(2 / 9)


def test_attach_targets_names_each_clips_video(manifest_uri: str) -> None:
    manifest = fl.read_manifest(manifest_uri)
    corpus = manifest.uri.rsplit("/", 1)[0]
    video = manifest.videos["video_00003.mp4"]
    label, start, end = video.actions[0]
    batch = {
        "uri": np.array([f"{corpus}/video_00003.mp4"] * 2, dtype=object),
        "start_s": np.array([start, 0.0]),
        "end_s": np.array([end, 0.0 + 15 / 15]),
        "frames": np.zeros((2, 16, 8, 8, 3), dtype=np.uint8),
    }
    out = fl.attach_targets(batch, manifest.videos, manifest.labels, corpus)
    index = manifest.labels.index()
    assert out["file"].tolist() == ["video_00003.mp4"] * 2
    assert out["category"].tolist() == [index["category"][video.category]] * 2
    assert out["sentiment"].tolist() == [index["sentiment"][video.sentiment]] * 2
    assert out["valence"][0] == pytest.approx(video.valence)
    assert out["action_steps"].shape == (2, 16)
    assert set(out["action_steps"][0].tolist()) == {index["action"][label]}
    with pytest.raises(ValueError, match="not under the corpus"):
        fl.relative_file("/elsewhere/video_00003.mp4", corpus)


def test_flip_swaps_only_the_direction_labels_named() -> None:
    labels = fl.LabelSet(("a", "b"), ("slide_left", "slide_right", "spin", fl.BACKGROUND), ("n", "p"))
    perm = labels.swap_permutation({"slide_left": "slide_right"})
    assert perm == [1, 0, 2, 3]
    steps = torch.tensor([[0, 0, 2, 3], [1, 1, 2, 3]])
    flipped = flip_labels(steps, torch.tensor([True, False]), tuple(perm))
    assert flipped.tolist() == [[1, 1, 2, 3], [1, 1, 2, 3]]
    with pytest.raises(ValueError, match="no action label 'swipe_up'"):
        labels.swap_permutation({"swipe_up": "swipe_down"})


def test_augmented_clips_and_their_targets_stay_aligned() -> None:
    """The temporal window the frames get is the one the per-frame targets get; crops stay in the frame."""
    aug = Augment(clip_len=6, frame_size=(16, 16), jitter_frames=4, crop_margin=0.25, min_crop=0.8, flip=True)
    assert aug.decode_len == 10 and aug.decode_size == (20, 20)
    b = 8
    # Every pixel of frame t holds the value 10 * t: after any crop or flip, a frame still says its index.
    frames = (
        (10 * torch.arange(10)).view(1, 10, 1, 1, 1).expand(b, 10, 20, 20, 3).to(torch.uint8).contiguous()
    )
    steps = torch.arange(10).expand(b, 10)
    out, views = augment(frames, aug, torch.Generator().manual_seed(0))
    assert out.shape == (b, 6, 16, 16, 3)
    window = temporal_crop(steps, views.offsets, 6)
    assert torch.allclose(out[:, :, 8, 8, 0], 10.0 * window, atol=1e-3)
    assert len(set(views.offsets.tolist())) > 1 and 0 < int(views.flipped.sum()) < b


def test_full_frame_crop_is_identity_and_flip_mirrors() -> None:
    image = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4, 1).expand(1, 1, 4, 4, 3).contiguous()
    whole, centre = torch.ones(1, 2), torch.zeros(1, 2)
    same = crop_resize(image, whole, centre, torch.tensor([False]), (4, 4))
    assert torch.equal(same, image.float())
    mirrored = crop_resize(image, whole, centre, torch.tensor([True]), (4, 4))
    assert torch.equal(mirrored, image.flip(3).float())


def test_a_manifest_has_the_heads_its_columns_label(tmp_path, manifest_uri: str) -> None:
    table = pq.read_table(manifest_uri)
    pq.write_table(table.select(["file", "category"]), tmp_path / "category.parquet")
    manifest = fl.read_manifest(str(tmp_path / "category.parquet"))
    assert manifest.heads == ("category",)
    assert manifest.labels.actions == () and manifest.labels.sentiments == ()
    video = manifest.videos["video_00000.mp4"]
    assert video.has("category") and not video.has("action") and video.actions is None

    # Actions on half the videos: the others have no action ground truth (null), not "no actions".
    rows = table.select(["file", "actions"]).to_pylist()
    for row in rows[::2]:
        row["actions"] = None
    rows[1]["actions"] = []
    pq.write_table(
        pa.Table.from_pylist(rows, schema=fl.manifest_schema(["actions"])), tmp_path / "half.parquet"
    )
    manifest = fl.read_manifest(str(tmp_path / "half.parquet"))
    assert manifest.heads == ("action",)
    assert not manifest.videos["video_00000.mp4"].has("action")
    assert manifest.videos["video_00001.mp4"].actions == ()


def test_videos_without_a_label_get_targets_the_losses_ignore() -> None:
    labels = fl.LabelSet(("a", "b"), ("slide", fl.BACKGROUND), ())
    times = fl.frame_times(0.0, 1.0, 5)
    unlabelled = fl.VideoLabels("u.mp4", category="a")
    actions, importance = fl.step_targets(unlabelled, times, labels)
    assert (actions == fl.IGNORE).all() and np.isnan(importance).all()
    assert fl.clip_action(actions, labels.background) == fl.IGNORE
    no_actions = fl.VideoLabels("n.mp4", actions=(), highlights=())
    actions, importance = fl.step_targets(no_actions, times, labels)
    assert (actions == labels.background).all() and (importance == 0).all()
    batch = np.stack([fl.step_targets(unlabelled, times, labels)[0], actions])
    assert fl.clip_action(batch, labels.background).tolist() == [fl.IGNORE, labels.background]


def test_importance_scores_become_per_frame_targets_in_0_1() -> None:
    # TVSum-style: a score per source frame at 2 fps, scaled per video from its 1-5 range to [0, 1].
    video = fl.VideoLabels("t.mp4", importance=(1.0, 3.0, 5.0, 5.0), importance_fps=2.0)
    _, importance = fl.step_targets(video, np.array([0.0, 0.5, 1.0, 1.5, 9.0]), fl.LabelSet())
    np.testing.assert_allclose(importance, [0.0, 0.5, 1.0, 1.0, 1.0])


def test_bad_split_and_window_cells_name_the_row(tmp_path) -> None:
    rows = [{"file": "a.mp4", "category": "x", "split": "training"}]
    fl.write_manifest(str(tmp_path / "split.parquet"), rows, ["category", "split"])
    with pytest.raises(
        ValueError, match=r"row 0 \(a.mp4\): split 'training' must be one of train, val, test"
    ):
        fl.read_manifest(str(tmp_path / "split.parquet"))
    rows = [{"file": "a.mp4", "category": "x", "window_start_s": 5.0, "window_end_s": 2.0}]
    fl.write_manifest(str(tmp_path / "window.parquet"), rows, ["category", "window_start_s", "window_end_s"])
    with pytest.raises(ValueError, match=r"row 0 \(a.mp4\): window_start_s 5.0 / window_end_s 2.0"):
        fl.read_manifest(str(tmp_path / "window.parquet"))
