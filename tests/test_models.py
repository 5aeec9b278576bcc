"""The model zoo: registry, specs, shapes, fidelity of C3D, learning, checkpoints, masking, ensembles."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs import bench_models
from models import (
    MODELS,
    SENTIMENT_LABELS,
    Ensemble,
    ModelSpec,
    build,
    fuse_for_inference,
    head_loss,
    load_model,
    load_sports1m_state_dict,
    save_model,
)
from models.c3d import C3D
from models.sentiment import HashingTokenizer, LogMel
from models.spec import SCALAR_HEADS, example_input

CATEGORIES = ("ball_sports", "traffic", "nature", "cooking", "music")
ACTIONS = ("none", "slide", "bounce", "spin", "pulse")

# Small enough that a training step takes milliseconds on two shared cores.
TINY = {
    "c3d_small": dict(channels=(4, 8, 8, 16, 16), fc_dim=32, frame_size=(32, 32), dropout=0.0),
    "cnn_lstm": dict(channels=(8, 16), hidden=32, clip_len=8, frame_size=(32, 32), dropout=0.0),
    "graph": dict(
        channels=(4, 8, 16), dim=16, time_steps=2, grid=2, clip_len=8, frame_size=(32, 32), dropout=0.0
    ),
    "summarizer": dict(feature_dim=16, dropout=0.0),
    "sentiment": dict(
        frame_size=(16, 16),
        audio_rate=8000,
        visual_channels=(4, 4, 8, 8, 8),
        visual_dim=16,
        n_mels=16,
        audio_channels=(4, 8),
        text_dim=16,
        text_layers=1,
        dim=16,
        dropout=0.0,
    ),
}
# Sports-1M port shapes (487 classes), written out so the test does not derive them from our model.
SPORTS1M_SHAPES = {
    "conv1": (64, 3, 3, 3, 3),
    "conv2": (128, 64, 3, 3, 3),
    "conv3a": (256, 128, 3, 3, 3),
    "conv3b": (256, 256, 3, 3, 3),
    "conv4a": (512, 256, 3, 3, 3),
    "conv4b": (512, 512, 3, 3, 3),
    "conv5a": (512, 512, 3, 3, 3),
    "conv5b": (512, 512, 3, 3, 3),
    "fc6": (4096, 8192),
    "fc7": (4096, 4096),
    "fc8": (487, 4096),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # These models are tiny: on cores shared with other processes, a second intra-op thread mostly waits at
    # barriers for a descheduled sibling (measured: 3–10× slower than one thread under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(name, **{**TINY[name], **kwargs})


def sports1m_layout(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for layer, shape in shapes.items():
        sd[f"{layer}.weight"] = torch.randn(shape, generator=gen) * 0.01
        sd[f"{layer}.bias"] = torch.randn(shape[0], generator=gen) * 0.01
    return sd


# --- registry and specs ---------------------------------------------------------------------------------


def test_registry_names_and_unknown_name_error() -> None:
    required = {"c3d", "c3d_small", "cnn_lstm", "graph", "summarizer", "sentiment"}
    assert required <= set(MODELS)
    assert isinstance(MODELS, dict)
    with pytest.raises(ValueError, match="unknown model 'c4d'") as err:
        build("c4d")
    assert all(name in str(err.value) for name in required)
    assert "\n" not in str(err.value)


def test_builders_take_heads_and_put_label_names_in_the_spec() -> None:
    model = tiny("c3d_small", heads={"category": CATEGORIES, "sentiment": SENTIMENT_LABELS})
    assert model.spec.heads == {"category": CATEGORIES, "sentiment": SENTIMENT_LABELS, "valence": ()}
    assert build("cnn_lstm", **TINY["cnn_lstm"], num_classes=3).spec.heads == {
        "action": ("class_0", "class_1", "class_2")
    }
    with pytest.raises(ValueError, match="either heads or num_classes"):
        build("c3d_small", num_classes=3, heads={"category": ("a", "b")})
    with pytest.raises(ValueError, match="'valence' is a scalar score"):
        build("c3d_small", heads={"valence": ("low", "high")})
    with pytest.raises(ValueError, match="'category' needs >= 2 label names"):
        build("c3d_small", heads={"category": ("only",)})


def test_spec_round_trips_through_json_and_normalizes_frames() -> None:
    import json

    spec = build("sentiment", **TINY["sentiment"]).spec
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and hash(again) == hash(spec)
    assert spec.audio_rate == 8000 and spec.modalities == ("video", "audio", "text")
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        ModelSpec.from_dict({**spec.to_dict(), "colour": 1})

    frames = torch.zeros(2, spec.clip_len, *spec.frame_size, 3, dtype=torch.uint8)
    frames[..., 0] = 255
    x = spec.prepare(frames.numpy())  # clip rows hold numpy arrays
    assert x.shape == spec.input_shape(2)
    assert torch.allclose(x[:, 0], torch.tensor((1 - spec.mean[0]) / spec.std[0]))
    assert torch.allclose(x[:, 2], torch.tensor(-spec.mean[2] / spec.std[2]))
    with pytest.raises(ValueError, match="the spec wants"):
        spec.prepare(torch.zeros(spec.clip_len, 8, 8, 3, dtype=torch.uint8))


# --- C3D --------------------------------------------------------------------------------------------------


def test_full_c3d_is_the_paper_model() -> None:
    model = build("c3d", num_classes=101).eval()
    assert sum(p.numel() for p in model.parameters()) == 78_409_573
    assert model.spec.clip_len == 16 and model.spec.frame_size == (112, 112)
    seen = {}

    def shape_of(key: str):
        def hook(module, args, output) -> None:
            seen[key] = tuple(output.shape)

        return hook

    model.pools["conv5b"].register_forward_hook(shape_of("pool5"))
    model.fc6.register_forward_hook(shape_of("fc6"))
    with torch.inference_mode():
        out = model(torch.randn(model.spec.input_shape(1)), with_features=True)
    assert seen == {"pool5": (1, 512, 1, 4, 4), "fc6": (1, 4096)}
    assert out["category"].shape == (1, 101) and out["features"].shape == (1, 4096)
    with pytest.raises(ValueError, match=r"c3d: input must be a float tensor \[B, 3, 16, 112, 112\]"):
        model(torch.randn(1, 3, 8, 112, 112))


def test_c3d_features_are_fc6_and_fc7() -> None:
    model = build("c3d_small", num_classes=4).eval()
    x = torch.randn(model.spec.input_shape(2))
    with torch.inference_mode():
        fc6, fc7 = model.features(x, "fc6"), model.features(x, "fc7")
        assert fc6.shape == fc7.shape == (2, 512)
        assert torch.equal(fc7, F.relu(model.fc7(fc6)))
    with pytest.raises(ValueError, match="'fc6' or 'fc7'"):
        model.features(x, "fc8")


def test_c3d_too_small_a_clip_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="too small for 5 pools"):
        build("c3d_small", clip_len=8)


def reference_c3d(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The Sports-1M port's forward pass, written with functional ops straight from its state dict."""
    pools = {"conv1": (1, 2, 2), "conv2": 2, "conv3b": 2, "conv4b": 2}
    for layer in ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b"):
        x = F.relu(F.conv3d(x, sd[f"{layer}.weight"], sd[f"{layer}.bias"], padding=1))
        if layer in pools:
            x = F.max_pool3d(x, pools[layer])
    x = F.max_pool3d(x, 2, padding=(0, 1, 1)).reshape(x.shape[0], -1)
    x = F.relu(F.linear(x, sd["fc6.weight"], sd["fc6.bias"]))
    x = F.relu(F.linear(x, sd["fc7.weight"], sd["fc7.bias"]))
    return F.linear(x, sd["fc8.weight"], sd["fc8.bias"])


