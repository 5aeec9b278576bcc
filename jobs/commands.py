"""What each `reelflow` subcommand runs: its parsed arguments → the job's config → the job (`jobs.cli` parses
them). Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import json
import sys


def run_probe(args: argparse.Namespace) -> int:
    """`reelflow probe`: one JSON line of stream facts per video."""
    from flows import storage
    from flows.isolation import shared_runner
    from flows.media import VideoError

    def probe_one(uri: str) -> dict:
        out: dict = {"uri": uri, "ok": False, "error": None}
        try:
            with storage.local_copy(uri) as path:
                (info,) = list(shared_runner().iter(_probe_in_child, path, timeout_s=args.timeout))
            out.update(ok=True, **{k: getattr(info, k) for k in PROBE_FIELDS})
        except VideoError as err:
            out["error"] = f"{err.error_type}: {err.message}"
        except OSError as err:
            out["error"] = f"{type(err).__name__}: {err}"
        return out

    failed = 0
    for uri in args.uris:
        targets = [obj.uri for obj in storage.list_videos(uri)] if storage.is_dir(uri) else [uri]
        for target in targets:
            row = probe_one(target)
            failed += not row["ok"]
            print(json.dumps(row), flush=True)
    return 1 if failed and args.strict else 0


PROBE_FIELDS = (
    "container", "video_codec", "width", "height", "rotation", "fps",
    "n_frames", "duration_s", "has_audio", "audio_sample_rate",
)  # fmt: skip


def _probe_in_child(path: str):
    from flows.probe import probe

    yield probe(path)


def run_make_corpus(args: argparse.Namespace) -> int:
    """`reelflow make-corpus`: a synthetic labelled corpus."""
    from jobs import make_corpus

    config = make_corpus.CorpusConfig(
        out=args.out,
        videos=args.videos,
        seed=args.seed,
        broken=args.broken,
        size=args.size,
        duration_s=args.duration,
        fps=args.fps,
        audio=not args.no_audio,
        subtitle_fraction=args.subtitle_fraction,
        workers=args.workers,
    )
    print(make_corpus.main(config))
    return 0


def _clip_config(args: argparse.Namespace):
    from flows.clips import ClipConfig

    sampling = args.sampling or ("sliding" if args.stride else "uniform")
    return ClipConfig(
        clip_len=args.clip_len,
        size=(args.size, args.size),
        sampling=sampling,
        clips_per_video=args.clips_per_video or 4,
        stride=args.stride,
        target_fps=args.fps,
        seed=args.seed,
        decoder=args.decoder,
        audio=args.audio,
        subtitles=args.subtitles,
    )


def run_clips(args: argparse.Namespace) -> int:
    """`reelflow clips`: a corpus decoded into clip rows; 1 when no video gave a clip."""
    from jobs import clips

    summary = clips.main(clips.ClipsJobConfig(corpus=args.corpus, out=args.out, clips=_clip_config(args)))
    return 0 if summary.clips or not summary.videos else 1


def run_bench(args: argparse.Namespace) -> int:
    """`reelflow bench WHAT`: one benchmark, its ratios printed (and recorded)."""
    if args.what == "scale":
        from jobs import bench_scale

        bench_scale.main(bench_scale.BenchScaleConfig(**({"objects": args.objects} if args.objects else {})))
    elif args.what == "tag":
        from flows.predict import PredictConfig
        from jobs import bench_tag

        kwargs = {"videos": args.videos} if args.videos else {}
        predict = PredictConfig(use_gpu=True) if args.gpu else PredictConfig()
        bench_tag.main(bench_tag.BenchTagConfig(corpus=args.corpus, predict=predict, **kwargs))
    elif args.what == "train":
        from jobs import bench_train

        kwargs = {k: getattr(args, k) for k in ("clips", "workers") if getattr(args, k)}
        bench_train.main(bench_train.BenchTrainConfig(use_gpu=args.gpu, **kwargs))
    elif args.what == "timeline":
        from jobs import bench_timeline

        bench_timeline.main(bench_timeline.BenchTimelineConfig())
    elif args.what == "models":
        from jobs import bench_models

        kwargs = {"batch_size": args.batch_size, "threads": args.threads}
        if args.models:
            kwargs["models"] = tuple(args.models.split(","))
        bench_models.main(bench_models.BenchModelsConfig(**kwargs))
    else:
        from jobs import bench_decode

        kwargs: dict[str, object] = {"videos": args.videos} if args.videos else {}
        if args.heights:
            kwargs["heights"] = tuple(int(h) for h in args.heights.split(","))
        bench_decode.main(bench_decode.BenchDecodeConfig(corpus=args.corpus, **kwargs))
    return 0


def run_train(args: argparse.Namespace) -> int:
    """`reelflow train`: fit, register and print the model URI last; 1 when training failed."""
    from ray.train import TrainingFailedError

    from jobs import train
    from jobs.config import load_config

    config = load_config(train.TrainConfig, args.config, args.overrides)
    try:
        result = train.main(config)
    except TrainingFailedError as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        print(
            f"reelflow train: error: {first} (re-run the same command to resume from the last checkpoint)",
            file=sys.stderr,
        )
        return 1
    print(result.model_uri, flush=True)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """`reelflow demo`: the main job on the embedded default."""
    from jobs import demo

    demo.main(demo.DemoConfig(workdir=args.workdir, videos=args.videos, epochs=args.epochs, date=args.date))
    return 0


def run_query(args: argparse.Namespace) -> int:
    """`reelflow query`: SQL over the committed tables."""
    from jobs import query

    read = query.ReadOptions(as_of=args.as_of, memory_limit=args.memory_limit, timeout_s=args.timeout)
    config = query.QueryConfig(sql=args.sql, tables=args.tables, format=args.format, out=args.out, read=read)
    query.main(config)
    return 0


def run_report(args: argparse.Namespace) -> int:
    """`reelflow report daily|trend`: the morning reports."""
    from jobs import query, report

    tables = args.tables or query.DEFAULT_TABLES
    if args.report == "daily":
        config = report.DailyReportConfig(tables=tables, date=args.date, plot=args.plot, top=args.top)
        report.daily_report(config)
    else:
        report.trend_report(
            report.TrendReportConfig(label=args.label, tables=tables, plot=args.plot, model=args.model)
        )
    return 0


def run_tag(args: argparse.Namespace) -> int:
    """`reelflow tag`: the nightly job; 1 with `--strict` when a video failed."""
    from flows.predict import PredictConfig
    from jobs import tag

    fewest, most = args.actors or (1, None)
    gpus = {"auto": None, "true": True, "false": False}[args.gpus]
    predict = PredictConfig(
        batch_size=args.batch_size, concurrency=most, min_actors=fewest, use_gpu=gpus,
        in_decode_tasks=False if args.actors else None,
    )  # fmt: skip
    lease = {"lease_ttl_s": args.lease_ttl} if args.lease_ttl is not None else {}
    config = tag.TagConfig(
        corpus=args.corpus,
        models=tuple(args.model),
        tables=args.tables,
        date=args.date,
        full=args.full,
        tracking_uri=args.tracking_uri,
        stride=args.stride,
        predict=predict,
        commit_every=args.commit_every,
        lease_wait_s=args.lease_wait,
        max_attempts=args.max_attempts,
        retry_errors=args.retry_errors,
        max_videos=args.max_videos,
        commit_minutes=args.commit_minutes,
        trust_pickle=args.trust_pickle,
        **lease,
    )
    summary = tag.main(config)
    return 1 if summary.failed and args.strict else 0


def run_tables(args: argparse.Namespace) -> int:
    """`reelflow tables OPERATION`: operate the catalog."""
    from jobs import catalog

    config = catalog.CatalogConfig(
        operation=args.operation,
        tables=args.uri,
        lease_wait_s=getattr(args, "lease_wait", None),
        retain=getattr(args, "retain", "7d"),
        target_size_mb=getattr(args, "target_size", None),
        uri_pattern=getattr(args, "uri_pattern", None),
        format=getattr(args, "format", "table"),
    )
    return catalog.main(config)


def run_evaluate(args: argparse.Namespace) -> int:
    """`reelflow evaluate`: the metrics, the JSON line last."""
    from jobs import evaluate

    config = evaluate.EvaluateConfig(
        args.model, args.corpus, args.labels, args.tracking_uri, args.split, trust_pickle=args.trust_pickle
    )
    metrics = evaluate.main(config)
    evaluate.print_metrics(metrics)
    return 0


def run_models(args: argparse.Namespace) -> int:
    """`reelflow models convert`: re-register a pickled version safely."""
    from jobs import tracking
    from jobs.registered import DEFAULT_MLFLOW_DIR

    uri = tracking.tracking_uri(args.tracking_uri, DEFAULT_MLFLOW_DIR)
    print(tracking.convert_model(args.model, tracking_uri=uri))
    return 0


def run_import_labels(args: argparse.Namespace) -> int:
    """`reelflow import-labels`: a corpus's labels.parquet from annotations."""
    from jobs import import_labels

    config = import_labels.ImportLabelsConfig(
        format=args.format, src=args.src, corpus=args.corpus, split=args.split
    )
    import_labels.main(config)
    return 0
