"""The `reelflow` command: its arguments, one subcommand per job (`jobs.commands` runs each), and the logging
and exit codes around them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobs import commands

EXIT_TEMPORARY = 75  # sysexits' EX_TEMPFAIL: try again later (an error with `temporary = True`)
TRUST_PICKLE_HELP = "load versions an older reelflow pickled (runs their code; see `reelflow models convert`)"


def actor_range(text: str) -> tuple[int, int]:
    """`--actors`: "MIN:MAX" or "N" (1 to N)."""
    fewest, _, most = text.rpartition(":") if ":" in text else ("1", ":", text)
    try:
        low, high = int(fewest), int(most)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--actors {text!r}: expected MIN:MAX or N, like 1:4") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"--actors {text!r}: need 1 <= MIN <= MAX")
    return low, high


class _Subcommands(argparse._SubParsersAction):
    """Subcommands that all take `-v/--verbose` too, so it may come before or after the command."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser = super().add_parser(name, **kwargs)
        # SUPPRESS: given only before the command, the top-level value stands.
        parser.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
        parser.register("action", "parsers", _Subcommands)
        return parser


VERBOSE_HELP = "show Ray's and the libraries' INFO lines on the console too"
# Commands whose full log (INFO and above, Ray's included) goes to a file of their own.
LOGGED_COMMANDS = ("demo", "train", "tag", "clips", "evaluate", "bench", "make-corpus")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="reelflow", description="Batch video analytics on Ray.")
    parser.register("action", "parsers", _Subcommands)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("probe", help="print one JSON object of stream facts per video")
    p.add_argument("uris", nargs="+", metavar="URI", help="video files, folders or s3:// URIs")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per video")
    p.add_argument("--strict", action="store_true", help="exit 1 when any video is unreadable")
    p.set_defaults(func=commands.run_probe)

    p = sub.add_parser("make-corpus", help="write a synthetic labelled corpus of real H.264/AAC videos")
    p.add_argument("out", help="folder or s3:// prefix")
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--broken", type=int, default=0, help="add this many unreadable files of different kinds")
    p.add_argument("--size", type=int, default=128, help="frame width and height in pixels")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per video")
    p.add_argument("--fps", type=int, default=15)
    p.add_argument("--subtitle-fraction", type=float, default=0.5, help="share of videos with a .srt sidecar")
    p.add_argument("--no-audio", action="store_true")
    p.add_argument("--workers", type=int, help="rendering processes (default: one per core)")
    p.set_defaults(func=commands.run_make_corpus)

    p = sub.add_parser("clips", help="decode a corpus into clip rows (Parquet) and error rows")
    p.add_argument("corpus", help="folder or s3:// prefix holding videos")
    p.add_argument("--out", required=True, help="folder or s3:// prefix for clips/, errors/ and partial/")
    p.add_argument("--clip-len", type=int, default=16, help="frames per clip")
    p.add_argument("--size", type=int, default=112, help="frame height and width, resized in the decoder")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--clips-per-video", type=int, help="N evenly spaced (or random) clips per video")
    group.add_argument("--stride", type=int, help="sliding windows every K output frames, covering the video")
    p.add_argument("--sampling", choices=("uniform", "sliding", "random"))
    p.add_argument("--fps", type=float, help="resample every video to this frame rate")
    p.add_argument("--seed", type=int, default=0, help="seed for random sampling")
    p.add_argument("--decoder", choices=("auto", "decord", "pyav"), default="auto")
    p.add_argument("--audio", action="store_true", help="add each clip's mono audio")
    p.add_argument("--subtitles", action="store_true", help="add each clip's subtitle text")
    p.set_defaults(func=commands.run_clips)

    p = sub.add_parser("bench", help="benchmarks that print ratios against a limit or a peer")
    p.add_argument("what", choices=("models", "decode", "train", "tag", "scale", "timeline"))
    p.add_argument("--batch-size", type=int, default=8, help="models: clips per forward pass")
    p.add_argument("--models", help="models: comma-separated names")
    p.add_argument("--threads", type=int, help="models: torch threads (default: torch's own)")
    p.add_argument("--corpus", help="decode, tag: an existing corpus instead of a generated one")
    p.add_argument("--videos", type=int, help="decode, tag: videos in the generated corpus")
    p.add_argument("--heights", help="decode: frame heights to generate, comma-separated (360,720,1080)")
    p.add_argument("--clips", type=int, help="train: pre-decoded clips per epoch")
    p.add_argument("--workers", type=int, help="train: Ray Train workers (1 torch thread each)")
    p.add_argument(
        "--gpu", action="store_true",
        help="train: one GPU per worker, and for the plain loop; tag: inference actors on GPUs",
    )  # fmt: skip
    p.add_argument("--objects", type=int, help="scale: listed objects N of the smaller catalog (then 10×N)")
    p.set_defaults(func=commands.run_bench)

    p = sub.add_parser("train", help="train a model with Ray Train, tracked and registered in MLflow")
    p.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any field, e.g. optim.epochs=4")
    p.set_defaults(func=commands.run_train)

    p = sub.add_parser("demo", help="the main job on the embedded default, all state in one folder")
    p.add_argument("--workdir", default="reelflow-demo", help="folder holding every artefact of the demo")
    p.add_argument("--videos", type=int, default=160, help="labelled videos in the generated corpus")
    p.add_argument("--epochs", type=int, help="training epochs (default: jobs/configs/demo.yaml's)")
    p.add_argument("--date", help="the night to tag, YYYY-MM-DD (default: today, UTC)")
    p.set_defaults(func=commands.run_demo)

    p = sub.add_parser("query", help="SQL over the committed tables (DuckDB views named after the tables)")
    p.add_argument("sql", help="SQL over videos, classifications, actions, sentiment, highlights, errors")
    p.add_argument("--tables", required=True, help="folder or s3:// prefix holding the tables")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table")
    p.add_argument("--out", help="write the result to this file or s3:// URI instead of printing it")
    p.add_argument("--as-of", metavar="DATE|RUN_ID", help="the tables as an earlier run (or night) left them")
    p.add_argument("--memory-limit", metavar="SIZE", help="DuckDB's memory limit, e.g. 4GB")
    p.add_argument("--timeout", type=float, metavar="S", help="cancel the query after S seconds")
    p.set_defaults(func=commands.run_query)

    p = sub.add_parser("report", help="the morning reports over the committed tables")
    reports = p.add_subparsers(dest="report", required=True)
    tables_help = "folder or s3:// prefix of the tables (default: $REELFLOW_TABLES or reelflow-demo/tables)"
    r = reports.add_parser("daily", help="label counts, top videos per label, sentiment mix, errors by type")
    r.add_argument("--date", help="YYYY-MM-DD (default: the latest night)")
    r.add_argument("--tables", help=tables_help)
    r.add_argument("--plot", metavar="FILE.png", help="also write the report as a PNG chart")
    r.add_argument("--top", type=int, default=3, help="videos listed per label")
    r.set_defaults(func=commands.run_report)
    r = reports.add_parser("trend", help="one label's counts per night")
    r.add_argument("--label", required=True)
    r.add_argument("--tables", help=tables_help)
    r.add_argument("--plot", metavar="FILE.png", help="also write the trend as a PNG chart")
    r.add_argument("--model", help="only this model_name's predictions")
    r.set_defaults(func=commands.run_report)
    p = sub.add_parser("tag", help="the nightly job: tag new videos with every model head into the tables")
    p.add_argument("--corpus", required=True, help="folder or s3:// prefix holding videos")
    model_help = "models:/NAME/VERSION or models:/NAME@ALIAS (repeatable)"
    p.add_argument("--model", required=True, action="append", help=model_help)
    p.add_argument("--tables", required=True, help="folder or s3:// prefix of the tables")
    p.add_argument("--date", required=True, help="the night's run_date, YYYY-MM-DD")
    p.add_argument("--full", action="store_true", help="tag every video again, not only new ones")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--stride", type=int, help="frames between window starts (default: the clip length)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per inference batch")
    p.add_argument(
        "--actors", type=actor_range, metavar="MIN:MAX",
        help="predict in an actor pool that starts with MIN actors and grows to MAX while busy (N: 1 to N); "
        "by default GPUs get up to one actor each, and on CPU the decode tasks predict what they decode",
    )  # fmt: skip
    p.add_argument(
        "--gpus", choices=("auto", "true", "false"), default="auto",
        help="inference on GPUs: auto (if the cluster has GPUs now), true (request them, so an autoscaler "
        "adds GPU nodes), false",
    )  # fmt: skip
    p.add_argument("--strict", action="store_true", help="exit 1 when any video failed")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    p.add_argument("--commit-every", type=int, default=10_000, metavar="N", help="videos per committed chunk")
    p.add_argument(
        "--commit-minutes", type=float, metavar="M",
        help="also size chunks to commit about every M minutes (by the rate measured so far)",
    )  # fmt: skip
    p.add_argument("--max-videos", type=int, metavar="N", help="tag at most N videos tonight (default: all)")
    p.add_argument(
        "--lease-wait", type=float, metavar="S",
        help="seconds to wait for another run's lease on the tables (default: its TTL and a quarter)",
    )  # fmt: skip
    p.add_argument("--lease-ttl", type=float, metavar="S", help="this run's lease TTL (default: 120)")
    p.add_argument(
        "--max-attempts", type=int, default=3, metavar="N",
        help="retry a transient error (storage I/O, decoder killed) until it has failed N times",
    )  # fmt: skip
    p.add_argument(
        "--retry-errors", action="store_true", help="retry every error row, permanent ones too"
    )  # fmt: skip
    p.set_defaults(func=commands.run_tag)

    p = sub.add_parser("tables", help="operate the tables: history, check, repair, maintenance, purge")
    ops = p.add_subparsers(dest="operation", required=True)
    operations = {
        "history": "list the runs: night, models, chunks, rows per table, start, end, status",
        "check": "verify the tables open, the run log's versions exist, no key is duplicated (exit 1 if not)",
        "repair": "mend what check reports: half-committed chunks, duplicated keys, missing files",
        "optimize": "compact each night's small files",
        "vacuum": "delete files that no version within the retention period reads",
        "purge": "delete a source's rows from every table (takedowns, privacy requests)",
        "migrate": "convert tables of the previous format to Delta Lake, in place",
    }
    for operation, text in operations.items():
        r = ops.add_parser(operation, help=text)
        r.add_argument("uri", help="folder or s3:// prefix of the tables")
        if operation == "history":
            r.add_argument("--format", choices=("table", "csv", "json"), default="table")
        else:
            r.add_argument("--lease-wait", type=float, metavar="S", help="seconds to wait for a running job")
        if operation == "vacuum":
            r.add_argument("--retain", default="7d", help="keep what versions this recent read (7d, 36h)")
        if operation == "optimize":
            r.add_argument("--target-size", type=int, metavar="MB", help="size of the compacted files")
        if operation == "purge":
            r.add_argument("--uri", dest="uri_pattern", required=True, metavar="PATTERN",
                           help="the source's URI, or a glob (* and ?) over source URIs")  # fmt: skip
        r.set_defaults(func=commands.run_tables)

    p = sub.add_parser("evaluate", help="score a registered model on labelled videos; last line is JSON")
    p.add_argument("--model", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--corpus", required=True, help="folder or s3:// prefix holding the videos")
    p.add_argument("--labels", help="labels manifest (default: CORPUS/labels.parquet)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--split", choices=["train", "val", "test", "all"],
                   help="split to score (default: test, else val, if the labels have splits)")  # fmt: skip
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    p.set_defaults(func=commands.run_evaluate)

    p = sub.add_parser("models", help="operate the registered models")
    ops = p.add_subparsers(dest="operation", required=True)
    r = ops.add_parser(
        "convert", help="re-register a version an older reelflow pickled as safetensors + JSON"
    )
    r.add_argument("model", metavar="MODEL_URI", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    r.set_defaults(func=commands.run_models)

    p = sub.add_parser("import-labels", help="write a corpus's labels.parquet from a dataset's annotations")
    formats = ("folders", "ucf101", "kinetics", "activitynet", "tvsum", "table")  # flows.annotations.FORMATS
    p.add_argument("format", choices=formats, metavar="FORMAT", help="one of " + ", ".join(formats))
    p.add_argument(
        "src", metavar="SRC",
        help="the annotation file (ucf101: the folder of classInd.txt and the lists; folders: -)",
    )  # fmt: skip
    p.add_argument("--corpus", required=True, help="folder or s3:// prefix holding the videos")
    p.add_argument("--split", type=int, choices=(1, 2, 3), help="ucf101: which split's lists (default 1)")
    p.set_defaults(func=commands.run_import_labels)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `reelflow` console command."""
    from jobs import output
    from jobs.runtime import choose_local_auth

    args = build_parser().parse_args(argv)
    logged = args.command in LOGGED_COMMANDS
    if logged:
        choose_local_auth()
    log_dir = Path(args.workdir, "logs") if args.command == "demo" else None
    log_file = output.setup(args.command, args.verbose, log_file=logged, log_dir=log_dir)
    if log_file is not None:
        # Shown with the job's first line: a command that fails on its arguments prints its one error line.
        output.console.preamble = f"full log: {log_file}"
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        from flows.storage import redact

        message = f"reelflow {args.command}: error: {redact(str(err))}"  # never a secret
        print(message, file=sys.stderr)
        output.log_line(message)
        return 2
    except RuntimeError as err:
        if not getattr(err, "temporary", False):
            raise
        # The tables' lease was held, or lost: the run holding them (or the one that took them over)
        # finishes the work, and the next run continues from what is committed.
        print(f"reelflow {args.command}: {err}", file=sys.stderr)
        output.log_line(f"reelflow {args.command}: {err}")
        return EXIT_TEMPORARY


if __name__ == "__main__":
    sys.exit(main())