def test_sports1m_layout_loads_into_full_c3d() -> None:
    model = build("c3d", num_classes=487)
    sd = sports1m_layout(SPORTS1M_SHAPES)
    load_sports1m_state_dict(model, sd)
    assert torch.equal(model.conv3a.weight, sd["conv3a.weight"])
    assert torch.equal(model.fc6.weight, sd["fc6.weight"])
    assert torch.equal(model.heads.layers["category"].weight, sd["fc8.weight"])

    # Into 101 classes: fc8 does not fit, and the error says which key and which shapes.
    model101 = build("c3d", num_classes=101)
    with pytest.raises(ValueError, match=r"fc8.weight: got \(487, 4096\), model has \(101, 4096\)"):
        load_sports1m_state_dict(model101, sd)
    head_before = model101.heads.layers["category"].weight.clone()
    load_sports1m_state_dict(model101, sd, classifier=False)  # fine-tuning: everything but fc8
    assert torch.equal(model101.conv5b.weight, sd["conv5b.weight"])
    assert torch.equal(model101.heads.layers["category"].weight, head_before)


def test_sports1m_layout_computes_what_the_port_computes() -> None:
    # Same layout at a small width: the loaded model must match a functional re-implementation exactly,
    # which pins the layer order, the pool5 padding and the flatten order under channels_last_3d.
    model = tiny("c3d_small", num_classes=5, batch_norm=False).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith(".weight")}
    shapes = {k.removesuffix(".weight").replace("heads.layers.category", "fc8"): v for k, v in shapes.items()}
    sd = sports1m_layout(shapes, seed=1)
    load_sports1m_state_dict(model, sd)
    x = torch.randn(model.spec.input_shape(2))
    with torch.inference_mode():
        assert torch.allclose(model(x)["category"], reference_c3d(sd, x), atol=1e-6)


