"""Session-wide real components: a moto S3 server on loopback, one local Ray, the shared real videos."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_VIDEOS = REPO.parent / "shared" / "videos"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # the server answers, even if not 200
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# S3 keys that trip listings: double and leading slashes, spaces, unicode, `=`, very long, URL syntax.
ODD_KEYS = [
    "odd/a//b.mp4", "odd//lead.mp4", "odd/with space.mp4", "odd/ünïcødé.mp4", "odd/run_date=2024/x.mp4",
    "odd/" + "l" * 900 + ".mp4", "odd/pct%20x.mp4", "odd/q?x#y.mp4", "/top.mp4",
]  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def job_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the commands run by the tests write their log files: a temporary folder, not the home folder."""
    folder = tmp_path_factory.mktemp("job-logs")
    os.environ["REELFLOW_LOG_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """The real clips of ../shared/videos (read-only)."""
    if not (SHARED_VIDEOS / "MANIFEST.tsv").exists():
        pytest.fail(f"missing {SHARED_VIDEOS}/MANIFEST.tsv: tests expect ../shared beside the repository")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def manifest(shared_videos: Path) -> list[dict[str, str]]:
    """MANIFEST.tsv rows: what PyAV 18.1 reported for each real clip."""
    with open(shared_videos / "MANIFEST.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@contextlib.contextmanager
def moto_server(**env: str) -> Iterator[str]:
    """A moto S3 server process on 127.0.0.1; yields its endpoint URL and stops it afterwards."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    try:
        wait_for_http(endpoint)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-protocol server (moto in server mode) on 127.0.0.1; yields its endpoint URL.

    Credentials and the endpoint go into the environment, the way users configure MinIO or any
    S3-compatible store, so the code under test takes the standard AWS chain.
    """
    saved = {k: os.environ.get(k) for k in S3_ENV}
    with moto_server() as endpoint:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing-key-id",
            AWS_SECRET_ACCESS_KEY="testing-secret-key",
            AWS_DEFAULT_REGION="us-east-1",
        )
        try:
            yield endpoint
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def strict_s3_server() -> Iterator[str]:
    """A second moto server that checks credentials: every key is unknown to it."""
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as endpoint:
        yield endpoint


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the moto server; yields `s3://NAME`."""
    import s3fs

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def tables_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A tables location: a local folder, or a prefix in a fresh bucket on the S3 protocol server."""
    if request.param == "local":
        return str(tmp_path / "tables")
    return request.getfixturevalue("s3_bucket") + "/warehouse/tables"


class Killed(BaseException):
    """What `cut_off_at` raises: like a killed driver, not an error the code under test may handle."""


@pytest.fixture
def cut_off_at(monkeypatch: pytest.MonkeyPatch):
    """`cut_off_at(step)`: the table writer stops with `Killed` on reaching that step of its protocol
    (`cut_off_at(None)` lets it run again)."""
    from flows import table_writer

    real = table_writer._step

    def arm(step: str | None) -> None:
        def hook(name: str) -> None:
            real(name)
            if name == step:
                raise Killed(step)

        monkeypatch.setattr(table_writer, "_step", hook)

    return arm


@pytest.fixture(scope="session")
def ray_session(s3_server: str) -> Iterator[None]:
    """One local Ray instance for the whole test session (Ray takes seconds to start).

    It starts after the S3 server so its workers inherit the S3 endpoint and credentials.
    """
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {k: os.environ[k] for k in S3_ENV}},
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_session: None) -> str:
    """The address of the session's Ray instance, for drivers in other processes (`RAY_ADDRESS`)."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (`mlflow server`) on 127.0.0.1; yields its URI `http://127.0.0.1:PORT`.

    Runs and the model registry live in a SQLite file and artifacts in a folder, both in a tmp dir; the
    server proxies artifacts (`--artifacts-destination`), so clients need no access to that folder.
    """
    import contextlib
    import signal

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # No background job runner (a second process, for GenAI evaluation jobs): runs need none.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer on {uri} within 120 s (log: {log_path})")
            time.sleep(0.25)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        # The server runs uvicorn as a child in its own session: end anything left of that session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated labelled corpus shared by the training and tagging tests: 30 videos (every category ×
    sentiment twice) of 64×64 px, 6 s at 15 fps with AAC audio, plus 2 unreadable files; `labels.parquet`
    sits at its root."""
    from jobs.make_corpus import CorpusConfig
    from jobs.make_corpus import main as make_corpus

    out = tmp_path_factory.mktemp("small-corpus")
    make_corpus(CorpusConfig(out=str(out), videos=30, seed=11, broken=2, size=64, duration_s=6.0,
                             fps=15, progress=False))  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tagging_model(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A small multitask CNN-LSTM (64×64, 16 frames at 15 fps, every head of the corpus's label set), fitted
    for a few epochs on the small corpus's clips and registered in a SQLite MLflow store.

    Yields (model URI `models:/tagger/1`, tracking URI). Fitted in-process with a plain torch loop, so the
    tagging and evaluation tests do not depend on the training job.
    """
    import numpy as np
    import torch

    from flows import labels as flabels
    from flows.clips import ClipConfig, iter_video_clips, list_video_rows
    from jobs import tracking
    from models import build, head_loss

    manifest = flabels.read_manifest(str(small_corpus / flabels.LABELS_FILE))
    label_set = manifest.labels
    heads = {"category": label_set.categories, "action": label_set.actions,
             "sentiment": label_set.sentiments, "valence": (), "importance": ()}  # fmt: skip
    torch.manual_seed(0)
    model = build("multitask", backbone="cnn_lstm", heads={k: list(v) for k, v in heads.items()},
                  step_heads=["action"], clip_len=16, frame_size=[64, 64], fps=15.0,
                  channels=[8, 16, 32, 64], hidden=64)  # fmt: skip
    config = ClipConfig(clip_len=16, size=(64, 64), sampling="sliding", target_fps=15.0)
    frames: list = []
    names = ("category", "sentiment", "valence", "action_steps", "importance")
    targets: dict[str, list] = {k: [] for k in names}
    index = label_set.index()
    for row in list_video_rows(str(small_corpus)):
        file = flabels.relative_file(row.uri, str(small_corpus))
        if file not in manifest.videos:
            continue
        video = manifest.videos[file]
        with contextlib.suppress(Exception):  # the broken files
            for clip in iter_video_clips(row, config):
                times = flabels.frame_times(clip["start_s"], clip["end_s"], clip["frames"].shape[0])
                actions, importance = flabels.step_targets(video, times, label_set)
                frames.append(clip["frames"])
                targets["category"].append(index["category"][video.category])
                targets["sentiment"].append(index["sentiment"][video.sentiment])
                targets["valence"].append(video.valence)
                targets["action_steps"].append(actions)
                targets["importance"].append(float(importance.mean()))
    x_all = np.stack(frames)
    t_all = {
        "category": torch.tensor(targets["category"]),
        "sentiment": torch.tensor(targets["sentiment"]),
        "valence": torch.tensor(targets["valence"], dtype=torch.float32),
        "action_steps": torch.tensor(np.stack(targets["action_steps"])),
        "importance": torch.tensor(targets["importance"], dtype=torch.float32),
    }
    t_all["action"] = flabels.clip_action(t_all["action_steps"], label_set.background)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        for batch in torch.randperm(len(x_all), generator=gen).split(16):
            outputs = model(model.spec.prepare(x_all[batch.numpy()]))
            loss = head_loss(outputs, {k: v[batch] for k, v in t_all.items()}, model.spec)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()

    uri = f"sqlite:///{tmp_path_factory.mktemp('tag-mlflow') / 'mlflow.db'}"
    run_id = tracking.get_or_create_run("tests-tag", "tagging-model", "tagging-model", tracking_uri=uri)
    model_uri = tracking.log_model(model, model.spec, "tagger", "candidate", run_id=run_id, tracking_uri=uri)
    tracking.finish_run(run_id, tracking_uri=uri)
    return model_uri, uri


@pytest.fixture(scope="session")
def local_corpus(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 labelled videos of the small corpus with its 2 broken files, in a folder (tests only read it)."""
    return copy_corpus(small_corpus, tmp_path_factory.mktemp("local-corpus") / "c", 6)


def copy_corpus(src: Path, dst: Path, n_videos: int, broken: bool = True) -> Path:
    """The first `n_videos` labelled videos of `src` (and its broken files) into `dst`, which may exist."""
    dst.mkdir(parents=True, exist_ok=True)
    from flows import labels as flabels
    from flows.clips import list_video_rows

    manifest = flabels.read_manifest(str(src / flabels.LABELS_FILE))
    files = sorted(manifest.videos)[:n_videos]
    if broken:
        files += [flabels.relative_file(r.uri, str(src)) for r in list_video_rows(str(src))
                  if flabels.relative_file(r.uri, str(src)) not in manifest.videos]  # fmt: skip
    for file in [*files, flabels.LABELS_FILE]:
        if not (dst / file).exists():
            (dst / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / file, dst / file)
    return dst


def load_module(path: Path) -> ModuleType:
    """A Python file that is not in a package (infra/local/stack.py) imported as a module."""
    spec = importlib.util.spec_from_file_location(f"infra_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def wait_for_job(client, job_id: str, timeout_s: float = 120.0) -> str:
    """Until a Ray job submitted through `client` ends; returns its status."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED}:  # fmt: skip
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout_s} s"
        time.sleep(1)
    return status
