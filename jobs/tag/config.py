"""The tag job's configuration and the summary of what a run did."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

from flows import table_writer, tables
from flows.aggregate import AggregateConfig
from flows.lease import DEFAULT_TTL_S
from flows.predict import PredictConfig

EXPERIMENT = "reelflow-tag"


@dataclass(frozen=True)
class TagConfig:
    """One night's tagging run.

    `stride` is in output frames between window starts (default: the clip length, windows side by side
    covering the whole video). `tracking_uri` defaults to MLFLOW_TRACKING_URI, else a SQLite store in
    ./reelflow-mlflow (where `reelflow train` registers by default). `commit_every` videos make a chunk;
    `lease_wait_s` is how long to wait for another run's lease (default: its TTL and a quarter).
    A transient error (storage I/O, a decoder killed or out of time) is retried by later nights until
    it has failed `max_attempts` times; `retry_errors` retries every error row, permanent ones too.
    """

    corpus: str
    models: tuple[str, ...]
    tables: str
    date: str
    full: bool = False
    tracking_uri: str | None = None
    experiment: str = EXPERIMENT
    job_run_id: str | None = None
    stride: int | None = None
    decoder: str = "auto"
    predict: PredictConfig = field(default_factory=PredictConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    ray_address: str | None = None
    commit_every: int = 10_000
    lease_ttl_s: float = DEFAULT_TTL_S
    lease_wait_s: float | None = None
    max_attempts: int = 3
    retry_errors: bool = False
    max_videos: int | None = None
    commit_minutes: float | None = None
    trust_pickle: bool = False  # load versions an older reelflow pickled (see jobs.tracking.load_model)

    def __post_init__(self) -> None:
        from jobs.tracking import parse_model_uri

        object.__setattr__(self, "models", tuple(self.models))
        if not self.models:
            raise ValueError("tag: give at least one --model models:/NAME/VERSION or models:/NAME@ALIAS")
        for uri in self.models:
            parse_model_uri(uri)
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"tag: a model is given twice in {list(self.models)}")
        tables.parse_run_date(self.date)
        if not self.corpus:
            raise ValueError("tag: --corpus is required")
        if self.job_run_id is not None:
            table_writer.check_job_run_id(self.job_run_id)
        checks = [
            ("stride", self.stride is None or self.stride >= 1, "must be >= 1"),
            ("commit_every", self.commit_every >= 1, "must be >= 1"),
            ("lease_ttl_s", self.lease_ttl_s > 0, "must be > 0"),
            ("lease_wait_s", self.lease_wait_s is None or self.lease_wait_s >= 0, "must be >= 0"),
            ("max_attempts", self.max_attempts >= 1, "must be >= 1"),
            ("max_videos", self.max_videos is None or self.max_videos >= 1, "must be >= 1"),
            ("commit_minutes", self.commit_minutes is None or self.commit_minutes > 0, "must be > 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"tag: {name}={getattr(self, name)} {rule}")


@dataclass
class TagSummary:
    """What a run did; the same figures go to MLflow."""

    job_run_id: str
    run_date: dt.date
    listed: int
    tagged: int = 0
    skipped: int = 0
    failed: int = 0
    retried: int = 0  # videos whose earlier error rows this run retried
    clips: int = 0
    seconds: float = 0.0
    decoded: int = 0  # videos sent to the decoder
    rows: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    rolled_forward: int = 0  # chunks of earlier runs this run finished committing
    commit_s: float = 0.0  # in the commit protocol: fencing, logging, committing
    mlflow_run_id: str | None = None
    startup_s: float = 0.0  # from the start of inference to its first predictions
    first_prediction_s: float = 0.0  # from the start of the job to its first predictions
    steady_clips_per_s: float = 0.0  # after that
    label_counts: dict[str, Counter[str]] = field(default_factory=dict)  # plot panel → top-1 label → videos

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0
