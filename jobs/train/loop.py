"""The training loop, run by every Ray Train worker: epochs, losses, validation metrics, checkpoints."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flows import labels as flabels
from flows.progress import report_values
from flows.transforms import Augment, audio_crop, augment
from jobs.config import redact
from jobs.train import balance as tbalance
from jobs.train.batches import collate, model_inputs, task_losses, train_targets
from jobs.train.config import FinetuneSection, OptimSection, TrainConfig
from jobs.train.plan import build_model
from jobs.train.validation import validate
from models import save_model

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a checkpoint carries besides the weights: progress, and where each attempt started."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    starts: list[int] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    backbone_frozen: bool = False  # this epoch trains the heads only (finetune.freeze_backbone_epochs)


MODEL_FILE, STATE_FILE, REPORT_FILE = "model.pt", "train_state.pt", "report.json"


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function: restore, then train / validate / checkpoint one epoch at a time."""
    import ray.train
    import ray.train.torch

    config: TrainConfig = loop_config["config"]
    heads: dict[str, tuple[str, ...]] = loop_config["heads"]
    labels: flabels.LabelSet = loop_config["labels"]
    aug: Augment = loop_config["augment"]
    if config.scaling.torch_threads:
        torch.set_num_threads(config.scaling.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    model = build_model(config, heads)
    weights = config.tasks.weights()
    # The task weights (learned with tasks.balance=uncertainty or gradnorm) live beside the model, not in
    # it: never in the saved model; their gradients are averaged across workers in train_epoch.
    balancer = tbalance.make_balancer(
        config.tasks.balance, weights, config.tasks.balance_lr_scale, config.tasks.balance_alpha
    )
    state, optimizer_state = TrainState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, optimizer_state = load_checkpoint(Path(folder), model, balancer)
    balancer.to(device)
    state.starts.append(state.epoch)
    # Heads without a loss get no gradient, and the sentiment model skips the encoder of a modality
    # that no sample of a batch has: DDP must expect unused parameters then.
    # A frozen backbone gets no gradients either.
    unused = (
        bool(set(model.spec.heads) - set(weights))
        or config.model.name == "sentiment"
        or config.finetune.freeze_backbone_epochs > 0
    )
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    optimizer = make_optimizer(_unwrap(ddp), config.optim, config.finetune)
    balance_group = tbalance.param_group(balancer)
    if balance_group is not None:
        optimizer.add_param_group(balance_group)
    if optimizer_state is not None:
        # moves the state to the parameters' device; a checkpoint without the balancer's group gets it fresh
        optimizer.load_state_dict(tbalance.fit_optimizer_state(optimizer, optimizer_state))
    tracker = _Tracker(loop_config["run_id"], loop_config["tracking_uri"]) if rank == 0 else None
    if tracker:
        tracker.log({"attempt_start_epoch": state.epoch}, step=len(state.starts) - 1)

    steps_per_epoch = max(
        1, loop_config["train_clips"] // (world * config.data.batch_size * config.optim.grad_accum)
    )
    schedule = Schedule(config.optim, steps_per_epoch)
    use_bf16 = device.type == "cuda" and config.scaling.bf16
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    shown = _ShownProgress(loop_config.get("progress") if rank == 0 else None, config.optim.epochs,
                           schedule.total, world)  # fmt: skip
    shown.starting(state)
    last: dict[str, float] = state.history[-1] if state.history else {}
    for epoch in range(state.epoch, config.optim.epochs):
        started = time.perf_counter()
        state.backbone_frozen = epoch < config.finetune.freeze_backbone_epochs
        if hasattr(_unwrap(ddp), "freeze_backbone"):
            _unwrap(ddp).freeze_backbone(state.backbone_frozen)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{config.seed}:{rank}:{epoch}".encode()))
        batches = train_shard.iter_torch_batches(
            batch_size=config.data.batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=config.seed + 1000 * epoch + rank,
            drop_last=True,
        )
        on_batch = functools.partial(shown.batch, epoch, state, started)
        train_metrics = train_epoch(ddp, optimizer, batches, config, labels, aug, schedule, state, device,
                                    generator, use_bf16, balancer, on_batch)  # fmt: skip
        train_seconds = time.perf_counter() - started
        shown.validating(epoch, state)
        val_batches = val_shard.iter_torch_batches(batch_size=config.data.batch_size, collate_fn=collate)
        val_metrics, report = validate(_unwrap(ddp), val_batches, config, labels, heads, device, use_bf16)
        state.epoch = epoch + 1
        last = {
            "epoch": float(epoch),
            **train_metrics,
            **val_metrics,
            **{f"task_weight_{task}": w for task, w in balancer.weights().items()},
            "lr": schedule(state.step),
            "train_clips_per_s": train_metrics["train_clips"] * world / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - started,
        }
        state.history.append(last)
        if tracker:
            tracker.log(last, step=epoch)
        with tempfile.TemporaryDirectory(prefix="reelflow-ckpt-") as folder:
            ckpt = None
            if rank == 0:
                save_checkpoint(Path(folder), _unwrap(ddp), optimizer, state, report, balancer)
                ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(last, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")
    return {"starts": state.starts, "epochs": state.epoch, "metrics": last}


class Schedule:
    """Learning rate per optimizer step: linear warmup, then cosine decay to `min_lr_ratio` × lr."""

    def __init__(self, optim: OptimSection, steps_per_epoch: int) -> None:
        self.base = optim.lr
        self.min_ratio = optim.min_lr_ratio
        self.total = max(1, optim.epochs * steps_per_epoch)
        self.warmup = min(self.total - 1, round(optim.warmup_epochs * steps_per_epoch))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.base * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(
    model: nn.Module, optim: OptimSection, finetune: FinetuneSection | None = None
) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum); no weight decay on biases and normalization weights.

    With `finetune`, a multi-task model's backbone parameters learn at `backbone_lr_ratio` × the rate, and a
    transformer backbone's layer i of n at `layer_decay` ** (n + 1 − i) of that. Each group's `lr_scale`
    is what the schedule multiplies; groups of backbone parameters are marked `backbone` (for freezing).
    """
    finetune = finetune or FinetuneSection()
    backbone = getattr(model, "backbone", None)
    groups: dict[tuple[float, bool, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = backbone is not None and name.startswith("backbone.")
        scale = finetune.backbone_lr_ratio if in_backbone else 1.0
        if in_backbone and finetune.layer_decay < 1 and hasattr(backbone, "layer_id"):
            depth = backbone.num_layers + 1 - backbone.layer_id(name.removeprefix("backbone."))
            scale *= finetune.layer_decay**depth
        decays = param.dim() > 1
        group = groups.setdefault(
            (scale, decays, in_backbone),
            {"params": [], "weight_decay": optim.weight_decay if decays else 0.0, "lr_scale": scale,
             "backbone": in_backbone},
        )  # fmt: skip
        group["params"].append(param)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(list(groups.values()), lr=optim.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(list(groups.values()), lr=optim.lr)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Any,
    config: TrainConfig,
    labels: flabels.LabelSet,
    aug: Augment,
    schedule: Schedule,
    state: TrainState,
    device: torch.device,
    generator: torch.Generator,
    use_bf16: bool,
    balancer: tbalance.TaskBalancer | None = None,
    on_batch: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """One pass over this worker's shard; returns this worker's mean losses and clip count.

    `balancer` makes the loss that trains (default: the config's fixed weighted sum); its learned
    parameters, if any, must be in `optimizer`. `train_loss` stays the configured weighted sum either way.
    `on_batch(clips, mean_loss)` hears, after each batch, this worker's clips and mean loss so far."""
    module = _unwrap(model)
    weights = config.tasks.weights()
    balancer = balancer if balancer is not None else tbalance.TaskBalancer(weights)
    balancer.attach(module)
    balancer.train()
    accum = config.optim.grad_accum
    model.train()
    sums: dict[str, float] = {}
    clips = micro = 0
    waited = 0.0  # seconds spent waiting for data: what the data plane costs the GPU (or CPU)
    iterator = iter(batches)
    while True:
        asked = time.perf_counter()
        batch = next(iterator, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        frames, views = augment(batch["frames"], aug, generator)
        targets = train_targets(batch, views, aug, labels, device)
        inputs = model_inputs(module, frames, _audio_view(batch, views, aug), device)
        sync = (micro + 1) % accum == 0
        with _maybe_no_sync(model, not sync), torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
            losses = task_losses(model(inputs), targets, module.spec, weights)
            total = sum(weights[t] * losses[t].detach() for t in weights)
            (balancer(losses, tbalance.loss_floors(targets)) / accum).backward()
        micro += 1
        if sync:
            balancer.all_reduce_grads()
            _step(model, optimizer, schedule, state, config.optim.grad_clip)
        n = int(frames.shape[0])
        clips += n
        sums["train_loss"] = sums.get("train_loss", 0.0) + float(total.detach()) * n
        for task, loss in losses.items():
            sums[f"train_loss_{task}"] = sums.get(f"train_loss_{task}", 0.0) + float(loss.detach()) * n
        if on_batch is not None:
            on_batch(clips, sums["train_loss"] / clips)
    if micro % accum:  # the epoch's last, partial accumulation group (same count on every worker)
        balancer.all_reduce_grads()
        _step(model, optimizer, schedule, state, config.optim.grad_clip)
    out = {k: v / max(clips, 1) for k, v in sums.items()}
    out["train_clips"] = float(clips)
    out["train_data_wait_s"] = waited
    return out


def _audio_view(batch: Mapping[str, Any], views: Any, aug: Augment) -> Mapping[str, Any]:
    if "audio" not in batch:
        return batch
    decoded = batch["frames"].shape[1]
    return {**batch, "audio": audio_crop(batch["audio"], views.offsets, decoded, aug.clip_len)}


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    state: TrainState,
    clip: float | None,
) -> None:
    lr = schedule(state.step)
    for group in optimizer.param_groups:
        # A frozen backbone gets no step at all (AdamW's weight decay would still move it).
        frozen = group.get("backbone", False) and state.backbone_frozen
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1


def _maybe_no_sync(model: nn.Module, skip_sync: bool) -> Any:
    return model.no_sync() if skip_sync and hasattr(model, "no_sync") else contextlib.nullcontext()


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    report: Mapping[str, Any],
    balancer: tbalance.TaskBalancer | None = None,
) -> None:
    """model.pt (models.save_model: spec + builder + weights), the optimizer and progress (and the task
    balancer's learned weights, beside the model's: never in its state_dict), the val report."""
    save_model(model, folder / MODEL_FILE)
    extra: dict[str, Any] = {"optimizer": optimizer.state_dict(), "state": asdict(state)}
    if balancer is not None:
        extra["balance"] = tbalance.state(balancer)
    torch.save(extra, folder / STATE_FILE)
    (folder / REPORT_FILE).write_text(json.dumps({**report, "epoch": state.epoch}))


def load_checkpoint(
    folder: Path, model: nn.Module, balancer: tbalance.TaskBalancer | None = None
) -> tuple[TrainState, dict[str, Any]]:
    """Restore the weights (and `balancer`'s learned task weights, when the checkpoint has them: one from
    before balancing leaves it at its start) from a checkpoint folder; return its progress and the
    optimizer's state."""
    payload = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    if payload["spec"]["heads"] != model.spec.to_dict()["heads"]:
        raise ValueError(f"checkpoint {folder}: its heads differ from this config's; use another run_name")
    model.load_state_dict(payload["state_dict"])
    extra = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    if balancer is not None and "balance" in extra and not tbalance.load_state(balancer, extra["balance"]):
        log.warning("checkpoint %s: its task balance %s does not fit this config's; starting it afresh",
                    folder, extra["balance"].get("kind"))  # fmt: skip
    return TrainState(**extra["state"]), extra["optimizer"]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class _ShownProgress:
    """What rank 0 tells the driver's progress display (`flows.progress`): epoch, step, running loss and
    clips/s, at most twice a second."""

    def __init__(self, counter: Any | None, epochs: int, total_steps: int, world: int) -> None:
        self.counter, self.epochs, self.total_steps, self.world = counter, epochs, total_steps, world
        self.last = 0.0

    def batch(self, epoch: int, state: TrainState, started: float, clips: int, loss: float) -> None:
        now = time.perf_counter()
        if self.counter is None or now - self.last < 0.5:
            return
        self.last = now
        rate = clips * self.world / max(now - started, 1e-9)
        where = self._where(epoch, state)
        report_values(self.counter, **where, loss=loss, clips_per_s=rate, phase="training")

    def starting(self, state: TrainState) -> None:
        """Where this attempt starts: epochs done (all of them, for a finished run resumed)."""
        report_values(self.counter, **self._where(state.epoch - 1, state), phase="starting")

    def validating(self, epoch: int, state: TrainState) -> None:
        report_values(self.counter, **self._where(epoch, state), phase="validating")

    def _where(self, epoch: int, state: TrainState) -> dict[str, int]:
        return {"epoch": epoch + 1, "epochs": self.epochs, "step": state.step, "total": self.total_steps}


class _Tracker:
    """Rank 0's MLflow writer: per-epoch metrics into the job's run (failures are logged, not fatal)."""

    def __init__(self, run_id: str, tracking_uri: str) -> None:
        self.run_id, self.tracking_uri = run_id, tracking_uri

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from jobs import tracking

        try:
            tracking.log_metrics(self.run_id, metrics, step, tracking_uri=self.tracking_uri)
        except Exception as err:  # a tracking hiccup must not kill an hour of training
            log.warning("MLflow: could not log metrics at step %d: %s", step, redact(str(err))[:300])
