"""What a stage's Ray tasks and actors have done so far, for the driver to show while the stage runs.

A job starts one `ProgressCounter` actor (`start_counter`) and gives each stage a `StageCounter`, its key on
that actor, to hand to the stage's tasks. They add counts (`report`: videos, clips) or set latest values
(`report_values`: epoch, loss) without waiting for an answer, and the driver reads the stage's totals a few
times a second. One small actor call per video or per half second of training: nothing grows in the driver
with the corpus.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ProgressCounter:
    """Per stage, the sums of counts and the latest values that its workers reported."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, float]] = {}
        self._values: dict[str, dict[str, Any]] = {}

    def add(self, stage: str, counts: Mapping[str, float]) -> None:
        totals = self._counts.setdefault(stage, {})
        for name, n in counts.items():
            totals[name] = totals.get(name, 0) + n

    def set(self, stage: str, values: Mapping[str, Any]) -> None:
        self._values.setdefault(stage, {}).update(values)

    def read(self, stage: str) -> dict[str, Any]:
        return {**self._values.get(stage, {}), **self._counts.get(stage, {})}

    def drop(self, stage: str) -> None:
        self._counts.pop(stage, None)
        self._values.pop(stage, None)


def start_counter() -> Any:
    """A `ProgressCounter` actor (needs Ray initialized). It takes no CPU, so it fits on a head node without
    any, and is never restarted: a lost counter loses only the display's numbers."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressCounter).remote()


@dataclass(frozen=True)
class StageCounter:
    """What a stage's tasks report to: the job's counter actor and the stage's key on it."""

    actor: Any
    stage: str

    def read(self) -> Any:
        """An object reference to the stage's totals."""
        return self.actor.read.remote(self.stage)


def report(counter: StageCounter | None, **counts: float) -> None:
    """Add `counts` to a stage's totals (a no-op without a counter); does not wait."""
    if counter is not None:
        counter.actor.add.remote(counter.stage, counts)


def report_values(counter: StageCounter | None, **values: Any) -> None:
    """Set the latest `values` (epoch, step, loss…) of a stage (a no-op without a counter); does not wait."""
    if counter is not None:
        counter.actor.set.remote(counter.stage, values)