def test_sports1m_layout_errors_name_the_keys() -> None:
    model = tiny("c3d_small", num_classes=5, batch_norm=False)
    good = {k.replace("heads.layers.category", "fc8"): v.clone() for k, v in model.state_dict().items()}
    broken = {k: v for k, v in good.items() if k != "conv3a.bias"} | {"conv6.weight": torch.zeros(1)}
    with pytest.raises(
        ValueError, match=r"missing keys \['conv3a.bias'\]; unexpected keys \['conv6.weight'\]"
    ):
        load_sports1m_state_dict(model, broken)
    with pytest.raises(ValueError, match="no BatchNorm"):
        load_sports1m_state_dict(tiny("c3d_small"), good)
    # Weights from a DataParallel save carry a "module." prefix.
    load_sports1m_state_dict(model, {f"module.{k}": v + 1 for k, v in good.items()})
    assert torch.equal(model.conv1.weight, good["conv1.weight"] + 1)


# --- every model: shapes and learning ---------------------------------------------------------------------


def check_outputs(model: torch.nn.Module, out: dict[str, torch.Tensor], batch: int, steps: int) -> None:
    spec = model.spec
    expected = set(spec.heads) | {f"{h}_steps" for h in spec.step_heads}
    assert set(out) == expected
    for head, labels in spec.heads.items():
        if head == "importance" and "features" in spec.modalities:
            assert out[head].shape == (batch, steps)
        elif head in SCALAR_HEADS:
            assert out[head].shape == (batch,)
        else:
            assert out[head].shape == (batch, len(labels))
    for head in spec.step_heads:
        assert out[f"{head}_steps"].shape == (batch, spec.clip_len, len(spec.heads[head]))
    if "valence" in out:
        assert out["valence"].abs().max() <= 1
    if "importance" in out:
        assert out["importance"].min() >= 0 and out["importance"].max() <= 1


@pytest.mark.parametrize("name", ["c3d_small", "cnn_lstm", "graph", "summarizer", "sentiment"])
def test_output_shapes_at_the_default_spec(name: str) -> None:
    model = build(name).eval()
    with torch.inference_mode():
        out = model(example_input(model.spec, batch_size=2, steps=7))
    check_outputs(model, out, batch=2, steps=7)


