"""`reelflow bench models`: forward throughput of each model at its spec on this machine.

This is the compute limit the tagging benchmark is measured against: tagging cannot predict faster than the
models' own forward pass. Every model is built at its spec and warmed up; then `iterations` rounds time one
forward pass of one batch of each model under `torch.inference_mode`, and the median pass counts. FLOPs per
clip are counted once with PyTorch's FLOP counter (convolutions, matmuls), so achieved GFLOP/s shows how
close to the machine each model runs. C3D models can also be timed with contiguous (channels-first)
tensors, the peer their channels_last_3d default is against. The ViT-B video transformers (VideoMAE,
TimeSformer; random init at their base size) take seconds per clip on a CPU: they run smaller batches and
fewer passes (`HEAVY_MODELS`), which the table's note says.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from jobs.benchmarks import BENCHMARKS_FILE, machine_line
from jobs.output import JobConsole
from jobs.runtime import console
from models import MODELS, build, fuse_for_inference
from models.spec import example_input
from models.video_transformer import TIMESFORMER_BASE, VIDEOMAE_BASE

DEFAULT_MODELS = (
    "c3d", "c3d_small", "cnn_lstm", "graph", "summarizer", "sentiment", "videomae", "timesformer",
)  # fmt: skip
# Builder arguments of the models that need more than their name: the transformers at their base size.
MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "videomae": {"config": VIDEOMAE_BASE},
    "timesformer": {"config": TIMESFORMER_BASE},
}
# Models too slow on a CPU for the full protocol: (most timed passes, largest batch). On 2 cores VideoMAE-B
# (16×224×224) takes ~4–7 s a clip and TimeSformer-B (8×224×224, divided attention) ~15–30 s; with the
# defaults they alone would take half an hour. Their FLOP-counting pass is their warm-up.
HEAVY_MODELS: dict[str, tuple[int, int]] = {"videomae": (3, 2), "timesformer": (2, 1)}
SECTION = "## Models (`reelflow bench models`)"
SUMMARIZER_STEPS = 64  # clip embeddings per sequence: a 1-minute video at one clip per second


@dataclass(frozen=True)
class BenchModelsConfig:
    """What to time.

    `threads` sets torch's intra-op threads (None: torch's default for this machine); `contiguous_peer` lists
    the C3D models (of `models`) also timed without channels_last_3d; `fuse` folds BatchNorm into the
    convolutions first, as tagging does (`models.fuse_for_inference`).
    """

    batch_size: int = 8
    iterations: int = 10
    warmup: int = 1
    models: tuple[str, ...] = DEFAULT_MODELS
    threads: int | None = None
    contiguous_peer: tuple[str, ...] = ("c3d_small",)
    fuse: bool = True
    record: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench models: {name}={getattr(self, name)} must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"bench models: warmup={self.warmup} must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"bench models: threads={self.threads} must be >= 1")
        if not self.models:
            raise ValueError("bench models: models is empty")
        unknown = [m for m in (*self.models, *self.contiguous_peer) if m not in MODELS or m == "multitask"]
        if unknown:
            known = ", ".join(m for m in MODELS if m != "multitask")
            raise ValueError(f"bench models: unknown models {unknown}; known: {known}")
        bad_peer = [m for m in self.contiguous_peer if not m.startswith("c3d")]
        if bad_peer:
            raise ValueError(f"bench models: contiguous_peer {bad_peer} must be C3D models")


def main(config: BenchModelsConfig) -> list[dict[str, Any]]:
    """Time every model, print the table, and append it to BENCHMARKS.md when `config.record`."""
    threads_before = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        subjects = []
        for name in config.models:
            subjects.append(Subject.build(name, config))
            if name in config.contiguous_peer:
                subjects.append(Subject.build(name, config, channels_last=False))
        # Round-robin, one pass of each model per round: a burst of load from other processes then slows
        # one pass of every model instead of all passes of one model.
        with torch.inference_mode():
            for subject in subjects:
                subject.warm_up(subject.warmup)
            for _ in range(config.iterations):
                for subject in subjects:
                    if len(subject.times) < subject.iterations:
                        subject.time_one_pass()
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    rows = [s.row(config) for s in subjects]
    for row, peer in itertools.pairwise(rows):
        if peer["model"] == f"{row['model']} (contiguous)":
            row["vs_contiguous"] = row["clips_per_s"] / peer["clips_per_s"]
    # Other processes on the machine slow every figure down; say how busy it was.
    load = (load_before, os.getloadavg()[0])
    table = format_table(rows, config, threads, load)
    # Rich wraps to 80 columns when stderr is not a terminal; the table needs more.
    wide = console if console.is_terminal else JobConsole(stderr=True, width=140)
    wide.print(_rich_table(rows, config, threads))
    if config.record:
        record(table, command_line(config))
    return rows


@dataclass
class Subject:
    """One model under test at its spec, its input batch, and the times of its timed passes."""

    label: str
    model: torch.nn.Module
    inputs: Any
    clips_per_batch: int
    batch_size: int
    iterations: int  # timed passes
    warmup: int
    flops: int = 0
    times: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, name: str, config: BenchModelsConfig, channels_last: bool = True) -> Subject:
        kwargs = {**MODEL_KWARGS.get(name, {}), **({} if channels_last else {"channels_last": False})}
        model = build(name, **kwargs).eval()
        if config.fuse:
            fuse_for_inference(model)
        iterations, batch_size, warmup = config.iterations, config.batch_size, config.warmup
        if name in HEAVY_MODELS:
            most_passes, largest_batch = HEAVY_MODELS[name]
            iterations, batch_size, warmup = min(iterations, most_passes), min(batch_size, largest_batch), 0
        inputs = example_input(model.spec, batch_size, steps=SUMMARIZER_STEPS)
        # The summarizer scores a sequence of clip embeddings: count each step as one clip.
        clips = batch_size * (SUMMARIZER_STEPS if name == "summarizer" else 1)
        label = name if channels_last else f"{name} (contiguous)"
        return cls(label, model, inputs, clips, batch_size, iterations, warmup)

    def warm_up(self, passes: int) -> None:
        for _ in range(passes):
            self.model(self.inputs)
        with FlopCounterMode(display=False) as counter:
            self.model(self.inputs)
        self.flops = counter.get_total_flops()

    def time_one_pass(self) -> None:
        started = time.perf_counter()
        self.model(self.inputs)
        self.times.append(time.perf_counter() - started)

    def row(self, config: BenchModelsConfig) -> dict[str, Any]:
        # The median pass: other processes on a shared machine stall some passes, not the model.
        seconds = statistics.median(self.times)
        gflop_per_clip = self.flops / self.clips_per_batch / 1e9
        clips_per_s = self.clips_per_batch / seconds
        return {
            "model": self.label,
            "input": _describe_input(self.model.spec),
            "params_m": sum(p.numel() for p in self.model.parameters()) / 1e6,
            "gflop_per_clip": gflop_per_clip,
            "batch_size": self.batch_size,
            "passes": len(self.times),
            "ms_per_batch": 1000 * seconds,
            "clips_per_s": clips_per_s,
            "gflop_per_s": gflop_per_clip * clips_per_s,
        }


def _describe_input(spec: Any) -> str:
    if "features" in spec.modalities:
        return f"{SUMMARIZER_STEPS}×{spec.feature_dim} features"
    h, w = spec.frame_size
    extra = [m for m in spec.modalities if m != "video"]
    return f"{spec.clip_len}×{h}×{w}" + ("".join(f" + {m}" for m in extra))


COLUMNS = (
    ("model", "model", "{}"),
    ("input", "input (T×H×W)", "{}"),
    ("params_m", "params (M)", "{:.2f}"),
    ("gflop_per_clip", "GFLOP/clip", "{:.3g}"),
    ("ms_per_batch", "ms/batch", "{:.1f}"),
    ("clips_per_s", "clips/s", "{:.1f}"),
    ("gflop_per_s", "GFLOP/s", "{:.1f}"),
    ("vs_contiguous", "× contiguous", "{:.2f}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key not in row:
        return ""
    value = row[key]
    if fmt == "{:.1f}" and 0 < value < 1:
        return f"{value:.2g}"  # a ViT-B's clips/s on a CPU: one decimal would round 0.05 to 0.1
    return fmt.format(value)


def format_table(
    rows: list[dict[str, Any]], config: BenchModelsConfig, threads: int, load: tuple[float, float]
) -> str:
    """The figures as a Markdown table, with the settings they were taken at and the machine's load."""
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "|".join(" --- " for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    fused = "BatchNorm folded into the convolutions" if config.fuse else "BatchNorm not folded"
    threads_text = f"{threads} torch thread" + ("s" if threads != 1 else "")
    note = (
        f"Batch {config.batch_size}, {threads_text}, {config.warmup} warm-up + median of {config.iterations} "
        f"timed forward passes under `torch.inference_mode`, float32, eval mode, {fused}. The summarizer's "
        f"clips are the steps of {SUMMARIZER_STEPS}-step sequences; sentiment reads video, audio and text. "
        f"1-minute load average {load[0]:.1f} before, {load[1]:.1f} after."
    )
    lighter = [
        f"{r['model']} batch {r['batch_size']}, median of {r['passes']}"
        for r in rows
        if (r["batch_size"], r["passes"]) != (config.batch_size, config.iterations)
    ]
    if lighter:
        note += (
            f" Too slow for that on a CPU, with their FLOP-counting pass as warm-up: {'; '.join(lighter)}. "
            "The transformers' GFLOP/clip leaves out attention run by PyTorch's fused CPU kernel "
            "(VideoMAE's; TimeSformer's is counted)."
        )
    return note + "\n\n" + "\n".join(lines)


def _rich_table(rows: list[dict[str, Any]], config: BenchModelsConfig, threads: int) -> Table:
    table = Table(title=f"model forward throughput — batch {config.batch_size}, {threads} threads")
    for key, title, _ in COLUMNS:
        table.add_column(title, justify="left" if key in ("model", "input") else "right")
    for row in rows:
        table.add_row(*(_cell(row, k, f) for k, _, f in COLUMNS))
    return table


def command_line(config: BenchModelsConfig) -> str:
    """The `reelflow` command that reproduces these figures."""
    parts = ["reelflow bench models", f"--batch-size {config.batch_size}"]
    if config.models != DEFAULT_MODELS:
        parts.append("--models " + ",".join(config.models))
    if config.threads is not None:
        parts.append(f"--threads {config.threads}")
    return " ".join(parts)


def record(body: str, command: str, path: Path = BENCHMARKS_FILE) -> None:
    """Add a dated entry at the end of the models section of BENCHMARKS.md (the section is made if missing).

    Entries go inside this section, before the next "## " heading, so that other benchmarks' sections can
    follow it in the same file.
    """
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = f"### {stamp}\n\n`{command}` on {machine_line()}\n\n{body.strip()}\n"
    text = (
        path.read_text()
        if path.exists()
        else ("# Benchmarks\n\nFigures appended by `reelflow bench …`; newest last in each section.\n")
    )
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{SECTION_INTRO}\n\n{entry}"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before = "".join(lines[:end]).rstrip("\n")
        after = "".join(lines[end:])
        text = f"{before}\n\n{entry}" + (f"\n{after}" if after else "")
    path.write_text(text)


SECTION_INTRO = (
    "Forward throughput of each model at its spec (clips/s), the compute limit that tagging is measured "
    "against. GFLOP/clip is counted by PyTorch's FLOP counter (convolutions and matmuls, 2 FLOP per "
    "multiply-add; the LSTM is not counted); GFLOP/s is what the model achieves on this machine. "
    '"× contiguous" is the channels_last_3d speed-up of C3D over the same model with channels-first tensors. '
    "Each run records the machine's load average: when other processes keep the cores busy, torch threads "
    "beyond the free cores make small models several times slower (they wait at barriers for a descheduled "
    "sibling), so compare runs at a similar load and thread count."
)
