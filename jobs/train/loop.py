"""The training loop, run by every Ray Train worker: epochs, losses, validation metrics, checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flows import labels as flabels
from flows.transforms import Augment, audio_crop, augment, flip_labels, temporal_crop
from jobs.config import redact
from jobs.train.config import OptimSection, TrainConfig
from jobs.train.plan import build_model
from models import head_loss, save_model

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a checkpoint carries besides the weights: progress, and where each attempt started."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    starts: list[int] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


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
    state, optimizer_state = TrainState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, optimizer_state = load_checkpoint(Path(folder), model)
    state.starts.append(state.epoch)
    weights = config.tasks.weights()
    # Heads without a loss get no gradient, and the sentiment model skips the encoder of a modality
    # that no sample of a batch has: DDP must expect unused parameters then.
    unused = bool(set(model.spec.heads) - set(weights)) or config.model.name == "sentiment"
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    optimizer = make_optimizer(_unwrap(ddp), config.optim)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)  # moves the state to the parameters' device
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
    last: dict[str, float] = state.history[-1] if state.history else {}
    for epoch in range(state.epoch, config.optim.epochs):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(zlib.crc32(f"{config.seed}:{rank}:{epoch}".encode()))
        batches = train_shard.iter_torch_batches(
            batch_size=config.data.batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=config.seed + 1000 * epoch + rank,
            drop_last=True,
        )
        train_metrics = train_epoch(
            ddp, optimizer, batches, config, labels, aug, schedule, state, device, generator, use_bf16
        )
        train_seconds = time.perf_counter() - started
        val_batches = val_shard.iter_torch_batches(batch_size=config.data.batch_size, collate_fn=collate)
        val_metrics, report = validate(_unwrap(ddp), val_batches, config, labels, heads, device, use_bf16)
        state.epoch = epoch + 1
        last = {
            "epoch": float(epoch),
            **train_metrics,
            **val_metrics,
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
                save_checkpoint(Path(folder), _unwrap(ddp), optimizer, state, report)
                ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(last, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")
    return {"starts": state.starts, "epochs": state.epoch, "metrics": last}


def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A numpy batch → tensors (text stays a list of strings)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in ("text", "file"):
            out[key] = [str(v) for v in value]
        elif key == "audio":
            out[key] = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in value]))
        else:
            array = np.asarray(value)
            out[key] = torch.from_numpy(array if array.flags.writeable else array.copy())
    return out


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


def make_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum); no weight decay on biases and normalization weights."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.dim() <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=optim.lr)


def model_inputs(
    model: nn.Module, frames: torch.Tensor, batch: Mapping[str, Any], device: torch.device
) -> Any:
    """What the model's forward takes: normalized clips, plus audio and text for a multimodal model."""
    spec = model.spec
    video = spec.prepare(frames).to(device, non_blocking=True)
    if spec.modalities == ("video",):
        return video
    inputs: dict[str, Any] = {"video": video}
    if "audio" in spec.modalities:
        inputs["audio"] = batch["audio"].to(device)
    if "text" in spec.modalities:
        inputs["text"] = batch["text"]
    return inputs


def train_targets(
    batch: Mapping[str, Any], views: Any, aug: Augment, labels: flabels.LabelSet, device: torch.device
) -> dict[str, torch.Tensor]:
    """Targets of the augmented clips: per-frame ones cut like the frames, clip ones derived from them."""
    steps = temporal_crop(batch["action_steps"], views.offsets, aug.clip_len)
    steps = flip_labels(steps, views.flipped, aug.flip_permutation)
    importance = temporal_crop(batch["importance_steps"], views.offsets, aug.clip_len)
    return _targets(batch, steps, importance, labels, device)


