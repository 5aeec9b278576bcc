"""Batch prediction: clip rows → per-clip outputs of every head of every model, in a Ray Data actor pool
or inside the decode tasks.

With GPUs, decoding (`flows.clips`, CPU tasks) and inference (a pool of actors that each load the models
once) are separate stages, so each scales on its own: more decode tasks on CPU nodes, one inference actor
per GPU. On CPU a separate stage gains nothing, and each actor costs a new worker process, its own torch
import and a copy of every clip through the object store: there `predict_clip_stream` runs inside the
decode tasks (`flows.clips.clip_dataset(..., then=...)`), with the models loaded once per worker process
(`process_predictor`), which Ray keeps for the next task.

Models come from `loaders`: picklable zero-argument callables that return a module with a `spec`
(the jobs ship the modules they resolved once: `ShippedModel.put(module)`), so this data plane never
imports the registry client itself. Output columns are named `m<i>.<head>` (model
index i in `loaders`): probabilities [K] for classification heads, per-frame probabilities [T, K] for
`<head>_steps`, a float for scalar heads (valence, importance). `predicted_at` is the wall-clock time a
batch was predicted, so that a job that gathers its rows only after a shuffle can still tell its start-up
from its steady rate.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

# Clip-row columns that only the models read; everything else passes through to the prediction rows.
INPUT_COLUMNS = ("frames", "audio", "text")
STEPS_SUFFIX = "_steps"
PREDICTED_AT = "predicted_at"

ModelLoader = Callable[[], Any]
CPU_ACTOR_CPUS = 0.1  # see DECODE_TASK_CPUS in flows.clips


def output_column(model_index: int, key: str) -> str:
    """The column holding model `model_index`'s output `key` (a head or `<head>_steps`)."""
    return f"m{model_index}.{key}"


@dataclass(frozen=True)
class PredictConfig:
    """How the inference stage runs.

    `in_decode_tasks`: predict inside the decode tasks (no actors; the default where inference runs on CPU)
    rather than in an actor pool (the default with GPUs; `False` asks for actors on CPU too). Fused, each
    decode task's process loads the models once and keeps them for its next tasks, running torch on
    `threads` (default 1) beside its decoder child.

    The actor pool: `use_gpu=None` uses GPU actors when the cluster has GPUs now; `True` requests GPUs
    whether or not a GPU node is up yet, so an autoscaler adds one. `concurrency` is the most actors (default:
    one per GPU, or `cpu_actors` on CPU, by default one per cluster CPU) and `min_actors` the fewest; Ray Data
    starts `min_actors` and adds more while the pool is busy. `num_cpus` is reserved per actor: by default 1
    for a GPU actor (to feed it) and 0.1 for a CPU actor, so that decode tasks (0.9 each) may take every core
    and the actors' torch `threads` (default 1) use what decoding leaves (Ray Data's backpressure pauses
    decoding while clips queue up), while no actor can be placed on a head that declares 0 CPUs.
    One single-threaded actor per core beats one actor with a thread per core (no intra-op barriers).
    `memory_gb` is reserved per actor for its models and batches; that resource shape, unlike the decode
    tasks', also keeps Ray Data from fusing decoding into the actors, so the two stages run (and scale)
    separately.
    """

    batch_size: int = 16
    in_decode_tasks: bool | None = None
    concurrency: int | None = None
    min_actors: int = 1
    use_gpu: bool | None = None
    num_cpus: float | None = None
    cpu_actors: int | None = None
    threads: int | None = None
    memory_gb: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("concurrency", self.concurrency is None or self.concurrency >= 1, "must be >= 1"),
            ("min_actors", self.min_actors >= 1, "must be >= 1"),
            (
                "min_actors",
                self.concurrency is None or self.min_actors <= self.concurrency,
                f"must be <= the most actors ({self.concurrency})",
            ),
            ("num_cpus", self.num_cpus is None or self.num_cpus >= 0, "must be >= 0"),
            ("cpu_actors", self.cpu_actors is None or self.cpu_actors >= 1, "must be >= 1"),
            ("threads", self.threads is None or self.threads >= 1, "must be >= 1"),
            ("memory_gb", self.memory_gb > 0, "must be > 0"),
            (
                "in_decode_tasks",
                not (self.in_decode_tasks and self.use_gpu),
                "predicts on the decode tasks' CPUs; GPUs (use_gpu=True) need the actor pool",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"predict config: {name}={getattr(self, name)!r} {why}")

    def runs_on_gpu(self) -> bool:
        """Whether the actors take GPUs: `use_gpu`, or when it is None, whether the cluster has any."""
        if self.in_decode_tasks:
            return False
        return cluster_has_gpus() if self.use_gpu is None else self.use_gpu

    def predicts_in_decode_tasks(self) -> bool:
        """Whether inference runs inside the decode tasks: `in_decode_tasks`, or when it is None, on CPU."""
        return not self.runs_on_gpu() if self.in_decode_tasks is None else self.in_decode_tasks


