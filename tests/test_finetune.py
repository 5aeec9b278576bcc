"""Fine-tuning pretrained backbones end to end: a tiny random VideoMAE saved in the Hugging Face layout on S3
(moto) and a C3D with Sports-1M-layout weights, trained with Ray Train (heads-only epochs first), registered,
reloaded from MLflow without the pretrained files, and tagged the same before and after the round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch

from flows import tables as tables_lib
from flows.clips import ClipConfig, iter_video_clips, list_video_rows
from flows.predict import ClipPredictor
from jobs import tag, tracking, train
from jobs.config import ConfigError, load_config
from models import build, load_model
from models.c3d import SPORTS1M_LAYERS

CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"
DEMO = CONFIGS / "demo.yaml"
VIDEOMAE = {"image_size": 32, "patch_size": 8, "num_channels": 3, "num_frames": 4, "tubelet_size": 2,
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "use_mean_pooling": True}  # fmt: skip
PREPROCESSOR = {"image_mean": [0.45, 0.45, 0.45], "image_std": [0.225, 0.225, 0.225],
                "crop_size": {"height": 32, "width": 32}}  # fmt: skip
SMALL_DATA = (
    "data.clips_per_video=2", "data.val_clips_per_video=1", "data.batch_size=8", "data.shuffle_buffer=16",
    "tasks.action_steps=0", "optim.epochs=2", "finetune.freeze_backbone_epochs=1", "mlflow.evaluate=false",
    "keep_checkpoints=2",
)  # fmt: skip


def overrides(corpus: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        f"corpus={corpus}", f"storage={runs}", f"run_name={name}",
        f"mlflow.tracking_uri=sqlite:///{runs}/mlflow.db", f"model.registered_name=test-{name}",
        *SMALL_DATA, *extra,
    ]  # fmt: skip


def epoch_models(runs: Path, name: str) -> list[torch.nn.Module]:
    """The model of each epoch's checkpoint, oldest first."""
    files = sorted((runs / name).glob("epoch_*/model.pt"))
    assert len(files) == 2, files
    return [load_model(f) for f in files]


def some_clips(corpus: Path, clip_len: int, size: int) -> dict[str, np.ndarray]:
    """A tag-path batch: real clips of the corpus's first two readable videos."""
    config = ClipConfig(clip_len=clip_len, size=(size, size), sampling="uniform", clips_per_video=2)
    frames = []
    for row in list_video_rows(str(corpus)):
        try:
            frames += [clip["frames"] for clip in iter_video_clips(row, config)]
        except Exception:
            continue
        if len(frames) >= 4:
            break
    return {"frames": np.stack(frames[:4]), "video_id": np.array([f"v{i}" for i in range(4)])}


def assert_same_predictions(a: torch.nn.Module, b: torch.nn.Module, batch: dict[str, np.ndarray]) -> None:
    """The tag job's inference actor (fused for inference) gives the same columns with either model."""
    out_a = ClipPredictor([lambda: a])(dict(batch))
    out_b = ClipPredictor([lambda: b])(dict(batch))
    heads = [k for k in out_a if k.startswith("m0")]
    assert heads and sorted(heads) == sorted(k for k in out_b if k.startswith("m0"))
    for key in heads:
        np.testing.assert_array_equal(out_a[key], out_b[key], err_msg=key)


def assert_backbone(a: torch.nn.Module, b: torch.nn.Module, equal: bool) -> None:
    sa, sb = a.backbone.state_dict(), b.backbone.state_dict()
    assert sa.keys() == sb.keys()
    same = [torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point()]
    assert all(same) if equal else not all(same)


