"""What a tag run reports: the one-screen summary, and an MLflow run with its figures and a label plot."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flows import storage, tables
from jobs.registered import RegisteredModel
from jobs.runtime import console
from jobs.tag.config import TagConfig, TagSummary
from jobs.tag.plan import NightPlan

if TYPE_CHECKING:
    from jobs.tracking import ModelRef


def record_run(
    config: TagConfig, summary: TagSummary, refs: Sequence[ModelRef], models: Sequence[RegisteredModel],
    tracking_uri: str,
) -> str:  # fmt: skip
    """An MLflow run with the summary's figures and a plot of the top-1 labels tagged this run."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from jobs import tracking

    run_id = tracking.get_or_create_run(
        config.experiment,
        f"tag:{summary.job_run_id}",
        summary.job_run_id,
        tracking_uri=tracking_uri,
        tags={"reelflow.job": "tag", "reelflow.run_date": summary.run_date.isoformat()},
    )
    client = MlflowClient(tracking_uri)
    params = {"corpus": storage.canonical_uri(config.corpus), "tables": tables.root_uri(config.tables),
              "models": ",".join(ref.uri for ref in refs), "run_date": summary.run_date.isoformat(),
              "full": str(config.full), "batch_size": str(config.predict.batch_size),
              "commit_every": str(config.commit_every), "max_videos": str(config.max_videos),
              "max_attempts": str(config.max_attempts),
              "retry_errors": str(config.retry_errors)}  # fmt: skip
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    metrics = {"videos_listed": summary.listed, "videos_tagged": summary.tagged,
               "videos_skipped": summary.skipped, "videos_failed": summary.failed,
               "videos_retried": summary.retried, "videos_decoded": summary.decoded, "clips": summary.clips,
               "clips_per_s": summary.clips_per_s, "seconds": summary.seconds, "chunks": summary.chunks,
               "commit_s": summary.commit_s, "startup_s": summary.startup_s,
               "first_prediction_s": summary.first_prediction_s,
               "steady_clips_per_s": summary.steady_clips_per_s,
               **{f"rows_{k}": v for k, v in summary.rows.items()}}  # fmt: skip
    tracking.log_metrics(run_id, metrics, 0, tracking_uri=tracking_uri)
    if models:  # a quiet night has no labels to plot
        client.log_figure(run_id, label_distribution_figure(summary.label_counts), "label_distribution.png")
    tracking.finish_run(run_id, tracking_uri=tracking_uri)
    return run_id


def label_distribution_figure(counts: dict[str, Counter[str]]) -> Any:
    """Bars: videos per top-1 label, for each classification head of each model (this run's videos)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.2 + 1.6 * max(1, len(counts))), layout="constrained")
    if not counts:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no videos tagged in this run", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for i, (title, panel) in enumerate(sorted(counts.items())):
        ax = fig.add_subplot(len(counts), 1, i + 1)
        labels = sorted(panel, key=lambda k: (-panel[k], k))
        ax.barh(labels[::-1], [panel[k] for k in labels][::-1], color="tab:blue")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel("videos (top-1 label)")
    return fig


def print_plan(plan: NightPlan, corpus: str) -> None:
    """What planning found: listed, to tag (retries among them), already done."""
    retrying = f" (retrying the errors of {plan.retried})" if plan.retried else ""
    console.print(
        f"{plan.listed} videos under {corpus}: {plan.todo} to tag{retrying}, {plan.skipped} already tagged"
    )


def print_summary(summary: TagSummary, tables_uri: str) -> None:
    """The one-screen summary at the end of a run."""
    console.rule("[bold]tag summary")
    console.print(
        f"videos: {summary.listed} listed, [green]{summary.tagged} tagged[/], {summary.skipped} skipped, "
        f"[red]{summary.failed} failed[/]" + (f" ({summary.retried} retried)" if summary.retried else "")
    )
    console.print(
        f"clips: {summary.clips} in {summary.seconds:.1f} s ({summary.clips_per_s:.1f} clips/s end to end)"
    )
    if summary.rows:
        console.print("rows: " + ", ".join(f"{k} {v}" for k, v in summary.rows.items()))
        chunks = f"{summary.chunks} chunk{'s' if summary.chunks != 1 else ''}"
        console.print(
            f"committed {summary.job_run_id} ({chunks}, {summary.commit_s:.2f} s committing) to "
            f"{tables.root_uri(tables_uri)} (run_date={summary.run_date})"
        )
    else:
        console.print("nothing new to commit")
    console.print(f"MLflow run {summary.mlflow_run_id}")
