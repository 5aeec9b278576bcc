"""`reelflow bench tag`: the nightly job end to end against its two limits, and the cost of a quiet night.

Measured in one run over one generated corpus and one registered model (the demo's multitask CNN-LSTM;
throughput does not depend on its weights):
- decode limit: the clip dataflow alone (`flows.clips`, the tag job's sliding windows) on every core;
- model compute limit: plain PyTorch loops over the same clips, already decoded, with the model fused for
  inference as the tag job's actors run it (the best of one thread, every core, and a single-threaded
  process per core);
- end to end: `reelflow tag` into empty tables (listing, decoding, the actor pool, aggregation, the
  commit and the MLflow run included), clips/s over the job's wall time;
- time to first prediction: from the job's start to its first predicted batch;
- re-run: the same command again with no new videos, relative to the full run's wall time;
- commit cost: the full run's time in the commit protocol (lease, fencing, the run log, the Delta commits
  of every table), relative to its wall time;
- on CPU, the same night with an inference actor pool (`in_decode_tasks=False`), the placement GPUs get.
The ratio end-to-end / min(decode limit, model limit) has a target of ≥ 0.7, the re-run cost ≤ 0.05, the
commit cost ≤ 0.02.

That target assumes the two stages run on different hardware (decoding on CPUs, inference on GPUs). Where
they share the same cores (no GPU), each clip costs the cores its decoding plus its inference, so no
pipeline beats the joint limit 1 / (1/decode + 1/model); there the target is end to end ≥ 0.9 of it.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from flows.clips import clip_dataset, list_video_rows, video_dataset
from flows.inference import tagging_clip_config
from flows.predict import PredictConfig
from jobs import benchmarks, make_corpus, tag
from jobs.runtime import console, init_ray


@dataclass(frozen=True)
class BenchTagConfig:
    """The generated corpus, the model and how the tag job runs."""

    # 32 one-minute videos (~1,800 windows) per core, so that the job's fixed start-up (the actor pool and
    # the first batch: ~10 s on 2 cores) weighs about as it would on a night of real catalog, not as on a
    # toy run; more cores decode faster, so the corpus grows with them.
    videos: int = field(default_factory=lambda: 32 * (os.cpu_count() or 1))
    frame_size: int = 128
    duration_s: float = 60.0
    fps: int = 15
    clip_len: int = 16
    size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 128)
    hidden: int = 128
    predict: PredictConfig = field(default_factory=PredictConfig)
    corpus: str | None = None  # an existing corpus (folder or s3://) instead of a generated one
    record: bool = True
    compare_actors: bool = True  # on CPU, also time the night with an inference actor pool

    def __post_init__(self) -> None:
        for name in ("videos", "frame_size", "fps", "clip_len", "size", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench tag: {name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class BenchTagResult:
    decode_clips_per_s: float
    model_clips_per_s: float
    end_to_end_clips_per_s: float
    full_s: float
    rerun_s: float
    clips: int
    startup_s: float
    steady_clips_per_s: float
    shared_cores: bool  # no GPU: decoding and inference take turns on the same cores
    commit_s: float = 0.0
    chunks: int = 1
    first_prediction_s: float = 0.0  # from the job's start
    actors_s: float | None = None  # the night with an actor pool instead (CPU)
    actors_first_prediction_s: float | None = None

    @property
    def limit(self) -> float:
        return min(self.decode_clips_per_s, self.model_clips_per_s)

    @property
    def joint_limit(self) -> float:
        if not self.shared_cores:
            return self.limit
        return 1 / (1 / self.decode_clips_per_s + 1 / self.model_clips_per_s)

    @property
    def joint_ratio(self) -> float:
        return self.end_to_end_clips_per_s / self.joint_limit

    @property
    def ratio(self) -> float:
        return self.end_to_end_clips_per_s / self.limit

    @property
    def steady_ratio(self) -> float:
        return self.steady_clips_per_s / self.limit

    @property
    def rerun_cost(self) -> float:
        return self.rerun_s / self.full_s

    @property
    def commit_cost(self) -> float:
        return self.commit_s / self.full_s


def main(config: BenchTagConfig) -> BenchTagResult:
    """Run the four measurements, print them and (with `record`) append them to BENCHMARKS.md."""
    with tempfile.TemporaryDirectory(prefix="reelflow-bench-tag-") as tmp:
        root = Path(tmp)
        corpus = config.corpus or str(root / "corpus")
        if not config.corpus:
            make_corpus.main(
                make_corpus.CorpusConfig(
                    out=corpus, videos=config.videos, seed=5, size=config.frame_size,
                    duration_s=config.duration_s, fps=config.fps, subtitle_fraction=0.0,
                )
            )  # fmt: skip
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        model_uri, model = _register_model(config, tracking_uri)
        clip_config = tagging_clip_config([model.spec], None)
        init_ray()

        # Warm-up, not measured: Ray workers, decoder processes and imports start once per session.
        rows = list_video_rows(corpus)
        _decode(rows[:2], clip_config, str(root / "warm-errors"))
        frames, decode_s = benchmarks.timed(_decode, rows, clip_config, str(root / "errors"))
        decode = len(frames) / decode_s
        model_rate = _model_limit(model, frames, config.predict.batch_size)

        tag_config = tag.TagConfig(
            corpus=corpus, models=(model_uri,), tables=str(root / "tables"), date="2024-05-01",
            tracking_uri=tracking_uri, predict=config.predict,
        )  # fmt: skip
        full, full_s = benchmarks.timed(tag.main, tag_config)
        _, rerun_s = benchmarks.timed(tag.main, tag_config)
        actors = None
        if config.compare_actors and config.predict.predicts_in_decode_tasks():
            pool = replace(config.predict, in_decode_tasks=False)
            actors_config = replace(tag_config, tables=str(root / "tables-actors"), predict=pool)
            actors = benchmarks.timed(tag.main, actors_config)
    result = BenchTagResult(
        decode,
        model_rate,
        full.clips / full_s,
        full_s,
        rerun_s,
        full.clips,
        full.startup_s,
        full.steady_clips_per_s,
        shared_cores=not config.predict.runs_on_gpu(),
        commit_s=full.commit_s,
        chunks=full.chunks,
        first_prediction_s=full.first_prediction_s,
        actors_s=actors[1] if actors else None,
        actors_first_prediction_s=actors[0].first_prediction_s if actors else None,
    )
    _report(result, config)
    return result


def _register_model(config: BenchTagConfig, tracking_uri: str) -> tuple[str, Any]:
    from jobs import tracking
    from models import build

    heads = {"category": ["a", "b", "c", "d", "e", "f"], "action": ["bounce", "shake", "slide", "none"],
             "sentiment": ["negative", "neutral", "positive"], "valence": [], "importance": []}  # fmt: skip
    model = build(
        "multitask", backbone="cnn_lstm", heads=heads, step_heads=["action"], clip_len=config.clip_len,
        frame_size=[config.size, config.size], fps=float(config.fps), channels=list(config.channels),
        hidden=config.hidden,
    ).eval()  # fmt: skip
    run_id = tracking.get_or_create_run("bench-tag", "bench-tag", "bench-tag", tracking_uri=tracking_uri)
    uri = tracking.log_model(
        model, model.spec, "bench-tagger", None, run_id=run_id, tracking_uri=tracking_uri
    )
    tracking.finish_run(run_id, tracking_uri=tracking_uri)
    return uri, model


def _decode(rows: list, clip_config: Any, errors: str) -> list[np.ndarray]:
    """Every window's frames through the clip dataflow alone (the decode limit)."""
    dataset = clip_dataset(video_dataset(rows), clip_config, errors)
    out: list[np.ndarray] = []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        out.extend(batch["frames"])
    return out


