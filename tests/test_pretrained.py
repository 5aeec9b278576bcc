"""Pretrained transformers: VideoMAE and TimeSformer backbones and a BERT text branch built from local
Hugging Face folders (tiny random models saved here, nothing downloaded), rebuilt without them, and fetched
from S3."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flows import storage
from flows.pretrained import fetch_pretrained
from models import build, load_model, save_model
from models.spec import ModelSpec

VIDEOMAE = {
    "image_size": 32, "patch_size": 8, "num_frames": 4, "tubelet_size": 2, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
}  # fmt: skip
TIMESFORMER = {
    "image_size": 32, "patch_size": 8, "num_frames": 4, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 64,
}  # fmt: skip
BERT = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "max_position_embeddings": 64,
}  # fmt: skip
PREPROCESSOR = {
    "image_mean": [0.5, 0.4, 0.3],
    "image_std": [0.2, 0.25, 0.3],
    "crop_size": {"height": 32, "width": 32},
}
HEADS = {"category": ["a", "b", "c"], "valence": []}
SENTENCES = [
    "what a great and happy movie", "this is sad and bad", "the cat sat on the mat", "happy happy joy joy",
    "a terrible boring film", "i loved every minute of it",
]  # fmt: skip
# A tiny sentiment model: the fusion and text branch are what these tests look at.
SMALL_SENTIMENT = {
    "clip_len": 16, "frame_size": [32, 32], "visual_dim": 16, "visual_channels": [4, 4, 4, 4, 4],
    "n_mels": 16, "audio_channels": [4], "dim": 32, "text_max_len": 16,
}  # fmt: skip


def hf_model(family: str, config: dict, kind: str = "Model") -> torch.nn.Module:
    """A randomly initialized transformers model, e.g. ("videomae", {...}, "ForVideoClassification")."""
    import transformers

    prefix = {"videomae": "VideoMAE", "timesformer": "Timesformer", "bert": "Bert"}[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{prefix}Config")(**config)
    return getattr(transformers, f"{prefix}{kind}")(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """{"videomae", "timesformer", "bert"}: (local folder as `save_pretrained` writes it, the model saved)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    root = tmp_path_factory.mktemp("pretrained")
    out = {}
    for family, config in (("videomae", VIDEOMAE), ("timesformer", TIMESFORMER)):
        out[family] = (root / family, hf_model(family, config))
        out[family][1].save_pretrained(root / family)
        (root / family / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(
        SENTENCES, trainers.WordPieceTrainer(vocab_size=120, special_tokens=special)
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    out["bert"] = (root / "bert", hf_model("bert", {**BERT, "vocab_size": tokenizer.get_vocab_size()}))
    out["bert"][1].save_pretrained(root / "bert")
    tokenizer.save(str(root / "bert" / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def folders(saved: dict[str, tuple[Path, torch.nn.Module]]) -> dict[str, Path]:
    return {family: folder for family, (folder, _) in saved.items()}


def clips(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def rebuilt(model: torch.nn.Module) -> torch.nn.Module:
    """The model built again from its JSON build_config (no pretrained folder), with its weights."""
    config = json.loads(json.dumps(model.build_config))
    again = build(config["name"], **config["kwargs"])
    again.load_state_dict(model.state_dict())
    return again.eval()


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, inputs: object) -> None:
    a.eval()
    with torch.no_grad():
        out_a, out_b = a(inputs), b(inputs)
    assert out_a.keys() == out_b.keys()
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key


# --- video transformers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["videomae", "timesformer"])
def test_builder_loads_the_folder_and_its_preprocessing(
    saved: dict[str, tuple[Path, torch.nn.Module]], family: str
) -> None:
    folder, original = saved[family]
    model = build(family, heads=HEADS, pretrained=folder, fps=10.0).eval()
    assert_same_weights(model.transformer.state_dict(), original.state_dict())
    spec = model.spec
    assert (spec.clip_len, spec.frame_size, spec.fps) == (4, (32, 32), 10.0)
    assert (spec.mean, spec.std) == (tuple(PREPROCESSOR["image_mean"]), tuple(PREPROCESSOR["image_std"]))
    assert spec.source == str(folder.resolve())

    out = model(clips(), with_features=True)
    assert (
        out["category"].shape == (2, 3) and out["valence"].shape == (2,) and out["features"].shape == (2, 32)
    )
    # VideoMAE pools the mean of its tokens, TimeSformer its final [CLS] token.
    with torch.no_grad():
        tokens = original(pixel_values=clips().transpose(1, 2)).last_hidden_state
    pooled = model.fc_norm(tokens.mean(1)) if family == "videomae" else tokens[:, 0]
    assert torch.allclose(out["features"], pooled, atol=1e-6)

    assert model.num_layers == 2
    names = [n for n, _ in model.named_parameters()]
    ids = {model.layer_id(n) for n in names}
    assert ids == {0, 1, 2, 3}
    assert model.layer_id(next(n for n in names if "embeddings" in n)) == 0
    assert model.layer_id("transformer.encoder.layer.1.output.dense.weight") == 2
    assert model.layer_id("heads.layers.category.weight") == 3


@pytest.mark.parametrize("family", ["videomae", "timesformer"])
def test_multitask_on_a_pretrained_backbone_rebuilds_without_the_folder(
    folders: dict[str, Path], family: str
) -> None:
    model = build("multitask", backbone=family, heads=HEADS, pretrained=folders[family])
    kwargs = model.build_config["kwargs"]
    assert "pretrained" not in kwargs
    assert kwargs["config"]["hidden_size"] == 32 and kwargs["source"] == str(folders[family].resolve())
    assert_same_outputs(model, rebuilt(model), clips(1))

    # A saved model loads without the folder, the spec's source and preprocessing with it.
    buffer = io.BytesIO()
    save_model(model, buffer)
    buffer.seek(0)
    loaded = load_model(buffer)
    assert loaded.spec == model.spec and loaded.spec.source == model.spec.source
    assert_same_outputs(model, loaded, clips(1))


def test_random_init_from_a_config_and_gradient_checkpointing() -> None:
    model = build("timesformer", num_classes=4, config=TIMESFORMER, gradient_checkpointing=True)
    assert model.spec.source is None and model.spec.frame_size == (32, 32)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.transformer.modules())
    model.train()
    model(clips())["category"].sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.build_config["kwargs"]["num_classes"] == 4
    assert_same_outputs(model, rebuilt(model), clips())
    with pytest.raises(ValueError, match="not 'videomae'"):
        build("videomae", config={**TIMESFORMER, "model_type": "timesformer"})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build("videomae", config=VIDEOMAE, frame_size=(36, 36))


@pytest.mark.parametrize(
    ("kind", "weights"), [("ForVideoClassification", "safetensors"), ("ForPreTraining", "bin")]
)
def test_task_checkpoints_load_into_the_backbone(tmp_path: Path, kind: str, weights: str) -> None:
    """Fine-tuned and pre-training checkpoints, with the names of Hub checkpoints (q_bias, v_bias)."""
    task = hf_model("videomae", {**VIDEOMAE, "num_labels": 5}, kind)
    state = {
        k.replace("query.bias", "q_bias").replace("value.bias", "v_bias"): v
        for k, v in task.state_dict().items()
    }
    assert any(k.endswith("q_bias") for k in state) and any(k.startswith("videomae.") for k in state)
    task.config.save_pretrained(tmp_path)
    if weights == "bin":
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    model = build("videomae", heads=HEADS, pretrained=tmp_path)
    assert_same_weights(model.transformer.state_dict(), task.videomae.state_dict())
    if kind == "ForVideoClassification":  # its fine-tuned norm of the pooled tokens comes along
        assert_same_weights(model.fc_norm.state_dict(), task.fc_norm.state_dict())
    assert model.spec.mean == (0.485, 0.456, 0.406)  # no preprocessor_config.json: ImageNet's

    (tmp_path / "pytorch_model.bin").unlink(missing_ok=True)
    save_file({**{k: v.contiguous() for k, v in state.items()}, "videomae.extra.weight": torch.zeros(1)},
              tmp_path / "model.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]") as err:
        build("videomae", pretrained=tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_bad_folders_are_one_line_errors_naming_them(tmp_path: Path, folders: dict[str, Path]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text(json.dumps({**VIDEOMAE, "model_type": "videomae"}))
    cases = {
        tmp_path / "absent": "no such pretrained model folder",
        tmp_path / "empty": r"not a pretrained model folder \(no config.json\)",
        tmp_path / "no-weights": r"no weights \(model.safetensors or pytorch_model.bin\)",
    }
    for folder, message in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            build("videomae", pretrained=folder)
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
        if folder.name != "no-weights":
            with pytest.raises(ValueError, match=message) as err:
                fetch_pretrained(str(folder))
            assert str(folder) in str(err.value) and "\n" not in str(err.value)
    assert fetch_pretrained(str(folders["videomae"])) == folders["videomae"]
    assert fetch_pretrained(f"file://{folders['videomae']}") == folders["videomae"]
    with pytest.raises(ValueError, match="fetch_pretrained"):
        build("videomae", pretrained="s3://bucket/videomae")
    with pytest.raises(ValueError, match="unknown fields"):
        ModelSpec.from_dict({**build("videomae", config=VIDEOMAE).spec.to_dict(), "origin": "x"})


def test_spec_source_round_trips_and_old_specs_load() -> None:
    spec = build("videomae", config=VIDEOMAE, source="s3://models/videomae").spec
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["source"] == "s3://models/videomae" and ModelSpec.from_dict(data) == spec
    del data["source"]  # a spec saved before the field existed
    assert ModelSpec.from_dict(data).source is None


def test_fetch_from_s3_caches_by_content(
    folders: dict[str, Path], s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REELFLOW_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/videomae"
    storage.upload_dir(str(folders["videomae"]), uri)
    storage.write_bytes(f"{uri}/exports/model.onnx", b"not needed")
    folder = fetch_pretrained(uri)
    assert folder.parent == tmp_path / "cache" / "pretrained"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in folders["videomae"].iterdir())
    assert fetch_pretrained(uri + "/") == folder  # cached: the same content is not fetched again

    model = build("multitask", backbone="videomae", heads=HEADS, pretrained=folder, source=uri)
    assert model.spec.source == uri and model.build_config["kwargs"]["source"] == uri
    assert_same_outputs(model, rebuilt(model), clips(2))
    plain = build("multitask", backbone="videomae", heads=HEADS, pretrained=folders["videomae"])
    plain.heads.load_state_dict(model.heads.state_dict())
    assert_same_outputs(model, plain, clips(2))  # the same weights as the local folder

    # A changed upload is fetched again; the old copy stays for whoever still uses it.
    storage.write_bytes(
        f"{uri}/preprocessor_config.json", json.dumps({**PREPROCESSOR, "image_mean": [0, 0, 0]}).encode()
    )
    changed = fetch_pretrained(uri)
    assert changed != folder and folder.is_dir()
    assert build("videomae", pretrained=changed).spec.mean == (0.0, 0.0, 0.0)
    assert not [p for p in changed.parent.iterdir() if p.name.startswith(".tmp-")]

    with pytest.raises(ValueError, match=r"no config.json") as err:
        fetch_pretrained(f"{s3_bucket}/models/absent")
    assert f"{s3_bucket}/models/absent" in str(err.value)


# --- sentiment with a BERT text branch -------------------------------------------------------------------


def sentiment_inputs(texts: list[str | None], **extra: object) -> dict[str, object]:
    gen = torch.Generator().manual_seed(3)
    batch = len(texts)
    return {
        "video": torch.randn(batch, 3, 16, 32, 32, generator=gen),
        "audio": 0.1 * torch.randn(batch, 16000, generator=gen),
        "text": texts,
        **extra,
    }


def test_sentiment_with_a_pretrained_text_encoder(saved: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    folder, bert = saved["bert"]
    model = build("sentiment", text_pretrained=folder, **SMALL_SENTIMENT).eval()
    # The encoder has no pooler (its [CLS] state is the output); everything else is the folder's.
    theirs = {k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
    assert_same_weights(model.text.encoder.state_dict(), theirs)
    assert model.spec.source == str(folder.resolve())

    ids = model.tokenizer(["a great movie", "", None])
    cls_id, sep_id, pad_id = (model.tokenizer.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert ids[0, 0] == cls_id and ids[1, :2].tolist() == [cls_id, sep_id] and ids[1, 2] == pad_id

    texts = ["a great movie", "", None, "sad and bad"]
    with torch.no_grad():
        out = model(sentiment_inputs(texts))
        # "" and None are missing texts: the same as marking them absent, whatever text they hold instead.
        marked = model(
            sentiment_inputs(
                ["a great movie", "bad", "happy", "sad and bad"],
                text_present=torch.tensor([True, False, False, True]),
            )
        )
        as_ids = model(sentiment_inputs(model.tokenizer(texts)))
    assert out["sentiment"].shape == (4, 3) and out["valence"].shape == (4,)
    for key in out:
        assert torch.allclose(out[key], marked[key], atol=1e-6) and torch.equal(out[key], as_ids[key])
    with pytest.raises(ValueError, match=r"token ids in \[0, "):
        model(sentiment_inputs(torch.full((4, 3), 10_000)))

    kwargs = model.build_config["kwargs"]
    assert "text_pretrained" not in kwargs and kwargs["text_config"]["hidden_size"] == 32
    assert json.loads(kwargs["text_tokenizer"])["model"]["type"] == "WordPiece"
    assert_same_outputs(model, rebuilt(model), sentiment_inputs(texts))


def test_sentiment_keeps_hashed_words_by_default() -> None:
    model = build("sentiment", **SMALL_SENTIMENT).eval()
    assert (
        type(model.tokenizer).__name__ == "HashingTokenizer"
        and "text_config" not in model.build_config["kwargs"]
    )
    with torch.no_grad():
        out = model(sentiment_inputs(["", "!!", "good"]))
        marked = model(sentiment_inputs(["x", "y", "good"], text_present=torch.tensor([False, False, True])))
    assert torch.allclose(out["valence"], marked["valence"], atol=1e-6)
    with pytest.raises(ValueError, match="text_config and text_tokenizer"):
        build("sentiment", text_config=BERT)


# --- imports --------------------------------------------------------------------------------------------


def test_no_torchvision_or_torchcodec_is_imported() -> None:
    script = textwrap.dedent(
        f"""
        import sys, torch
        import models
        assert "transformers" not in sys.modules, "import models must stay light"
        model = models.build("videomae", config={VIDEOMAE!r}).eval()
        model(torch.randn(1, 3, 4, 32, 32))
        bad = [m for m in sys.modules if m.split(".")[0] in ("torchvision", "torchcodec")]
        print(bad)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


# --- benchmark rows -------------------------------------------------------------------------------------


def test_bench_rows_of_the_transformers_run_lighter(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs import bench_models

    assert {"videomae", "timesformer"} <= set(bench_models.DEFAULT_MODELS)
    assert bench_models.MODEL_KWARGS["videomae"]["config"]["num_frames"] == 16  # the real base size
    # Tiny configs here: the base models take seconds per clip.
    monkeypatch.setitem(bench_models.MODEL_KWARGS, "videomae", {"config": VIDEOMAE})
    monkeypatch.setitem(bench_models.MODEL_KWARGS, "timesformer", {"config": TIMESFORMER})
    config = bench_models.BenchModelsConfig(
        batch_size=4, iterations=4, warmup=0, models=("videomae", "timesformer", "summarizer"), record=False
    )
    rows = bench_models.main(config)
    shape = {r["model"]: (r["batch_size"], r["passes"]) for r in rows}
    assert shape == {"videomae": (2, 3), "timesformer": (1, 2), "summarizer": (4, 4)}
    assert all(r["clips_per_s"] > 0 and r["gflop_per_clip"] > 0 for r in rows)
    note = bench_models.format_table(rows, config, 2, (0.0, 0.0))
    assert "videomae batch 2, median of 3; timesformer batch 1, median of 2" in note
