"""Training on real labelled video as a new user would: a UCF101-style folder of real clips with its split
lists is imported, trained with a category head only, evaluated on the official test split and tagged; and a
semi-labelled corpus trains and scores actions only where they exist."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows import labels as flabels
from flows import tables
from flows.aggregate import Segment, VideoSummary
from jobs import cli, tag, train
from jobs.config import load_config
from jobs.evaluate import score

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "demo.yaml"
TINY = (
    "data.clips_per_video=2",
    "data.val_clips_per_video=2",
    "data.batch_size=4",
    "data.shuffle_buffer=8",
    "optim.epochs=1",
    "model.kwargs={channels: [8, 16, 16, 32], hidden: 32}",
)
# Two classes of real clips from ../shared/videos (MANIFEST.tsv): cartoon footage and camera footage.
CLASSES = {
    "Cartoon": [
        "testdata/Big_Buck_Bunny_180_10s.webm",
        "moviepy/big_buck_bunny_432_433.webm",
        "media/bbb_176x144_192kbps_15fps_mpeg4.mp4",
    ],
    "Camera": ["mmaction2/test.avi", "decord/flipping_a_pancake.mkv", "mmaction2/test.mp4"],
}


def ucf101_tree(shared_videos: Path, root: Path) -> tuple[list[str], list[str]]:
    """A UCF101-layout corpus (Class/v_Class_gNN_c01.ext, classInd.txt, trainlist01/testlist01): the last
    video of each class is a test video. Returns (train files, test files)."""
    train_files, test_files = [], []
    for name, sources in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i, source in enumerate(sources):
            file = f"{name}/v_{name}_g{i + 1:02d}_c01{Path(source).suffix}"
            shutil.copy(shared_videos / source, root / file)
            (test_files if i == len(sources) - 1 else train_files).append(file)
    (root / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(CLASSES)))
    index = {n: i + 1 for i, n in enumerate(CLASSES)}
    (root / "trainlist01.txt").write_text("".join(f"{f} {index[f.split('/')[0]]}\n" for f in train_files))
    (root / "testlist01.txt").write_text("".join(f"{f}\n" for f in test_files))
    return train_files, test_files


@pytest.fixture(scope="module")
def ucf101_run(shared_videos, ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf101")
    corpus = root / "UCF-101"
    train_files, test_files = ucf101_tree(shared_videos, corpus)
    assert cli.main(["import-labels", "ucf101", str(corpus), "--corpus", str(corpus)]) == 0
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    overrides = [
        f"corpus={corpus}", f"storage={root / 'runs'}", "run_name=ucf101",
        f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=ucf101", "model.registered_name=ucf101",
        *TINY,
    ]  # fmt: skip
    config = load_config(train.TrainConfig, DEMO, overrides)  # the demo config: every task asked for
    result = train.main(config)
    tables_uri = str(root / "tables")
    tag.main(tag.TagConfig(corpus=str(corpus), models=(result.model_uri,), tables=tables_uri,
                           date="2026-12-05", tracking_uri=tracking_uri))  # fmt: skip
    return corpus, train_files, test_files, result, tables_uri


def test_ucf101_folder_imports_trains_a_category_head_evaluates_on_its_test_split_and_tags(ucf101_run):
    corpus, train_files, test_files, result, tables_uri = ucf101_run
    manifest = pq.read_table(corpus / flabels.LABELS_FILE)
    assert set(manifest.column_names) == {"file", "category", "split"}
    rows = {r["file"]: r for r in manifest.to_pylist()}
    assert {f for f, r in rows.items() if r["split"] == "test"} == set(test_files)
    assert {f for f, r in rows.items() if r["split"] == "train"} == set(train_files)
    assert all(r["category"] == f.split("/")[0] for f, r in rows.items())

    # Validation is carved from the train split; the official test split is what is evaluated.
    assert set(result.val_files) < set(train_files)
    assert set(result.eval_files) == set(test_files)
    for key in ("category_top1", "category_top5", "category_mean_class_accuracy"):
        assert 0.0 <= result.evaluation[key] <= 1.0, key
    assert result.evaluation["category_top5"] == 1.0  # two classes: the truth is always in the top 5
    assert result.evaluation["videos_scored"] == len(test_files)
    for absent in ("action_f1", "sentiment_accuracy", "valence_mae", "highlight_f1"):
        assert absent not in result.evaluation, absent  # no ground truth: not a number to log

    # The model has the category head only, and the night writes classifications and nothing else.
    classifications = tables.read_table(tables_uri, "classifications").to_pylist()
    assert {r["head"] for r in classifications} == {"category"}
    assert {r["label"] for r in classifications} == set(CLASSES)
    assert {r["uri"].rsplit("/", 1)[-1] for r in classifications} == {
        f.rsplit("/", 1)[-1] for f in train_files + test_files
    }
    for name in ("actions", "sentiment", "highlights"):
        table = tables.open_table(tables_uri, name)
        assert table is None or tables.read_table(tables_uri, name).num_rows == 0, name


def test_a_semi_labelled_corpus_trains_and_scores_actions_only_where_they_exist(
    small_corpus, ray_session, tmp_path
):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    full = pq.read_table(corpus / flabels.LABELS_FILE)
    rows = full.select(["file", "category", "actions"]).to_pylist()
    unlabelled = {r["file"] for r in rows[::2]}
    for row in rows:
        if row["file"] in unlabelled:
            row["actions"] = None
    flabels.write_manifest(str(corpus / flabels.LABELS_FILE), rows, ["category", "actions"])
    overrides = [
        f"corpus={corpus}", f"storage={tmp_path / 'runs'}", "run_name=semi",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.experiment=semi",
        "model.registered_name=semi", "mlflow.evaluate=false", *TINY,
    ]  # fmt: skip
    result = train.main(load_config(train.TrainConfig, DEMO, overrides))
    # Sentiment, valence and importance have no labels: left out; category and actions train.
    for key in ("val_category_top1", "val_action_top1", "val_action_steps_accuracy"):
        assert 0.0 <= result.metrics[key] <= 1.0, key
    for key in ("val_sentiment_top1", "val_valence_mae", "val_importance_mae", "train_loss_sentiment"):
        assert key not in result.metrics, key
    assert all(math.isfinite(v) for v in result.metrics.values())  # unlabelled clips add no NaN loss

    # Scoring: a video without action ground truth adds neither misses nor false positives.
    manifest = flabels.read_manifest(str(corpus / flabels.LABELS_FILE))
    labelled = next(f for f in manifest.videos if f not in unlabelled and manifest.videos[f].actions)
    other = next(iter(unlabelled))
    truth = [Segment(s, e, label) for label, s, e in manifest.videos[labelled].actions]
    summaries = {labelled: VideoSummary(actions=truth), other: VideoSummary(actions=[Segment(0.0, 1.0, "x")])}
    heads = {"action": manifest.labels.actions}
    metrics = score(summaries, manifest, heads, {labelled: 10.0, other: 10.0})
    assert metrics["action_f1"] == 1.0 and metrics["action_map"] == 1.0
    assert metrics["category_top1"] is None and metrics["sentiment_accuracy"] is None


def test_kinetics_windows_and_splits_reach_the_training_plan(small_corpus, tmp_path):
    from jobs.train.plan import plan_run

    files = sorted(
        pq.read_table(small_corpus / flabels.LABELS_FILE, columns=["file"]).column("file").to_pylist()
    )
    splits = ["test", "val", *["train"] * (len(files) - 2)]
    rows = [{"file": f, "category": f"c{i % 2}", "split": s, "window_start_s": 0.5, "window_end_s": 1.5}
            for i, (f, s) in enumerate(zip(files, splits, strict=True))]  # fmt: skip
    labels = tmp_path / "kinetics.parquet"
    flabels.write_manifest(str(labels), rows, ["category", "split", "window_start_s", "window_end_s"])
    overrides = [f"corpus={small_corpus}", f"data.labels={labels}", f"storage={tmp_path}", *TINY]
    plan = plan_run(load_config(train.TrainConfig, DEMO, overrides))
    assert plan.dropped_tasks == ("action", "action_steps", "sentiment", "valence", "importance")
    assert list(plan.heads) == ["category"]
    assert {r.window_s for r in (*plan.train_rows, *plan.val_rows)} == {(0.5, 1.5)}
    assert plan.eval_files == [files[0]]  # the test split; val and test are never trained or validated on
    assert not {files[0], files[1]} & {*plan.train_files, *plan.val_files}


def test_tvsum_scores_are_evaluated_against_their_own_knapsack_summary():
    from jobs.evaluate import true_highlights

    fps, seconds = 10.0, 20.0
    times = np.arange(int(fps * seconds)) / fps
    scores = 1.0 + 4.0 * np.exp(-(((times - 6.0) / 1.5) ** 2))  # annotators liked the moment around 6 s
    video = flabels.VideoLabels("t.mp4", importance=tuple(scores), importance_fps=fps)
    truth = true_highlights(video, seconds, budget=0.15)
    assert truth and sum(e - s for s, e in truth) <= 0.15 * seconds + 1e-9
    assert all(s < 6.0 + 3.0 and e > 6.0 - 3.0 for s, e in truth)
    manifest = flabels.Manifest("m", {"t.mp4": video}, flabels.LabelSet(), ("importance", "importance_fps"))
    heads = {"importance": ()}
    right = VideoSummary(importance=(times, flabels.scaled_importance(scores)))
    wrong = VideoSummary(importance=(times, 1.0 - flabels.scaled_importance(scores)))
    assert score({"t.mp4": right}, manifest, heads, {"t.mp4": seconds})["highlight_f1"] == 1.0
    assert score({"t.mp4": wrong}, manifest, heads, {"t.mp4": seconds})["highlight_f1"] < 0.2


def test_mean_class_accuracy_weighs_every_class_alike_where_top1_weighs_videos():
    videos = {
        f: flabels.VideoLabels(f, category=c) for f, c in [("1", "a"), ("2", "a"), ("3", "a"), ("4", "b")]
    }
    manifest = flabels.Manifest("m", videos, flabels.LabelSet(categories=("a", "b")), ("category",))
    says_a = VideoSummary(classes={"category": np.array([0.9, 0.1])})
    metrics = score(dict.fromkeys(videos, says_a), manifest, {"category": ("a", "b")}, {})
    assert metrics["category_top1"] == 0.75  # three of four videos
    assert metrics["category_mean_class_accuracy"] == 0.5  # class a all right, class b all wrong
    assert metrics["category_top5"] == 1.0
    assert metrics["action_f1"] is None and metrics["highlight_f1"] is None