def _model_limit(model: Any, frames: list[np.ndarray], batch_size: int) -> float:
    """Clips/s of plain inference loops over decoded clips: the best of one process on one thread, one
    process on every core, and one single-threaded process per core (how the tag job's CPU actors
    run), so the limit is never understated."""
    import torch

    from models import fuse_for_inference

    model = fuse_for_inference(copy.deepcopy(model).eval())  # as the tag job's actors run it
    batches = [np.stack(frames[i : i + batch_size]) for i in range(0, len(frames), batch_size)]
    threads = torch.get_num_threads()
    best = 0.0
    try:
        for n in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(n)
            best = max(best, len(frames) / _timed_inference(model, batches))
    finally:
        torch.set_num_threads(threads)
    processes = os.cpu_count() or 1
    if processes > 1:
        best = max(best, _per_core_inference(model, batches, processes))
    return best


def _timed_inference(model: Any, batches: list[np.ndarray]) -> float:
    """Seconds for one pass of `model` over `batches` (after one warm-up batch)."""
    import torch

    with torch.inference_mode():
        model(model.spec.prepare(batches[0]))
        started = time.perf_counter()
        for batch in batches:
            model(model.spec.prepare(batch))
        return time.perf_counter() - started


def _per_core_inference(model: Any, batches: list[np.ndarray], processes: int) -> float:
    """Clips/s of `processes` single-threaded processes, each over its share of the batches, started
    together (the slowest one sets the time)."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_inference_process, args=(model, batches[i::processes], barrier, results))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    seconds = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(len(batch) for batch in batches) / max(seconds)


def _inference_process(model: Any, batches: list[np.ndarray], barrier: Any, results: Any) -> None:
    import torch

    torch.set_num_threads(1)
    with torch.inference_mode():
        model(model.spec.prepare(batches[0]))
    barrier.wait()
    results.put(_timed_inference(model, batches))


def _report(result: BenchTagResult, config: BenchTagConfig) -> None:
    limit = result.limit
    where = "in the decode tasks" if config.predict.predicts_in_decode_tasks() else "in an actor pool"
    lines = [
        "| measurement | clips/s |",
        "|---|---|",
        f"| decode limit (clip dataflow alone, every core) | {result.decode_clips_per_s:.1f} |",
        f"| model compute limit (plain torch loops, the model fused as the tag job runs it, batch "
        f"{config.predict.batch_size}: 1 thread, all threads "
        f"or a 1-thread process per core) | "
        f"{result.model_clips_per_s:.1f} |",
        f"| end to end (`reelflow tag`, predicting {where}, {result.clips} clips in {result.full_s:.1f} s) | "
        f"{result.end_to_end_clips_per_s:.1f} |",
        f"| end to end after start-up (first predictions {result.first_prediction_s:.1f} s into the job, "
        f"{result.startup_s:.1f} s after inference started) | "
        f"{result.steady_clips_per_s:.1f} |",
        *(
            [
                f"| end to end with an inference actor pool (`--actors`; first predictions "
                f"{result.actors_first_prediction_s:.1f} s into the job, {result.actors_s:.1f} s) | "
                f"{result.clips / result.actors_s:.1f} |"
            ]
            if result.actors_s and result.actors_first_prediction_s is not None
            else []
        ),
    ]
    ratios = [
        f"end to end / min(decode, model) = {result.end_to_end_clips_per_s:.1f} / {limit:.1f} "
        f"= {result.ratio:.2f} (target ≥ 0.7 where inference has its own hardware); after start-up "
        f"{result.steady_ratio:.2f}",
        *(
            [
                f"decoding and inference share the cores (no GPU): joint limit 1 / (1/decode + 1/model) = "
                f"{result.joint_limit:.1f}; end to end / joint = {result.joint_ratio:.2f} (target ≥ 0.9), "
                f"after start-up {result.steady_clips_per_s / result.joint_limit:.2f}; the best any pipeline "
                f"can do against min(decode, model) here is joint / min = {result.joint_limit / limit:.2f}"
            ]
            if result.shared_cores
            else []
        ),
        f"time to first prediction: {result.first_prediction_s:.1f} s from the job's start "
        f"({result.startup_s:.1f} s after inference started)",
        *(
            [
                f"with an inference actor pool instead: end to end / joint = "
                f"{result.clips / result.actors_s / result.joint_limit:.2f}"
            ]
            if result.actors_s and result.shared_cores
            else []
        ),
        f"re-run with no new videos: {result.rerun_s:.2f} s / {result.full_s:.1f} s "
        f"= {result.rerun_cost:.3f} (target ≤ 0.05)",
        f"commit cost of the night ({result.chunks} chunk(s): lease, fencing, run log, Delta commits): "
        f"{result.commit_s:.2f} s / {result.full_s:.1f} s = {result.commit_cost:.4f} (target ≤ 0.02)",
    ]
    for line in lines[2:] + ratios:
        console.print(line)
    if config.record:
        videos = config.corpus or (
            f"generated {config.videos} videos, {config.frame_size}px, {config.duration_s:g} s "
            f"at {config.fps} fps"
        )
        corpus = f"{videos}; multitask CNN-LSTM at {config.size}×{config.size}, {config.clip_len} frames"
        body = "\n".join([f"Corpus: {corpus}.", "", *lines, "", *[f"- {r}" for r in ratios]])
        benchmarks.record("Tagging (`reelflow bench tag`)", body)