def random_targets(model: torch.nn.Module, batch: int, steps: int, gen: torch.Generator) -> dict:
    spec = model.spec
    targets = {}
    for head, labels in spec.heads.items():
        if head == "valence":
            targets[head] = torch.rand(batch, generator=gen) * 2 - 1
        elif head == "importance":
            shape = (batch, steps) if "features" in spec.modalities else (batch,)
            targets[head] = (torch.rand(shape, generator=gen) > 0.5).float()
        else:
            targets[head] = torch.randint(len(labels), (batch,), generator=gen)
    for head in spec.step_heads:
        targets[f"{head}_steps"] = torch.randint(len(spec.heads[head]), (batch, spec.clip_len), generator=gen)
    return targets


OVERFIT = {
    "c3d_small": dict(num_classes=4),
    "cnn_lstm": dict(heads={"action": ACTIONS}),
    "graph": dict(num_classes=4),
    "summarizer": {},
    "sentiment": {},
}
# Random per-step labels take the LSTM longer, and the sentiment model's three encoders too, at 1e-2.
LEARNING_RATE = {"cnn_lstm": 3e-2, "sentiment": 2e-2}


def fit(model: torch.nn.Module, inputs, targets: dict, lr: float, below: float, steps: int = 150) -> tuple:
    """Adam on one fixed batch until the loss is below `below`: (first loss, last loss)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss = head_loss(model(inputs), targets, model.spec)
        first = first if first is not None else loss.item()
        if loss.item() < below:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return first, loss.item()


@pytest.mark.parametrize("name", list(OVERFIT))
def test_each_model_overfits_a_tiny_batch(name: str) -> None:
    model = tiny(name, **OVERFIT[name])
    gen = torch.Generator().manual_seed(1)
    inputs = example_input(model.spec, batch_size=6, steps=12, seed=2)
    if name == "sentiment":  # some samples without audio or text, as in a real corpus
        inputs["audio_present"] = torch.tensor([True, False, True, True, False, True])
        inputs["text"] = ["so happy", None, "", "dreadful day", "plain", None]
    targets = random_targets(model, 6, 12, gen)
    first, last = fit(model, inputs, targets, lr=LEARNING_RATE.get(name, 1e-2), below=0.02)
    assert last < 0.02, f"{name}: loss {first:.3f} → {last:.3f} after 150 steps"


def test_multitask_heads_on_one_backbone() -> None:
    heads = {"category": CATEGORIES, "action": ACTIONS, "sentiment": SENTIMENT_LABELS, "importance": ()}
    # The CNN-LSTM carries every head itself, with per-step action logits for segments.
    direct = tiny("cnn_lstm", heads=heads)
    assert direct.spec.step_heads == ("action",)
    # The wrapper puts the same heads on any backbone, which keeps none of its own.
    wrapped = build("multitask", backbone="graph", heads=heads, **TINY["graph"])
    assert wrapped.spec.name == "multitask:graph"
    assert sum("heads" in n for n, _ in wrapped.backbone.named_parameters()) == 0
    for model in (direct, wrapped):
        model.eval()
        x = torch.randn(model.spec.input_shape(3))
        with torch.inference_mode():
            out = model(x, with_features=True)
        features = out.pop("features")
        assert features.shape == (3, model.feature_dim)
        check_outputs(model, out, batch=3, steps=0)
    with pytest.raises(ValueError, match="no per-step features"):
        build("multitask", backbone="c3d_small", heads=heads, step_heads=("action",))

    # Training all heads at once works through the wrapper too.
    model = build("multitask", backbone="cnn_lstm", heads=heads, **TINY["cnn_lstm"])
    assert model.spec.step_heads == ("action",)
    inputs = torch.randn(model.spec.input_shape(4))
    targets = random_targets(model, 4, 0, torch.Generator().manual_seed(3))
    assert set(targets) == {"category", "action", "action_steps", "sentiment", "valence", "importance"}
    first, last = fit(model, inputs, targets, lr=3e-2, below=0.05)
    assert last < 0.05, f"multitask: loss {first:.3f} → {last:.3f} after 150 steps"


def test_head_loss_rejects_targets_for_heads_the_model_lacks() -> None:
    model = tiny("c3d_small", num_classes=3)
    out = model(torch.randn(model.spec.input_shape(2)))
    with pytest.raises(ValueError, match=r"unknown heads \['action'\]"):
        head_loss(out, {"action": torch.zeros(2, dtype=torch.long)}, model.spec)


# --- CNN-LSTM: the motion input --------------------------------------------------------------------------


def test_frame_differences_shape_and_first_frame() -> None:
    from models.lstm import frame_differences

    x = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 3, 4, 2, 2) ** 2
    d = frame_differences(x)
    assert d.shape == x.shape
    assert torch.equal(d[:, :, 1:], x[:, :, 1:] - x[:, :, :-1])
    assert torch.equal(d[:, :, 0], d[:, :, 1])  # the first frame takes the second one's difference
    assert torch.equal(frame_differences(x[:, :, :1]), torch.zeros_like(x[:, :, :1]))
    # The stem sees frame and difference (6 channels) by default, the frame alone without `motion`.
    assert tiny("cnn_lstm").encoder.stages[0].in_channels == 6
    assert tiny("cnn_lstm", motion=False).encoder.stages[0].in_channels == 3


def moving_or_still(n: int, gen: torch.Generator, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """n clips of a random picture: still, or rolled 2 px a frame sideways (label 1). Pooled per-frame
    features of a rolled picture are those of the still one, so only a motion cue tells them apart."""
    t, (h, w) = spec.clip_len, spec.frame_size
    pictures = F.interpolate(torch.randn(n, 3, h // 4, w // 4, generator=gen), size=(h, w), mode="nearest")
    moving = torch.arange(n) % 2
    clips = torch.stack(
        [
            torch.stack([torch.roll(p, shifts=2 * k * int(m), dims=2) for k in range(t)], dim=1)
            for p, m in zip(pictures, moving, strict=True)
        ]
    )
    return clips, moving


def test_cnn_lstm_with_motion_tells_a_moving_picture_from_a_still_one() -> None:
    model = tiny("cnn_lstm", heads={"action": ("none", "slide")})
    gen = torch.Generator().manual_seed(7)
    x, y = moving_or_still(16, gen, model.spec)
    targets = {"action": y, "action_steps": y[:, None].expand(-1, model.spec.clip_len)}
    first, last = fit(model, x, targets, lr=1e-2, below=0.05, steps=100)
    assert last < 0.05, f"loss {first:.3f} → {last:.3f}"
    with torch.no_grad():  # settle BatchNorm's running statistics, which 100 fast steps leave behind
        for _ in range(30):
            model(x)
    model.eval()
    x_new, y_new = moving_or_still(16, torch.Generator().manual_seed(8), model.spec)  # unseen pictures
    with torch.inference_mode():
        out = model(x_new)
    assert torch.equal(out["action"].argmax(-1), y_new)
    assert torch.equal(out["action_steps"].argmax(-1), y_new[:, None].expand(-1, model.spec.clip_len))


# --- checkpoints ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["c3d_small", "cnn_lstm", "graph", "summarizer", "sentiment", "multitask"])
def test_save_load_round_trip(name: str, tmp_path) -> None:
    if name == "multitask":
        model = build("multitask", backbone="cnn_lstm", heads={"action": ACTIONS, "importance": ()}, hidden=8)
    else:
        model = tiny(name)
    model.spec = replace(model.spec, fps=29.97)  # set after building: the saved spec must keep it
    model.eval()
    inputs = example_input(model.spec, batch_size=2, steps=5, seed=4)
    with torch.inference_mode():
        expected = model(inputs)
    buffer = io.BytesIO()
    save_model(model, buffer)
    buffer.seek(0)
    loaded = load_model(buffer)
    assert type(loaded) is type(model) and loaded.spec == model.spec and not loaded.training
    with torch.inference_mode():
        got = loaded(inputs)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    path = tmp_path / "model.pt"
    save_model(loaded, path)  # a loaded model saves again
    assert load_model(path).spec == model.spec


def test_load_model_refuses_what_is_not_a_checkpoint(tmp_path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pt: not a model checkpoint .*Unsupported operand"):
        load_model(path)
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match="not a reelflow model checkpoint"):
        load_model(path)
    # weights_only loading: an arbitrary object in the file is refused, never constructed.
    torch.save({"format": "reelflow.model/1", "payload": torch.nn.ReLU()}, path)
    with pytest.raises(
        ValueError, match=r"notes\.pt: .*GLOBAL torch.nn.modules.activation.ReLU was not an allowed"
    ):
        load_model(path)
    with pytest.raises(ValueError, match=r"not made by models\.build"):
        save_model(C3D(build("c3d_small").spec, channels=(4, 4, 4, 4, 4), fc_dim=8), io.BytesIO())


def test_fused_model_predicts_the_same_and_is_not_saved() -> None:
    for name in ("c3d_small", "cnn_lstm", "graph", "sentiment"):
        model = tiny(name)
        # Non-trivial running statistics, as after training.
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(example_input(model.spec, batch_size=4, seed=5))
        model.eval()
        inputs = example_input(model.spec, batch_size=2, seed=6)
        with torch.inference_mode():
            expected = model(inputs)
            fused = fuse_for_inference(model)
            got = fused(inputs)
        assert all(torch.allclose(got[k], expected[k], atol=1e-4) for k in expected), name
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        # Only the sentiment audio encoder's input BatchNorm stays: no convolution precedes it.
        assert len(norms) == (1 if name == "sentiment" else 0), name
    with pytest.raises(ValueError, match="fused for inference"):
        save_model(model, io.BytesIO())
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):
        fuse_for_inference(tiny("c3d_small"))


def test_inference_actors_predict_with_the_fused_model() -> None:
    from flows.predict import ClipPredictor

    model = tiny("cnn_lstm")
    model.train()
    with torch.no_grad():
        model(example_input(model.spec, batch_size=4, seed=5))  # running statistics, as after training
    model.eval()
    predictor = ClipPredictor([lambda: copy.deepcopy(model)])
    (loaded,) = predictor.models
    assert getattr(loaded, "fused_for_inference", False)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in loaded.modules())
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())  # a copy fused
    clip_len, (height, width) = model.spec.clip_len, model.spec.frame_size
    frames = np.random.default_rng(0).integers(0, 255, (2, clip_len, height, width, 3), dtype=np.uint8)
    out = predictor({"frames": frames, "video_id": np.array(["a", "b"])})
    with torch.inference_mode():
        expected = torch.softmax(model(model.spec.prepare(frames))["action"], dim=-1).numpy()
    np.testing.assert_allclose(out["m0.action"], expected, atol=1e-5)


# --- sentiment: masking, audio, text ----------------------------------------------------------------------


def sentiment_inputs(model: torch.nn.Module, seed: int) -> dict:
    inputs = example_input(model.spec, batch_size=3, seed=seed)
    inputs["text"] = model.tokenizer(["what a wonderful day", "awful", "ordinary scene"])
    return inputs


def test_sentiment_output_does_not_depend_on_a_missing_modality() -> None:
    model = tiny("sentiment").eval()
    base = sentiment_inputs(model, seed=7)
    for modality, key in (("video", "video"), ("audio", "audio"), ("text", "text")):
        present = torch.tensor([True, False, True])
        garbage = dict(base, **{f"{modality}_present": present})
        other = dict(garbage)
        if key == "text":
            other[key] = base[key].clone()
            other[key][1] = torch.randint(1, 8192, other[key][1].shape)
        else:
            other[key] = base[key].clone()
            other[key][1] = float("nan") if modality == "audio" else 1e6
        with torch.inference_mode():
            a, b = model(garbage), model(other)
        for head in a:
            assert torch.isfinite(b[head]).all()
            assert torch.equal(a[head], b[head]), (modality, head)

    # Masked is not the same as zero-filled: a present all-zero waveform is information, a missing one is not.
    zeros = dict(base, audio=torch.zeros_like(base["audio"]))
    missing = dict(base, audio_present=torch.tensor([False, False, False]))
    with torch.inference_mode():
        assert not torch.allclose(model(zeros)["sentiment"], model(missing)["sentiment"])
        # A modality that is absent from the dict is missing for every sample.
        no_audio = {k: v for k, v in base.items() if k != "audio"}
        assert torch.equal(model(no_audio)["sentiment"], model(missing)["sentiment"])
        # Only text: still a prediction, through the learned summary token.
        assert model({"text": ["great", None]})["sentiment"].shape == (2, 3)


def test_sentiment_text_strings_and_empty_text() -> None:
    model = tiny("sentiment").eval()
    video = torch.randn(model.spec.input_shape(2))
    with torch.inference_mode():
        from_strings = model({"video": video, "text": ["Wonderful, happy!", None]})
        from_ids = model({"video": video, "text": model.tokenizer(["wonderful happy", "..."])})
        masked = model(
            {"video": video, "text": ["wonderful happy", "x"], "text_present": torch.tensor([True, False])}
        )
    for head in from_strings:
        assert torch.equal(from_strings[head], from_ids[head])
        assert torch.equal(from_strings[head], masked[head])
    with pytest.raises(ValueError, match="'audio_present' marks samples present but no audio"):
        model({"video": video, "audio_present": torch.tensor([True, True])})
    with pytest.raises(ValueError, match="disagree on the batch size"):
        model({"video": video, "text": ["one"]})
    with pytest.raises(ValueError, match=r"'text' must be \[B, L <= 32\] token ids"):
        model({"video": video, "text": torch.ones(2, 33, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"'video' must be \[B, 3, 16, 16, 16\]"):
        model({"video": torch.randn(2, 3, 8, 16, 16)})


def test_hashing_tokenizer_is_stable_and_self_contained() -> None:
    tok = HashingTokenizer(vocab_size=8192, max_len=4)
    ids = tok(["Great great GREAT", "", None, "one two three four five six"])
    assert ids.shape == (4, 4)
    assert ids[0, 0] == ids[0, 1] == ids[0, 2] != 0 and ids[0, 3] == 0
    assert ids[1].eq(0).all() and ids[2].eq(0).all()
    assert ids[3].ne(0).all()  # truncated to max_len
    # CRC-32, not Python's per-process salted hash(): ids are the same in every worker.
    import zlib

    assert ids[0, 0] == 1 + zlib.crc32(b"great") % 8191


def test_log_mel_puts_a_tone_in_the_right_band() -> None:
    logmel = LogMel(sample_rate=16000, n_mels=64)
    t = torch.arange(16000) / 16000
    for hz in (300.0, 1000.0, 4000.0):
        spec = logmel(torch.sin(2 * math.pi * hz * t)[None])
        assert spec.shape == (1, 64, 101)
        loudest = spec[0, :, 50].argmax()
        nearest = (logmel.mel_centers() - hz).abs().argmin()
        assert abs(int(loudest) - int(nearest)) <= 1, hz


# --- summarizer -------------------------------------------------------------------------------------------


def test_summarizer_ignores_padding() -> None:
    model = tiny("summarizer").eval()
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    other = x.clone()
    other[1, 6:] = float("nan")
    with torch.inference_mode():
        a, b = model(x, mask)["importance"], model(other, mask)["importance"]
        short = model(x[1:, :6])["importance"]
    assert torch.equal(a, b) and (a[1, 6:] == 0).all()
    assert torch.allclose(a[1, :6], short[0], atol=1e-6)  # padding changes nothing for the real steps


# --- ensemble ---------------------------------------------------------------------------------------------


def test_ensemble_averages_class_probabilities() -> None:
    heads = {"category": CATEGORIES, "sentiment": SENTIMENT_LABELS}
    a = tiny("c3d_small", heads=heads).eval()
    torch.manual_seed(1)
    b = build("c3d_small", **TINY["c3d_small"], heads={"category": CATEGORIES}).eval()
    for p in b.parameters():  # push b's logits away from a's so the average is not trivially equal
        p.data.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(a.spec.input_shape(3))
    ensemble = Ensemble([a, b], weights=[1.0, 3.0]).eval()
    with torch.inference_mode():
        out, oa, ob = ensemble(x), a(x), b(x)
    mean = (oa["category"].softmax(-1) + 3 * ob["category"].softmax(-1)) / 4
    assert torch.allclose(out["category"].softmax(-1), mean, atol=1e-6)
    # A head only one member has is that member's; scalar heads average as they are.
    assert torch.allclose(out["sentiment"].softmax(-1), oa["sentiment"].softmax(-1), atol=1e-6)
    assert torch.allclose(out["valence"], oa["valence"])
    assert ensemble.spec.heads == {"category": CATEGORIES, "sentiment": SENTIMENT_LABELS, "valence": ()}

    buffer = io.BytesIO()
    save_model(ensemble, buffer)
    buffer.seek(0)
    with torch.inference_mode():
        again = load_model(buffer)(x)
    assert all(torch.equal(again[k], out[k]) for k in out)

    with pytest.raises(ValueError, match="head 'category' has different labels"):
        Ensemble([a, tiny("c3d_small", heads={"category": ("x", "y")})])
    with pytest.raises(ValueError, match="read different inputs"):
        Ensemble([a, tiny("graph", heads=heads)])


# --- benchmark job ----------------------------------------------------------------------------------------


def test_bench_models_config_and_record(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown models \['c4d'\]"):
        bench_models.BenchModelsConfig(models=("c3d", "c4d"))
    with pytest.raises(ValueError, match="batch_size=0"):
        bench_models.BenchModelsConfig(batch_size=0)
    rows = bench_models.main(
        bench_models.BenchModelsConfig(
            batch_size=2, iterations=1, warmup=0, models=("summarizer",), record=False
        )
    )
    assert [r["model"] for r in rows] == ["summarizer"] and rows[0]["clips_per_s"] > 0
    rows = bench_models.main(
        bench_models.BenchModelsConfig(
            batch_size=1, iterations=1, warmup=0, models=("c3d_small",), record=False
        )
    )
    assert [r["model"] for r in rows] == ["c3d_small", "c3d_small (contiguous)"]
    assert rows[0]["vs_contiguous"] == rows[0]["clips_per_s"] / rows[1]["clips_per_s"]
    assert rows[0]["gflop_per_clip"] == pytest.approx(1.70, abs=0.01)  # counted, the same for both layouts
    assert rows[1]["gflop_per_clip"] == rows[0]["gflop_per_clip"]

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Decode (`reelflow bench decode`)\n\n### old\n\nfigures\n")
    bench_models.record("| a |\n| --- |\n| 1 |", "reelflow bench models --batch-size 2", path)
    bench_models.record("| b |\n| --- |\n| 2 |", "reelflow bench models --batch-size 4", path)
    path.write_text(path.read_text() + "\n## Tagging\n\nlater section\n")
    bench_models.record("| c |\n| --- |\n| 3 |", "reelflow bench models --batch-size 8", path)
    text = path.read_text()
    assert text.count(bench_models.SECTION) == 1
    models_part = text.split(bench_models.SECTION)[1].split("## Tagging")[0]
    assert [line for line in models_part.splitlines() if line.startswith("`reelflow")] == [
        f"`reelflow bench models --batch-size {n}` on {bench_models.machine_line()}" for n in (2, 4, 8)
    ]
    assert text.index("## Decode") < text.index(bench_models.SECTION) < text.index("## Tagging")