class ClipPredictor:
    """Ray Data callable class: loads the models once per actor (fused for inference), then predicts every
    head on each batch."""

    def __init__(
        self, loaders: Sequence[ModelLoader], use_gpu: bool = False, threads: int | None = None
    ) -> None:
        import torch

        if threads and not use_gpu:
            torch.set_num_threads(threads)
        from models import fuse_for_inference

        self.device = torch.device("cuda" if use_gpu else "cpu")
        # BatchNorm folded into its convolution: the same outputs (to float rounding), ~1.5x the CPU rate of
        # the demo's CNN-LSTM (bench models measures it per family).
        self.models = [fuse_for_inference(loader().eval()).to(self.device) for loader in loaders]
        if not self.models:
            raise ValueError("predict: give at least one model")
        # bf16 only where the hardware has it: on CPU it is orders of magnitude slower here.
        self.autocast = use_gpu

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        out = {k: v for k, v in batch.items() if k not in INPUT_COLUMNS}
        for i, model in enumerate(self.models):
            inputs = model_inputs(model.spec, batch, self.device)
            with (
                torch.inference_mode(),
                torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast),
            ):
                outputs = model(inputs)
            out.update(head_outputs(i, model.spec, outputs))
        out[PREDICTED_AT] = np.full(len(batch["video_id"]), time.time())
        return out


@dataclass(frozen=True)
class ShippedModel:
    """A model loader that holds the module's object-store reference: small to pickle into every task or
    actor, and the same key wherever it lands, so a process that loaded it once keeps it."""

    ref: Any  # ray.ObjectRef of the module

    @classmethod
    def put(cls, module: Any) -> ShippedModel:
        """Put `module` in the object store (once per job: the driver keeps the reference)."""
        import ray

        return cls(ray.put(module))

    @property
    def key(self) -> str:
        return self.ref.hex()

    def __call__(self) -> Any:
        import ray

        return ray.get(self.ref)


# The predictor of the models this process loaded last: a decode task's worker process runs task after task
# of one night, and loading the models again for each would cost more than decoding a video.
_process_predictor: tuple[tuple[str, ...], ClipPredictor] | None = None


def process_predictor(loaders: Sequence[ModelLoader], threads: int = 1) -> ClipPredictor:
    """A CPU predictor of `loaders`' models, built once per process when they are `ShippedModel`s (each
    call otherwise). It holds only the latest models: a process that gets others lets the old ones go."""
    global _process_predictor
    keys = tuple(getattr(loader, "key", "") for loader in loaders)
    if not all(keys):
        return ClipPredictor(loaders, threads=threads)
    if _process_predictor is None or _process_predictor[0] != keys:
        _process_predictor = None  # the old models go before the new ones load
        _process_predictor = (keys, ClipPredictor(loaders, threads=threads))
    return _process_predictor[1]


def warm_workers(
    loaders: Sequence[ModelLoader], workers: int, num_cpus: float, threads: int = 1
) -> list[Any]:
    """Load the models into `workers` idle Ray task workers (`process_predictor`), in tasks that reserve what
    a decode task does; returns their references. Started with a dataset that predicts in its decode tasks,
    they use the cores that Ray Data leaves idle in its first second (it runs one task until it has the
    cluster's size), and the decode tasks after them take those workers (Ray reuses the worker idle last),
    torch and the models already loaded."""
    import ray

    warm = ray.remote(_warm_worker).options(num_cpus=num_cpus)
    return [warm.remote(list(loaders), threads) for _ in range(workers)]


def _warm_worker(loaders: list[ModelLoader], threads: int) -> None:
    process_predictor(loaders, threads)


