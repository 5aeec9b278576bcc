"""`reelflow bench train`: training throughput through Ray Train against a plain PyTorch loop.

Both sides run the training job's own step (`jobs.train.loop.train_epoch`: augmentation, multi-task losses,
optimizer step) on the same model (the one `config` names, by default the demo's) over the same
pre-decoded clips, with the same total number of torch threads:
- plain: one process, `workers × threads` threads, batches sliced from numpy arrays in memory;
- Ray Train: `TorchTrainer` with `workers` workers of `threads` threads each (DDP over gloo, or NCCL on
  GPUs), fed by `get_dataset_shard` / `iter_torch_batches` from the clips materialized in Ray's object store.
Start-up is excluded on both sides: the first `warmup_epochs` are not timed, and Ray Train workers meet at a
barrier before and after each timed epoch. The ratio Ray Train / plain is what distribution costs here
(target ≥ 0.8).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows import labels as flabels
from jobs import benchmarks
from jobs.config import load_config
from jobs.runtime import console, init_ray
from jobs.train import loop as train_loop
from jobs.train import plan as train_plan
from jobs.train.batches import collate
from jobs.train.config import TrainConfig

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
# The generated corpus's classes (jobs.make_corpus): the heads have the demo model's sizes.
LABELS = flabels.LabelSet(
    categories=("ball_sports", "cooking", "music", "nature", "traffic"),
    actions=("bounce", "shake", "slide", "spin", flabels.BACKGROUND),
    sentiments=("negative", "neutral", "positive"),
)


@dataclass(frozen=True)
class BenchTrainConfig:
    """What to time: the model and batch of the training `config` file, `clips` synthetic decoded clips."""

    config: str = str(DEMO_CONFIG)
    clips: int = 1024  # per epoch; at 256 the per-epoch iterator start-up and barriers weigh 0.1 of the ratio
    workers: int = 2
    threads: int = 1  # torch threads per Ray Train worker; the plain loop gets workers × threads
    warmup_epochs: int = 1
    epochs: int = 2
    use_gpu: bool = False
    record: bool = True

    def __post_init__(self) -> None:
        for name in ("clips", "workers", "threads", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench train: {name}={getattr(self, name)} must be >= 1")
        if self.warmup_epochs < 0:
            raise ValueError(f"bench train: warmup_epochs={self.warmup_epochs} must be >= 0")


@dataclass(frozen=True)
class Measurement:
    name: str
    clips: int
    seconds: float

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds


def main(config: BenchTrainConfig) -> dict[str, Measurement]:
    """Time both loops, print the ratio and append it to BENCHMARKS.md."""
    job = job_config(config)
    aug = train_plan.augmentation(job, LABELS)
    clips = synthetic_clips(config.clips, aug, job.model.fps, seed=0)
    console.print(
        f"bench train: {job.model.name}:{job.model.backbone}, {config.clips} clips of "
        f"{aug.decode_len}×{aug.decode_size[0]}×{aug.decode_size[1]}, batch {job.data.batch_size}"
    )
    load_before = os.getloadavg()[0]
    plain = measure_plain(job, aug, clips, config, config.workers * config.threads)
    console.print(f"plain loop: {plain.clips_per_s:.1f} clips/s")
    # Also one worker's share of the machine alone: how well the workers scale, not only the total.
    single = measure_plain(job, aug, clips, config, config.threads)
    ray_train = measure_ray_train(job, aug, clips, config)
    console.print(f"Ray Train: {ray_train.clips_per_s:.1f} clips/s")
    # Other processes on the machine slow every figure down (threads that wait for a core most): say how busy.
    _report(plain, single, ray_train, job, config, (load_before, os.getloadavg()[0]))
    return {"plain": plain, "plain_one_worker": single, "ray_train": ray_train}


def job_config(config: BenchTrainConfig) -> TrainConfig:
    """The training config with the bench's scaling (the corpus is not read)."""
    job = load_config(TrainConfig, config.config, ["corpus=unused"])
    scaling = replace(
        job.scaling, num_workers=config.workers, torch_threads=config.threads, use_gpu=config.use_gpu
    )
    # The plain loop sees every clip once per epoch; so does the union of the Ray Train shards.
    data = replace(job.data, shuffle_buffer=min(job.data.shuffle_buffer, config.clips // config.workers))
    return replace(job, scaling=scaling, data=data)


def synthetic_clips(n: int, aug: Any, fps: float, seed: int) -> dict[str, np.ndarray]:
    """`n` decoded clips (uint8 frames at the augmentation's decode size) with per-frame targets.

    Throughput does not depend on pixel values, so random frames stand in for decoded video.
    """
    rng = np.random.default_rng(seed)
    length, (h, w) = aug.decode_len, aug.decode_size
    actions = rng.integers(0, len(LABELS.actions), (n, 1)).repeat(length, axis=1)
    return {
        "frames": rng.integers(0, 256, (n, length, h, w, 3), dtype=np.uint8),
        "category": rng.integers(0, len(LABELS.categories), n),
        "sentiment": rng.integers(0, len(LABELS.sentiments), n),
        "valence": rng.uniform(-1, 1, n).astype(np.float32),
        "action_steps": actions.astype(np.int64),
        "importance_steps": (rng.random((n, length)) < 0.3).astype(np.float32),
    }


def model_heads(job: TrainConfig) -> dict[str, tuple[str, ...]]:
    return train_plan.model_heads(job, LABELS)


# --- plain PyTorch: one process ---------------------------------------------------------------------


def _numpy_batches(clips: dict[str, np.ndarray], batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    order = np.random.default_rng(seed).permutation(len(clips["frames"]))
    for start in range(0, len(order) - batch_size + 1, batch_size):  # drop_last, as in training
        index = np.sort(order[start : start + batch_size])
        yield collate({k: v[index] for k, v in clips.items()})


def measure_plain(
    job: TrainConfig, aug: Any, clips: dict[str, np.ndarray], config: BenchTrainConfig, threads: int
) -> Measurement:
    """Throughput of `train_epoch` in this process with `threads` torch threads, over numpy batches."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = torch.device("cuda" if config.use_gpu else "cpu")
    try:
        model = train_plan.build_model(job, model_heads(job)).to(device)
        optimizer = train_loop.make_optimizer(model, job.optim)
        schedule = train_loop.Schedule(job.optim, max(1, config.clips // job.data.batch_size))
        state, generator = train_loop.TrainState(), torch.Generator().manual_seed(0)
        seconds = clips_done = 0.0
        for epoch in range(config.warmup_epochs + config.epochs):
            batches = _numpy_batches(clips, job.data.batch_size, seed=epoch)
            started = time.perf_counter()
            metrics = train_loop.train_epoch(
                model, optimizer, batches, job, LABELS, aug, schedule, state, device, generator, False
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            if epoch >= config.warmup_epochs:
                seconds += time.perf_counter() - started
                clips_done += metrics["train_clips"]
    finally:
        torch.set_num_threads(before)
    return Measurement(f"plain PyTorch loop, {threads} threads", int(clips_done), seconds)


# --- Ray Train: workers fed by Ray Data --------------------------------------------------------------


def _ray_loop(loop: dict[str, Any]) -> dict[str, float]:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    job: TrainConfig = loop["job"]
    config: BenchTrainConfig = loop["config"]
    torch.set_num_threads(config.threads)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(train_plan.build_model(job, loop["heads"]))
    module = getattr(model, "module", model)
    optimizer = train_loop.make_optimizer(module, job.optim)
    world = ray.train.get_context().get_world_size()
    schedule = train_loop.Schedule(job.optim, max(1, config.clips // (world * job.data.batch_size)))
    state, generator = train_loop.TrainState(), torch.Generator().manual_seed(rank)
    shard = ray.train.get_dataset_shard("train")
    seconds = clips_done = 0.0
    for epoch in range(config.warmup_epochs + config.epochs):
        batches = shard.iter_torch_batches(
            batch_size=job.data.batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=job.data.shuffle_buffer or None,
            local_shuffle_seed=epoch * 100 + rank,
            drop_last=True,
        )
        dist.barrier()
        started = time.perf_counter()
        metrics = train_loop.train_epoch(
            model, optimizer, batches, job, LABELS, loop["aug"], schedule, state, device, generator, False
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()  # the epoch ends when the slowest worker ends it
        if epoch >= config.warmup_epochs:
            seconds += time.perf_counter() - started
            clips_done += metrics["train_clips"]
    total = torch.tensor([clips_done], dtype=torch.float64)
    dist.all_reduce(total)
    return {"clips": float(total.item()), "seconds": seconds}


def measure_ray_train(
    job: TrainConfig, aug: Any, clips: dict[str, np.ndarray], config: BenchTrainConfig
) -> Measurement:
    """Throughput of `train_epoch` in `config.workers` Ray Train workers, start-up not counted."""
    import tempfile

    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray()
    rows = [{k: v[i] for k, v in clips.items()} for i in range(len(clips["frames"]))]
    dataset = ray.data.from_items(rows).materialize()
    resources = {"CPU": job.scaling.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    with tempfile.TemporaryDirectory(prefix="reelflow-bench-train-") as storage:
        trainer = TorchTrainer(
            _ray_loop,
            train_loop_config={"job": job, "config": config, "aug": aug, "heads": model_heads(job)},
            torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(name="bench-train", storage_path=storage),
            datasets={"train": dataset},
        )
        out = trainer.fit().return_value
    return Measurement(
        f"Ray Train, {config.workers} workers × {config.threads} threads", int(out["clips"]), out["seconds"]
    )


def _report(
    plain: Measurement,
    single: Measurement,
    ray_train: Measurement,
    job: TrainConfig,
    config: BenchTrainConfig,
    load: tuple[float, float],
) -> None:
    from rich.table import Table

    table = Table(title="bench train")
    lines = ["| loop | clips | seconds | clips/s |", "|---|---|---|---|"]
    for column in ("loop", "clips", "seconds", "clips/s"):
        table.add_column(column)
    for m in (plain, single, ray_train):
        cells = (m.name, str(m.clips), f"{m.seconds:.1f}", f"{m.clips_per_s:.1f}")
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    ratios = [
        f"Ray Train / plain loop ({plain.name}) = {ray_train.clips_per_s / plain.clips_per_s:.2f} "
        "(target ≥ 0.8)",
        f"scaling: Ray Train / ({config.workers} × {single.name}) = "
        f"{ray_train.clips_per_s / (config.workers * single.clips_per_s):.2f}",
        f"load average {load[0]:.1f} before, {load[1]:.1f} after (on {os.cpu_count()} cores)",
    ]
    console.print(table)
    for line in ratios:
        console.print(line)
    if config.record:
        model = f"{job.model.name}:{job.model.backbone} {job.model.kwargs}"
        setup = (
            f"Model {model} at {job.model.clip_len}×{job.model.frame_size[0]}×{job.model.frame_size[1]}, "
            f"batch {job.data.batch_size} per step, {config.clips} pre-decoded clips, "
            f"{config.epochs} timed epochs after {config.warmup_epochs} untimed; "
            f"{'GPU' if config.use_gpu else 'CPU, fp32'}."
        )
        benchmarks.record(
            "Training (`reelflow bench train`)",
            "\n".join([setup, "", *lines, "", *[f"- {r}" for r in ratios]]),
        )
