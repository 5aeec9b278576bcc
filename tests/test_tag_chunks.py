"""A night in chunks: commit sizes (`--commit-every`, `--commit-minutes`, `--max-videos`), a chunk lost to the
cluster run again, and the prediction times the chunk writers report."""

from __future__ import annotations

import pyarrow as pa
import pytest
from test_tag import _config

from flows import storage, tables
from jobs import tag


def test_a_chunk_lost_to_the_cluster_runs_again_and_a_failing_one_does_not(
    ray_session, local_corpus, tagging_model, tmp_path, monkeypatch, capsys
):
    from ray.exceptions import WorkerCrashedError

    real, calls = tag.tag_chunk, []

    def loses_the_first_attempt(*args, **kwargs):
        calls.append(kwargs["errors_uri"])
        if len(calls) == 1:
            storage.makedirs(kwargs["errors_uri"])  # what the lost attempt left in scratch
            raise WorkerCrashedError()
        return real(*args, **kwargs)

    monkeypatch.setattr(tag, "tag_chunk", loses_the_first_attempt)
    summary = tag.main(_config(str(local_corpus), str(tmp_path / "t"), tagging_model))
    assert len(calls) == 2 and "starting it again" in capsys.readouterr().err
    assert (summary.chunks, summary.tagged, summary.failed) == (1, 6, 2)
    assert tables.read_snapshot(str(tmp_path / "t")).chunk == 1

    def fails(*args, **kwargs):
        calls.append(kwargs["errors_uri"])
        raise ValueError("a bug in the chunk's code")

    monkeypatch.setattr(tag, "tag_chunk", fails)
    with pytest.raises(ValueError, match="a bug"):
        tag.main(_config(str(local_corpus), str(tmp_path / "u"), tagging_model))
    assert len(calls) == 3  # not run again


def test_chunks_hold_commit_every_videos_across_parts_and_the_night_is_capped():
    from jobs.tag.plan import NightPlan, Part

    plan = NightPlan([Part("a", 4), Part("b", 1), Part("c", 5)], listed=12, retried=0)
    sizes = [[(p.path, p.offset, p.videos) for p in chunk] for chunk in plan.chunks(3)]
    assert sizes == [[("a", 0, 3)], [("a", 3, 1), ("b", 0, 1), ("c", 0, 1)], [("c", 1, 3)], [("c", 4, 1)]]
    assert [sum(p.videos for p in c) for c in plan.chunks(4, max_videos=6)] == [4, 2]
    assert (plan.todo, plan.skipped) == (10, 2)


def test_max_videos_caps_a_night_and_the_next_night_continues(
    ray_session, local_corpus, tagging_model, tmp_path
):
    tables_uri = str(tmp_path / "tables")
    first = tag.main(_config(str(local_corpus), tables_uri, tagging_model, max_videos=3))
    assert (first.decoded, first.listed, first.skipped) == (3, 8, 0)
    second = tag.main(_config(str(local_corpus), tables_uri, tagging_model, date="2024-05-02"))
    assert (second.decoded, second.skipped) == (5, 3)
    assert tables.read_table(tables_uri, "videos").num_rows == 8


def test_commit_minutes_sizes_the_next_chunks_by_the_measured_rate(
    ray_session, local_corpus, tagging_model, tmp_path
):
    tables_uri = str(tmp_path / "tables")
    summary = tag.main(
        _config(str(local_corpus), tables_uri, tagging_model, commit_every=4, commit_minutes=1e-4)
    )
    # The first chunk is commit_every videos; at seconds a video, a 6 ms budget makes the next ones 1 each.
    assert (summary.chunks, summary.decoded) == (5, 8)
    assert tables.read_table(tables_uri, "videos").num_rows == 8


def test_prediction_times_of_the_writers_blocks_give_the_nights_first_batch_and_last():
    from flows.inference import PredictionTimes

    block = PredictionTimes.of(pa.table({"predicted_at": [2.0, 2.0, 3.0, 2.5]}))
    assert block == PredictionTimes(2.0, 2, 3.0)
    assert PredictionTimes.of(pa.table({"predicted_at": pa.array([], pa.float64())})) is None
    assert block.merged(PredictionTimes(1.0, 4, 1.5)) == PredictionTimes(1.0, 4, 3.0)
    assert block.merged(PredictionTimes(2.0, 3, 2.2)) == PredictionTimes(2.0, 5, 3.0)  # one batch, two blocks
