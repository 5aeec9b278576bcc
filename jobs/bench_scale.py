"""`reelflow bench scale`: does a tag night's memory stay flat as the catalog grows tenfold?

For N and 10×N listed objects, a first night (nothing committed) and a quiet night (every object already
tagged by the model): the peak memory of the driver (its own process, planning the night and reading every
chunk's plan as the tag job does) and of the largest Ray worker, and the planning time per listed object.
Decoding and inference are left out: they work a chunk at a time and do not grow with the corpus. Targets:
10×N / N ≤ 1.15 for each peak; planning ≤ 0.5 ms per listed object.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pyarrow as pa

from flows import storage, table_writer, tables
from jobs import benchmarks
from jobs.runtime import console

MEMORY_LIMIT = 1.15
PLAN_MS_GOAL = 0.5
MODEL = SimpleNamespace(name="bench-model", version="1")
NIGHT = dt.date(2024, 1, 1)


@dataclass(frozen=True)
class BenchScaleConfig:
    """`objects` listed objects (N) and `factor` × N; `commit_every` as the tag job's chunks."""

    objects: int = 20_000
    factor: int = 10
    commit_every: int = 10_000
    workdir: str | None = None
    record: bool = True

    def __post_init__(self) -> None:
        for name, low in (("objects", 1), ("factor", 2), ("commit_every", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"bench scale: {name}={getattr(self, name)} must be >= {low}")


@dataclass(frozen=True)
class Scenario:
    """One measured night."""

    objects: int
    night: str  # "first" or "quiet"
    driver_mib: float
    worker_mib: float
    plan_s: float
    todo: int

    @property
    def plan_ms_per_object(self) -> float:
        return 1000 * self.plan_s / self.objects


def main(config: BenchScaleConfig) -> list[Scenario]:
    """Measure the four nights and record the ratios; returns the scenarios."""
    import ray

    from jobs.runtime import init_ray

    root = Path(config.workdir or tempfile.mkdtemp(prefix="reelflow-bench-scale-"))
    init_ray(None)
    address = ray.get_runtime_context().gcs_address
    out = []
    try:
        for n in (config.objects, config.objects * config.factor):
            corpus = _make_corpus(root / f"corpus-{n}", n)
            quiet = _tagged_tables(str(root / f"quiet-{n}"), corpus)
            for night, tables_uri in (("first", str(root / f"first-{n}")), ("quiet", quiet)):
                scenario = _measure(n, night, corpus, tables_uri, address, config.commit_every)
                console.print(
                    f"{night} night, {n} objects: driver {scenario.driver_mib:.0f} MiB, largest worker "
                    f"{scenario.worker_mib:.0f} MiB, planning {scenario.plan_s:.1f} s "
                    f"({scenario.plan_ms_per_object:.3f} ms/object, {scenario.todo} to do)"
                )
                out.append(scenario)
    finally:
        if config.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    _report(out, config)
    return out


def _make_corpus(folder: Path, n: int) -> str:
    """`n` tiny objects named like a catalog's (the planner lists and fingerprints them, never decodes)."""
    for i in range(n):
        path = folder / f"{i % 97:02d}" / f"video-{i:08d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(i.to_bytes(4, "little"))
    return str(folder)


def _tagged_tables(tables_uri: str, corpus: str) -> str:
    """Tables in which every object of `corpus` has a `videos` row and a classification by MODEL."""
    listed = storage.list_videos(corpus)
    ids = [storage.video_id(o.uri, o.etag) for o in listed]
    uris = [o.uri for o in listed]
    n = len(ids)
    videos = {"video_id": ids, "uri": uris, "status": ["ok"] * n}
    classifications = {"video_id": ids, "uri": uris, "model_name": [MODEL.name] * n,
                       "model_version": [MODEL.version] * n, "head": ["category"] * n,
                       "label": ["sports"] * n, "score": [0.9] * n, "rank": [1] * n}  # fmt: skip
    rows = {name: _rows(name, columns, n) for name, columns in
            (("videos", videos), ("classifications", classifications))}  # fmt: skip
    with table_writer.writing(tables_uri, "bench-scale-setup", NIGHT) as writer:
        writer.write_chunk(rows)
    return tables_uri


def _rows(name: str, columns: dict[str, list[Any]], n: int) -> pa.Table:
    """Rows of table `name` (without job_run_id, which the writer fills in): `columns`, nulls elsewhere."""
    schema = tables.row_schema(name)
    columns = {**columns, tables.PARTITION: [NIGHT] * n}
    arrays = {f.name: pa.array(columns.get(f.name, [None] * n), f.type) for f in schema}
    return pa.table(arrays, schema=schema)


def _measure(n: int, night: str, corpus: str, tables_uri: str, address: str, commit_every: int) -> Scenario:
    """Run the night's driver work in a fresh process (its own peak) while sampling Ray's workers."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with benchmarks.PeakMemory(0.2, measure=largest_ray_worker) as sampler:
        process = context.Process(target=_driver, args=(corpus, tables_uri, address, commit_every, results))
        process.start()
        driver_bytes, plan_s, todo = results.get(timeout=3600)
        process.join(timeout=60)
    return Scenario(n, night, driver_bytes / 2**20, sampler.peak_bytes / 2**20, plan_s, todo)


def _driver(corpus: str, tables_uri: str, address: str, commit_every: int, results: Any) -> None:
    """What the tag job's driver does for a night, short of decoding: plan, then read each chunk's plan."""
    import ray
    import ray.data

    from jobs.tag.plan import ChunkPlan, plan_night

    ray.init(address=address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Sampled here: a spawned process's ru_maxrss starts from its parent's peak (Linux keeps it across exec).
    with benchmarks.PeakMemory(0.1) as peak:
        started = time.perf_counter()
        plan = plan_night(corpus, [MODEL], tables_uri, storage.join_uri(tables_uri, "_scratch", "bench-plan"))
        plan_s = time.perf_counter() - started
        for parts in plan.chunks(commit_every):
            ChunkPlan.read(parts, [MODEL])
    results.put((peak.peak_bytes, plan_s, plan.todo))


def largest_ray_worker() -> int:
    """The proportional set size in bytes of the largest Ray worker process on this machine."""
    largest = 0
    for proc in psutil.process_iter(["name"]):
        if not (proc.info["name"] or "").startswith("ray::"):
            continue
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        largest = max(largest, getattr(info, "pss", info.rss))
    return largest


def _report(scenarios: list[Scenario], config: BenchScaleConfig) -> None:
    small = {s.night: s for s in scenarios if s.objects == config.objects}
    large = {s.night: s for s in scenarios if s.objects != config.objects}
    lines = [
        "| night | objects | driver peak MiB | largest worker MiB | planning s | ms/object |",
        "|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        cells = (s.night, s.objects, f"{s.driver_mib:.0f}", f"{s.worker_mib:.0f}", f"{s.plan_s:.1f}",
                 f"{s.plan_ms_per_object:.3f}")  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    for night in ("first", "quiet"):
        for what in ("driver_mib", "worker_mib"):
            ratio = getattr(large[night], what) / getattr(small[night], what)
            verdict = "ok" if ratio <= MEMORY_LIMIT else "OVER"
            lines.append(f"- {night} night, {what.split('_')[0]} peak ×{config.factor} objects: ratio "
                         f"{ratio:.3f} (limit {MEMORY_LIMIT}) {verdict}")  # fmt: skip
    per_object = large["first"].plan_ms_per_object
    verdict = "ok" if per_object <= PLAN_MS_GOAL else "OVER"
    lines.append(f"- planning a first night: {per_object:.3f} ms per listed object (goal {PLAN_MS_GOAL}) "
                 f"{verdict}")  # fmt: skip
    body = "\n".join(lines)
    console.print(body)
    if config.record:
        benchmarks.record("Catalog scale (`reelflow bench scale`)", body)