def predict_clip_stream(
    tables: Iterator[pa.Table], loaders: Sequence[ModelLoader], batch_size: int, threads: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Prediction batches of a stream of clip tables, predicted in this process `batch_size` clips at a time
    (the last batch holds the rest): inference fused into a decode task (`flows.clips.clip_dataset`'s
    `then`)."""
    from ray.data.block import BlockAccessor

    # The first clips before the models: the decoder child then decodes a few clips ahead while this process
    # imports torch and loads the models (a worker's first task), and a task whose videos all fail loads none.
    first = next(tables, None)
    if first is None:
        return
    predictor = process_predictor(loaders, threads)
    pending: list[pa.Table] = []
    rows = 0
    for table in itertools.chain([first], tables):
        pending.append(table)
        rows += table.num_rows
        while rows >= batch_size:
            merged = pa.concat_tables(pending)
            batch = BlockAccessor.for_block(merged.slice(0, batch_size)).to_batch_format("numpy")
            yield predictor(batch)
            rest = merged.slice(batch_size)
            pending, rows = ([rest] if rest.num_rows else []), rest.num_rows
    if rows:
        yield predictor(BlockAccessor.for_block(pa.concat_tables(pending)).to_batch_format("numpy"))


def model_inputs(spec: Any, batch: dict[str, np.ndarray], device: Any) -> Any:
    """A model's input from a clip batch: normalized clips, plus audio and text if the model reads them."""
    import torch

    video = spec.prepare(np.asarray(batch["frames"])).to(device, non_blocking=True)
    if tuple(spec.modalities) == ("video",):
        return video
    inputs: dict[str, Any] = {"video": video}
    if "audio" in spec.modalities:
        audio = np.stack([np.asarray(a, dtype=np.float32) for a in batch["audio"]])
        inputs["audio"] = torch.from_numpy(audio).to(device)
    if "text" in spec.modalities:
        inputs["text"] = [str(t) for t in batch["text"]]
    return inputs


def head_outputs(model_index: int, spec: Any, outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """A model's raw outputs as prediction columns: softmax for classification heads (an ensemble's
    log-probabilities come back as its averaged distribution), scalar heads as they are."""
    import torch

    scalar = {h for h, labels in spec.heads.items() if not labels}
    columns = {}
    for key, value in outputs.items():
        head = key.removesuffix(STEPS_SUFFIX)
        if head not in spec.heads:
            continue  # e.g. "features"
        value = value.float()
        value = value if head in scalar else torch.softmax(value, dim=-1)
        columns[output_column(model_index, key)] = value.cpu().numpy()
    return columns


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster has any GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def predict_dataset(
    clips: Any, loaders: Sequence[ModelLoader], config: PredictConfig = PredictConfig()
) -> Any:
    """Lazy Ray Dataset of clip rows → lazy Dataset of prediction rows (clip columns minus the inputs,
    plus one column per model output)."""
    if not loaders:
        raise ValueError("predict: give at least one model")
    from ray.util.annotations import RayDeprecationWarning

    options = pool_options(config)
    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for an actor's restarts; Ray Data's own code points at this keyword, the
        # kind it deprecates in general (Ray 2.64).
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        return clips.map_batches(
            ClipPredictor,
            fn_constructor_kwargs={
                "loaders": list(loaders),
                "use_gpu": options["num_gpus"] > 0,
                "threads": config.threads or max(1, round(options["num_cpus"])),
            },
            batch_size=config.batch_size,
            batch_format="numpy",
            # Ray Data hands each actor its UDF as an object-store argument, and Ray cannot promise to restart
            # an actor built from one (ray-project/ray#53727; it logs an error for each). A lost actor fails
            # the dataset instead, and the tag job runs that chunk again whole (`jobs.tag`'s chunk retry).
            max_restarts=0,
            **options,
        )


def pool_options(config: PredictConfig) -> dict[str, Any]:
    """Ray Data `map_batches` options of the inference actor pool: its size and what each actor reserves."""
    import ray
    import ray.data

    use_gpu = config.runs_on_gpu()
    if use_gpu:
        actors = config.concurrency or max(1, int(ray.cluster_resources().get("GPU", 1)))
    else:
        actors = config.concurrency or config.cpu_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    num_cpus = config.num_cpus if config.num_cpus is not None else (1.0 if use_gpu else CPU_ACTOR_CPUS)
    return {
        "compute": ray.data.ActorPoolStrategy(min_size=min(config.min_actors, actors), max_size=actors),
        "num_gpus": 1 if use_gpu else 0,
        "num_cpus": num_cpus,
        "memory": int(config.memory_gb * 2**30),
    }