def _targets(
    batch: Mapping[str, Any],
    steps: torch.Tensor,
    importance: torch.Tensor,
    labels: flabels.LabelSet,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    targets = {
        "category": batch["category"],
        "action_steps": steps,
        "sentiment": batch["sentiment"],
        "valence": batch["valence"].float(),
        "importance": flabels.clip_importance(importance),
    }
    if labels.actions:  # a manifest without action labels has no background class either
        targets["action"] = flabels.clip_action(steps, labels.background)
    return {k: v.to(device, non_blocking=True) for k, v in targets.items()}


def task_losses(
    outputs: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    spec: Any,
    weights: Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """Each task's loss (unweighted), computed in float32 whatever the autocast."""
    floats = {k: v.float() for k, v in outputs.items()}
    return {task: head_loss(floats, {task: targets[task]}, spec) for task in weights}


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
) -> dict[str, float]:
    """One pass over this worker's shard; returns this worker's mean losses and clip count."""
    module = _unwrap(model)
    weights = config.tasks.weights()
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
            total = sum(weights[t] * losses[t] for t in weights)
            (total / accum).backward()
        micro += 1
        if sync:
            _step(model, optimizer, schedule, state, config.optim.grad_clip)
        n = int(frames.shape[0])
        clips += n
        sums["train_loss"] = sums.get("train_loss", 0.0) + float(total.detach()) * n
        for task, loss in losses.items():
            sums[f"train_loss_{task}"] = sums.get(f"train_loss_{task}", 0.0) + float(loss.detach()) * n
    if micro % accum:  # the epoch's last, partial accumulation group (same count on every worker)
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
        group["lr"] = lr
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1


def _maybe_no_sync(model: nn.Module, skip_sync: bool) -> Any:
    return model.no_sync() if skip_sync and hasattr(model, "no_sync") else contextlib.nullcontext()


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Any,
    config: TrainConfig,
    labels: flabels.LabelSet,
    heads: Mapping[str, Sequence[str]],
    device: torch.device,
    use_bf16: bool,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Clip-level validation over every worker's shard (sums all-reduced): each task's metric, its loss,
    and confusion matrices of the classification heads."""
    weights = config.tasks.weights()
    model.eval()
    classes = {h: len(heads[h]) for h in ("category", "action", "sentiment") if h in heads}
    acc = _Sums(classes, device)
    for batch in batches:
        steps = batch["action_steps"]
        targets = _targets(batch, steps, batch["importance_steps"], labels, device)
        inputs = model_inputs(model, batch["frames"], batch, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
            outputs = {k: v.float() for k, v in model(inputs).items()}
        losses = task_losses(outputs, targets, model.spec, weights)
        acc.add(outputs, targets, losses, weights)
    return acc.reduce(heads)


class _Sums:
    """Running sums of validation counts, all-reduced across workers at the end."""

    def __init__(self, classes: Mapping[str, int], device: torch.device) -> None:
        self.classes = dict(classes)
        self.device = device
        self.scalars: dict[str, float] = {}
        self.confusion = {h: torch.zeros(k, k, dtype=torch.float64) for h, k in self.classes.items()}

    def _add(self, key: str, value: float) -> None:
        self.scalars[key] = self.scalars.get(key, 0.0) + float(value)

    def add(
        self,
        outputs: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        losses: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
    ) -> None:
        n = len(targets["category"])
        self._add("n", n)
        self._add("loss", sum(weights[t] * float(losses[t]) for t in weights) * n)
        for task, loss in losses.items():
            self._add(f"loss_{task}", float(loss) * n)
        # Every key is added on every batch (zeros too): the workers all-reduce the same keys.
        for head in self.classes:
            logits, truth = outputs[head].cpu(), targets[head].cpu()
            known = truth >= 0  # clips of videos without this label are not scored
            logits, truth = logits[known], truth[known]
            pred = logits.argmax(dim=1)
            self._add(f"{head}_n", known.sum())
            self._add(f"{head}_correct", (pred == truth).sum())
            k = min(5, logits.shape[1])
            self._add(f"{head}_top5", (logits.topk(k, dim=1).indices == truth[:, None]).any(dim=1).sum())
            self.confusion[head].index_put_(
                (truth, pred), torch.ones(len(truth), dtype=torch.float64), accumulate=True
            )
        if "action_steps" in weights:
            steps, truth = outputs["action_steps"].argmax(dim=-1).cpu(), targets["action_steps"].cpu()
            known = truth >= 0
            self._add("action_steps_correct", (steps[known] == truth[known]).sum())
            self._add("action_steps_n", known.sum())
        for head in ("valence", "importance"):
            if head in weights:
                truth = targets[head].cpu()
                known = torch.isfinite(truth)
                self._add(f"{head}_abs", (outputs[head].cpu()[known] - truth[known]).abs().sum())
                self._add(f"{head}_n", known.sum())

    def reduce(self, heads: Mapping[str, Sequence[str]]) -> tuple[dict[str, float], dict[str, Any]]:
        import torch.distributed as dist

        keys = sorted(self.scalars)
        flat = torch.cat(
            [torch.tensor([self.scalars[k] for k in keys], dtype=torch.float64)]
            + [self.confusion[h].flatten() for h in self.classes]
        )
        if dist.is_available() and dist.is_initialized():
            # Every worker has the same keys: the same tasks, and at least one batch (equal shards).
            flat = flat.to(self.device)
            dist.all_reduce(flat)
            flat = flat.cpu()
        values = dict(zip(keys, flat[: len(keys)].tolist(), strict=True))
        n = max(values.get("n", 0.0), 1.0)
        metrics = {"val_loss": values.get("loss", 0.0) / n, "val_clips": values.get("n", 0.0)}
        for key in keys:
            if key.startswith("loss_"):
                metrics[f"val_{key}"] = values[key] / n
        report: dict[str, Any] = {"confusion": {}, "per_class": {}}
        offset = len(keys)
        for head, k in self.classes.items():
            cm = flat[offset : offset + k * k].reshape(k, k).round().long().numpy()
            offset += k * k
            report["confusion"][head] = {"labels": list(heads[head]), "matrix": cm.tolist()}
            report["per_class"][head] = _per_class(cm, heads[head])
            scored = values[f"{head}_n"]
            if not scored:
                continue  # no validation clip has ground truth for this head
            metrics[f"val_{head}_top1"] = values[f"{head}_correct"] / scored
            if k > 5:
                metrics[f"val_{head}_top5"] = values[f"{head}_top5"] / scored
        if values.get("action_steps_n"):
            metrics["val_action_steps_accuracy"] = values["action_steps_correct"] / values["action_steps_n"]
        for head in ("valence", "importance"):
            if values.get(f"{head}_n"):
                metrics[f"val_{head}_mae"] = values[f"{head}_abs"] / values[f"{head}_n"]
        return metrics, report


def _per_class(cm: np.ndarray, names: Sequence[str]) -> dict[str, dict]:
    from jobs.evaluation import per_class_report

    truth = np.repeat(np.arange(len(names)), cm.sum(axis=1))
    pred = np.concatenate([np.repeat(np.arange(len(names)), row) for row in cm]) if cm.sum() else truth
    if truth.size == 0:
        return {str(n): {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for n in names}
    return per_class_report(truth, pred, names)


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    report: Mapping[str, Any],
) -> None:
    """model.pt (models.save_model: spec + builder + weights), the optimizer and progress, the val report."""
    save_model(model, folder / MODEL_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "state": asdict(state)}, folder / STATE_FILE)
    (folder / REPORT_FILE).write_text(json.dumps({**report, "epoch": state.epoch}))


def load_checkpoint(folder: Path, model: nn.Module) -> tuple[TrainState, dict[str, Any]]:
    """Restore the weights from a checkpoint folder; return its progress and the optimizer's state."""
    payload = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    if payload["spec"]["heads"] != model.spec.to_dict()["heads"]:
        raise ValueError(f"checkpoint {folder}: its heads differ from this config's; use another run_name")
    model.load_state_dict(payload["state_dict"])
    extra = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return TrainState(**extra["state"]), extra["optimizer"]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


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
