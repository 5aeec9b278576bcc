"""Where clips are predicted: inside the decode tasks on CPU (models loaded once per worker process), an actor
pool with GPUs, and the same outputs either way."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
import torch
from ray.data.extensions import ArrowTensorArray

from flows.predict import (
    ClipPredictor,
    PredictConfig,
    ShippedModel,
    predict_clip_stream,
    process_predictor,
    warm_workers,
)
from models import build


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build("cnn_lstm", channels=(8, 16), hidden=32, clip_len=8, frame_size=(32, 32), dropout=0.0)
    return model.eval()


def _clip_tables(sizes: list[int], seed: int = 0) -> list[pa.Table]:
    """Clip tables as a decode task yields them: `sizes` clips each, ids and frames."""
    rng = np.random.default_rng(seed)
    tables, index = [], 0
    for size in sizes:
        frames = rng.integers(0, 255, (size, 8, 32, 32, 3), dtype=np.uint8)
        ids = [f"v{(index + i) // 5}" for i in range(size)]
        tables.append(pa.table({
            "video_id": pa.array(ids), "clip_index": pa.array(range(index, index + size), pa.int32()),
            "frames": ArrowTensorArray.from_numpy(frames),
        }))  # fmt: skip
        index += size
    return tables


def test_on_cpu_the_decode_tasks_predict_and_gpus_get_actors() -> None:
    assert PredictConfig(use_gpu=False).predicts_in_decode_tasks()
    assert not PredictConfig(use_gpu=True).predicts_in_decode_tasks()
    assert not PredictConfig(use_gpu=False, in_decode_tasks=False).predicts_in_decode_tasks()
    assert not PredictConfig(in_decode_tasks=True).runs_on_gpu()
    with pytest.raises(ValueError, match=r"^predict config: in_decode_tasks=True .*actor pool"):
        PredictConfig(in_decode_tasks=True, use_gpu=True)


def test_a_stream_of_clip_tables_is_predicted_in_batches_as_the_actors_would(ray_session: None) -> None:
    model = _model()
    tables = _clip_tables([8, 8, 3, 8, 5])  # a decode task's output: 8 clips a table, fewer at a video's end
    batches = list(predict_clip_stream(iter(tables), [ShippedModel.put(model)], batch_size=12))
    assert [len(b["video_id"]) for b in batches] == [12, 12, 8]  # batch_size clips at a time, then the rest
    got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert "frames" not in got and list(got["clip_index"]) == list(range(32))

    whole = pa.concat_tables(tables)
    expected = ClipPredictor([lambda: _model()])(
        {"video_id": np.array(whole["video_id"]), "frames": whole["frames"].combine_chunks().to_numpy()}
    )
    for column in ("m0.category", "m0.action", "m0.action_steps"):
        if column in expected:
            np.testing.assert_allclose(got[column], expected[column], atol=1e-5)
    assert set(expected) - {"predicted_at"} <= set(got)


def test_a_task_with_no_clips_loads_no_model() -> None:
    def unreachable() -> torch.nn.Module:
        raise AssertionError("loaded models for a task that decoded nothing")

    empty: Iterator[pa.Table] = iter([])
    assert list(predict_clip_stream(empty, [unreachable], batch_size=4)) == []


def test_a_worker_process_keeps_the_models_it_loaded_until_others_come(ray_session: None) -> None:
    first, second = ShippedModel.put(_model(0)), ShippedModel.put(_model(1))
    predictor = process_predictor([first])
    assert process_predictor([ShippedModel(first.ref)]) is predictor  # the next task: same reference
    other = process_predictor([second])
    assert other is not predictor and process_predictor([second]) is other
    assert process_predictor([first]) is not predictor  # only the latest models stay
    calls = []

    def loader() -> torch.nn.Module:  # without a key, nothing tells two calls' models apart: no caching
        calls.append(1)
        return _model()

    process_predictor([loader])
    process_predictor([loader])
    assert len(calls) == 2


def test_warmed_workers_hold_the_models_for_the_decode_tasks_after_them(ray_session: None) -> None:
    import ray

    from flows.clips import DECODE_TASK_CPUS

    shipped = ShippedModel.put(_model(2))
    ray.get(warm_workers([shipped], 2, DECODE_TASK_CPUS))  # both CPUs of the test cluster

    @ray.remote(num_cpus=DECODE_TASK_CPUS)
    def loaded_keys() -> tuple[str, ...] | None:
        from flows import predict

        held = predict._process_predictor
        return held[0] if held else None

    # The next tasks, as a decode task would, take a worker idle last: one that loaded the models.
    assert ray.get([loaded_keys.remote() for _ in range(2)]) == [(shipped.key,)] * 2
