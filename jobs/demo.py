"""`reelflow demo`: the main job on the embedded default, every artefact under one local folder.

    reelflow demo [--workdir reelflow-demo] [--videos 160] [--epochs N]

1. generate a labelled corpus with a few unreadable files (`make-corpus`);
2. train the small multi-task model with Ray Train on 2 CPU workers (`jobs/configs/demo.yaml`), tracked and
   registered in MLflow (SQLite under the workdir), evaluated on its held-out videos;
3. tag the whole corpus with the registered model into the Delta Lake tables (`reelflow tag`);
4. print the daily report and draw it as a PNG.

Local Ray, a folder as object store and MLflow on SQLite: nothing to set up. A second run reuses the corpus,
resumes the finished training run, and tags nothing new.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from jobs import make_corpus, report, tag, train
from jobs.config import load_config
from jobs.runtime import console

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


@dataclass(frozen=True)
class DemoConfig:
    """Where the demo keeps its state, how big a corpus it makes and how long it trains."""

    workdir: str = "reelflow-demo"
    videos: int = 160
    broken: int = 3
    seed: int = 0
    epochs: int | None = None  # None: demo.yaml's
    date: str | None = None  # the night the tables are written for; None: today (UTC)

    def __post_init__(self) -> None:
        if self.videos < 20:
            raise ValueError(f"videos: must be >= 20 (a validation split per category), got {self.videos}")
        if self.broken < 0:
            raise ValueError(f"broken: must be >= 0, got {self.broken}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced, for a caller (or a test) to look at."""

    workdir: Path
    model_uri: str
    evaluation: dict[str, float]
    tag: tag.TagSummary
    report: report.DailyReport


def main(config: DemoConfig) -> DemoResult:
    """Generate, train, tag, report."""
    workdir = Path(config.workdir).resolve()
    corpus, tables = workdir / "corpus", workdir / "tables"
    tracking_uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    (workdir / "mlflow").mkdir(parents=True, exist_ok=True)
    date = config.date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    console.rule("[bold]reelflow demo")
    console.print(f"all state in {workdir}; MLflow UI: mlflow ui --backend-store-uri {tracking_uri}")

    if (corpus / "labels.parquet").exists():
        console.print(f"[bold]1/4[/] corpus already in {corpus}")
    else:
        console.print(f"[bold]1/4[/] generating {config.videos} labelled videos (+{config.broken} broken)")
        make_corpus.main(
            make_corpus.CorpusConfig(
                out=str(corpus), videos=config.videos, seed=config.seed, broken=config.broken, size=64,
                duration_s=8.0, fps=15,
            )
        )  # fmt: skip

    console.print("[bold]2/4[/] training the small multi-task model on 2 Ray Train workers")
    overrides = [
        f"corpus={corpus}",
        f"storage={workdir / 'runs'}",
        f"mlflow.tracking_uri={tracking_uri}",
        f"seed={config.seed}",
    ]
    if config.epochs is not None:
        overrides.append(f"optim.epochs={config.epochs}")
    trained = train.main(load_config(train.TrainConfig, DEMO_CONFIG, overrides))
    console.print(f"registered {trained.model_uri}")

    console.print(f"[bold]3/4[/] tagging the corpus for {date}")
    tagged = tag.main(
        tag.TagConfig(
            corpus=str(corpus), models=(trained.model_uri,), tables=str(tables), date=date,
            tracking_uri=tracking_uri,
        )
    )  # fmt: skip

    console.print("[bold]4/4[/] the morning report")
    plot = workdir / f"daily-{date}.png"
    daily = report.daily_report(report.DailyReportConfig(tables=str(tables), date=date, plot=str(plot)))
    example = "SELECT label, count(*) AS videos FROM classifications WHERE rank = 1 GROUP BY label"
    console.print(f'ask more: reelflow query "{example}" --tables {tables}')
    return DemoResult(workdir, trained.model_uri, dict(trained.evaluation), tagged, daily)