def test_every_shipped_train_config_loads() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config(train.TrainConfig, path, ["corpus=s3://bucket/videos"])
        assert config.optim.epochs >= 1, path.name
    finetune = load_config(train.TrainConfig, CONFIGS / "finetune.yaml", [])
    assert finetune.model.backbone == "videomae" and finetune.finetune.layer_decay < 1


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["finetune.pretrained=/models/x"], "finetune.pretrained"),  # the demo's CNN-LSTM has no pretrained
        (["finetune.freeze_backbone_epochs=8"], "finetune.freeze_backbone_epochs"),
        (["finetune.gradient_checkpointing=true"], "finetune.gradient_checkpointing"),
        (["finetune.layer_decay=0"], "finetune.layer_decay"),
        (["model.name=sentiment", "tasks.action_steps=0", "finetune.backbone_lr_ratio=0.1"], "finetune"),
    ],
)
def test_finetune_options_are_checked(extra: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config key '{key}': "):
        load_config(train.TrainConfig, DEMO, ["corpus=/c", *extra])


@pytest.fixture(scope="module")
def videomae_on_s3(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny random VideoMAE (save_pretrained + preprocessor_config.json) uploaded to the moto server."""
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("videomae") / "videomae-tiny"
    VideoMAEModel(VideoMAEConfig(**VIDEOMAE)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists("pretrained-models"):
        fs.mkdir("pretrained-models")
    fs.put(str(folder), "pretrained-models/", recursive=True)
    return "s3://pretrained-models/videomae-tiny", folder


@pytest.mark.slow
def test_videomae_fine_tunes_registers_and_tags_the_same_after_the_round_trip(
    small_corpus: Path,
    local_corpus: Path,
    ray_session: None,
    videomae_on_s3: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, folder = videomae_on_s3
    monkeypatch.setenv("REELFLOW_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    config = load_config(train.TrainConfig, DEMO, overrides(small_corpus, runs, "videomae", *(
        "model.backbone=videomae", "model.clip_len=4", "model.frame_size=[32, 32]", "model.kwargs={}",
        f"finetune.pretrained={uri}", "finetune.layer_decay=0.5", "finetune.backbone_lr_ratio=0.5",
    )))  # fmt: skip
    result = train.main(config)

    # The heads-only epoch left the pretrained backbone as it was; the next one trained it.
    frozen, tuned = epoch_models(runs, "videomae")
    pretrained = build("multitask", backbone="videomae", heads={"category": ["a", "b"]}, pretrained=folder)
    assert_backbone(frozen, pretrained, equal=True)
    assert_backbone(tuned, frozen, equal=False)
    assert tuned.spec.source == uri and tuned.spec.mean == (0.45, 0.45, 0.45)

    # Registered, then loaded with neither the S3 folder nor its local copy nor the hub around.
    shutil.rmtree(tmp_path / "cache")
    s3fs.S3FileSystem(skip_instance_cache=True).rm(uri, recursive=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded, spec, _ = tracking.load_model(result.model_uri, tracking_uri=result.tracking_uri)
    assert spec["source"] == uri and spec["clip_len"] == 4
    assert_same_predictions(tuned, loaded, some_clips(small_corpus, 4, 32))

    # And the nightly job tags with it.
    tables = tmp_path / "tables"
    summary = tag.main(tag.TagConfig(corpus=str(local_corpus), models=(result.model_uri,), tables=str(tables),
                                     date="2026-12-06", tracking_uri=result.tracking_uri))  # fmt: skip
    assert summary.tagged == 6 and summary.failed == 2
    labels = [r["label"] for r in tables_lib.read_table(str(tables), "classifications").to_pylist()]
    assert labels and set(labels) <= set(spec["heads"]["category"]) | set(spec["heads"]["action"])


def sports1m_layout(kwargs: dict, classes: int) -> dict[str, torch.Tensor]:
    """Weights under the Sports-1M C3D port's names (conv1 … fc7, fc8) for a C3D built with `kwargs`."""
    torch.manual_seed(5)
    c3d = build("c3d_small", num_classes=classes, **kwargs)
    state = c3d.state_dict()
    out = {
        f"{layer}.{p}": state[f"{layer}.{p}"] for layer in SPORTS1M_LAYERS[:-1] for p in ("weight", "bias")
    }
    out["fc8.weight"] = torch.randn(classes, kwargs["fc_dim"])
    out["fc8.bias"] = torch.zeros(classes)
    return out


@pytest.mark.slow
def test_c3d_fine_tunes_from_sports1m_weights(small_corpus: Path, ray_session: None, tmp_path: Path) -> None:
    kwargs = {"channels": [4, 8, 8, 8, 8], "fc_dim": 16, "batch_norm": False, "frame_size": [32, 32]}
    weights = sports1m_layout(kwargs, classes=487)
    weights_file = tmp_path / "c3d-sports1m.pt"
    torch.save(weights, weights_file)
    runs = tmp_path / "runs"
    config = load_config(train.TrainConfig, DEMO, overrides(small_corpus, runs, "c3d", *(
        "model.backbone=c3d_small", "model.frame_size=[32, 32]", "model.kwargs={channels: [4, 8, 8, 8, 8], "
        "fc_dim: 16, batch_norm: false}", f"finetune.pretrained={weights_file}",
    )))  # fmt: skip
    result = train.main(config)

    frozen, tuned = epoch_models(runs, "c3d")
    for model, equal in ((frozen, True), (tuned, False)):
        ours = model.backbone.state_dict()
        same = [torch.equal(ours[k], v) for k, v in weights.items() if not k.startswith("fc8.")]
        assert all(same) if equal else not all(same)
    loaded, spec, _ = tracking.load_model(result.model_uri, tracking_uri=result.tracking_uri)
    assert spec["source"] == str(weights_file)
    assert_same_predictions(tuned, loaded, some_clips(small_corpus, 16, 32))


def test_a_pretrained_file_that_is_not_weights_is_a_config_error(small_corpus: Path, tmp_path: Path) -> None:
    bad = tmp_path / "c3d.pt"
    bad.write_bytes(b"not a checkpoint")
    config = load_config(train.TrainConfig, DEMO, overrides(small_corpus, tmp_path, "bad", *(
        "model.backbone=c3d_small", "model.kwargs={batch_norm: false}", f"finetune.pretrained={bad}",
    )))  # fmt: skip
    with pytest.raises(ConfigError, match=rf"^config key 'finetune.pretrained': {bad}: cannot read weights"):
        train.plan_run(config)


def test_optimizer_groups_scale_the_backbone_and_freeze_it(videomae_on_s3: tuple[str, Path]) -> None:
    from jobs.train import loop
    from jobs.train.config import FinetuneSection, OptimSection

    _, folder = videomae_on_s3
    model = build("multitask", backbone="videomae", heads={"category": ["a", "b"]}, pretrained=folder)
    optim = OptimSection(lr=1e-3, epochs=2, warmup_epochs=0, min_lr_ratio=1.0)
    finetune = FinetuneSection(backbone_lr_ratio=0.5, layer_decay=0.8)
    optimizer = loop.make_optimizer(model, optim, finetune)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    scale = {name: group_of[id(p)]["lr_scale"] for name, p in model.named_parameters()}
    layers = model.backbone.num_layers  # 2: embeddings 0, layers 1-2, the final norm 3
    assert scale["heads.layers.category.weight"] == 1.0
    assert scale["backbone.fc_norm.weight"] == pytest.approx(0.5)
    assert scale["backbone.transformer.encoder.layer.1.output.dense.weight"] == pytest.approx(0.5 * 0.8)
    assert scale["backbone.transformer.encoder.layer.0.output.dense.weight"] == pytest.approx(0.5 * 0.8**2)
    assert scale["backbone.transformer.embeddings.patch_embeddings.projection.weight"] == pytest.approx(
        0.5 * 0.8 ** (layers + 1)
    )
    # The schedule's rate times each group's scale; a frozen backbone's groups get none.
    schedule, state = loop.Schedule(optim, steps_per_epoch=10), loop.TrainState(backbone_frozen=True)
    model.freeze_backbone()
    model(torch.randn(2, 3, 4, 32, 32)).get("category").sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    loop._step(model, optimizer, schedule, state, clip=None)
    assert {g["lr"] for g in optimizer.param_groups if g["backbone"]} == {0.0}
    assert [g["lr"] for g in optimizer.param_groups if not g["backbone"]] == pytest.approx([1e-3, 1e-3])
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
