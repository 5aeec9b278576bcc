"""Multimodal sentiment: a visual clip embedding, an audio embedding from a log-mel spectrogram computed in
torch, and a small transformer over subtitle/transcript text, fused by attention from a learned summary token.

A missing modality is masked, never zero-filled: its encoder does not run for that sample and the fusion
attention cannot see its slot, so whatever the input holds there cannot change the output.

The text branch (`models.text`) hashes words (no vocabulary, nothing to download) unless given a pretrained
BERT-family encoder with its own tokenizer (`text_pretrained`, a local Hugging Face folder).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from models._api import register_model
from models._hf import model_folder
from models.c3d import C3D
from models.heads import Heads
from models.spec import KINETICS_MEAN, KINETICS_STD, SENTIMENT_LABELS, ModelSpec, clip_spec
from models.text import (
    HashingTokenizer,
    PretrainedTextEncoder,
    PretrainedTokenizer,
    TextEncoder,
    pretrained_text,
)

MODALITY_SLOTS = ("video", "audio", "text")


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, [n_freqs, n_mels]; filter m peaks at `mel_centers()[m]`."""
    freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)
    points = mel_to_hz(
        torch.linspace(
            float(hz_to_mel(torch.tensor(f_min))),
            float(hz_to_mel(torch.tensor(sample_rate / 2))),
            n_mels + 2,
            dtype=torch.float64,
        )
    )
    widths = points[1:] - points[:-1]
    slopes = points[None, :] - freqs[:, None]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMel(nn.Module):
    """Mono waveform [B, S] → log-mel spectrogram [B, n_mels, frames]: 25 ms Hann windows every 10 ms."""

    def __init__(self, sample_rate: int, n_mels: int = 64) -> None:
        super().__init__()
        self.win_length = round(0.025 * sample_rate)
        self.n_fft = 2 ** math.ceil(math.log2(self.win_length))
        self.hop = max(1, sample_rate // 100)
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        # Derived from the sample rate; not weights, so not in the state dict.
        self.register_buffer("window", torch.hann_window(self.win_length), persistent=False)
        self.register_buffer(
            "filters", mel_filterbank(self.n_fft // 2 + 1, n_mels, sample_rate), persistent=False
        )

    def mel_centers(self) -> torch.Tensor:
        """Centre frequency (Hz) of each mel filter."""
        top = float(hz_to_mel(torch.tensor(self.sample_rate / 2)))
        return mel_to_hz(torch.linspace(0.0, top, self.n_mels + 2))[1:-1]

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 2 or wave.shape[1] < self.n_fft:
            raise ValueError(f"audio must be [B, S] with S >= {self.n_fft} samples, got {list(wave.shape)}")
        spec = torch.stft(
            wave.float(),
            self.n_fft,
            hop_length=self.hop,
            win_length=self.win_length,
            window=self.window,
            center=True,
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()  # [B, freqs, frames]
        mel = torch.einsum("bft,fm->bmt", power, self.filters)
        return torch.log(mel + 1e-6)


class AudioEncoder(nn.Module):
    """Log-mel spectrogram → 2D conv stages → global average → [B, out_dim]."""

    def __init__(self, sample_rate: int, n_mels: int, channels: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.logmel = LogMel(sample_rate, n_mels)
        layers: list[nn.Module] = [nn.BatchNorm2d(1)]  # log-mel levels vary by recording; learn their scale
        cin = 1
        for cout in channels:
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            cin = cout
        self.stages = nn.Sequential(*layers)
        self.out = nn.Linear(cin, out_dim)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.out(self.stages(self.logmel(wave).unsqueeze(1)).mean(dim=(2, 3)))


class SentimentModel(nn.Module):
    """Fuses whichever of video, audio and text each sample has.

    `forward(inputs)` takes a dict (B samples):
      - "video": float [B, 3, T, H, W], clips normalized per the spec, or "visual": float [B, visual_dim], a
        clip embedding computed elsewhere (not both);
      - "audio": float [B, S], mono waveform at spec.audio_rate (S >= 512 at 16 kHz);
      - "text": a list of B strings (None or "" for none), or token ids long [B, L] from `model.tokenizer`
        (hashed words, or a pretrained tokenizer's ids with `text_encoder`);
      - "video_present", "audio_present", "text_present": bool [B], True where the sample has that modality.
    A modality whose key is absent is missing for every sample; a text without words (only the tokenizer's
    special tokens) is missing. Missing
    entries may hold anything. Returns {"sentiment": logits [B, 3], "valence": [B] in [-1, 1]} (+ others).
    """

    def __init__(
        self,
        spec: ModelSpec,
        visual_dim: int = 128,
        visual_channels: Sequence[int] = (8, 16, 32, 64, 64),
        n_mels: int = 64,
        audio_channels: Sequence[int] = (16, 32, 64),
        text_vocab: int = 8192,
        text_max_len: int = 32,
        text_dim: int = 64,
        text_layers: int = 2,
        dim: int = 128,
        dropout: float = 0.2,
        text_encoder: tuple[PretrainedTokenizer, PretrainedTextEncoder] | None = None,
    ) -> None:
        """`text_encoder`: a pretrained text branch (tokenizer, encoder) instead of hashed words."""
        super().__init__()
        if spec.audio_rate is None:
            raise ValueError("sentiment: the spec needs audio_rate")
        self.spec = spec
        self.visual = C3D(
            replace(spec, heads={}, step_heads=()),
            visual_channels,
            fc_dim=visual_dim,
            dropout=dropout,
            batch_norm=True,
        )
        self.visual_dim = visual_dim
        self.audio = AudioEncoder(spec.audio_rate, n_mels, audio_channels, dim)
        self.tokenizer: HashingTokenizer | PretrainedTokenizer
        self.text: nn.Module
        if text_encoder is None:
            self.tokenizer = HashingTokenizer(text_vocab, text_max_len)
            self.text = TextEncoder(text_vocab, text_max_len, text_dim, text_layers, dim, dropout)
        else:
            self.tokenizer, self.text = text_encoder
        self.visual_proj = nn.Linear(visual_dim, dim)
        self.summary = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_embed = nn.Parameter(torch.randn(len(MODALITY_SLOTS), dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.fusion = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = dim
        self.heads = Heads(dim, spec.heads)

    def encode(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, None]:
        """(fused embedding [B, dim], no per-step features)."""
        batch = _batch_size(inputs)
        device = self.summary.device
        slots, present = [], []
        for modality in MODALITY_SLOTS:
            emb, mask = self._encode_modality(modality, inputs, batch, device)
            slots.append(emb)
            present.append(mask)
        tokens = torch.stack(slots, dim=1) + self.modality_embed
        tokens = torch.cat([self.summary.expand(batch, -1, -1), tokens], dim=1)
        ignore = torch.cat(
            [torch.zeros(batch, 1, dtype=torch.bool, device=device), ~torch.stack(present, dim=1)], dim=1
        )
        fused = self.fusion(tokens, src_key_padding_mask=ignore)[:, 0]
        return self.dropout(self.norm(fused)), None

    def _encode_modality(
        self, modality: str, inputs: Mapping[str, Any], batch: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding [B, dim], zeros where missing; presence [B]); the encoder sees present rows only."""
        data, key = _modality_input(modality, inputs)
        present = _presence(inputs, modality, batch, device, given=data is not None)
        if data is not None:
            if key == "text" and not torch.is_tensor(data):
                data = self.tokenizer(list(data))
            data = torch.as_tensor(data, device=device)
            _check_shape(key, data, self)
            if key == "text":
                special = torch.tensor(self.tokenizer.special_ids, device=device)
                present = present & (~torch.isin(data, special)).any(dim=1)
        out = torch.zeros(batch, self.feature_dim, device=device)
        rows = present.nonzero().squeeze(1)
        if rows.numel() == 0:
            return out, present
        chosen = data[rows]
        if key == "video":
            emb = self.visual_proj(self.visual.features(chosen))
        elif key == "visual":
            emb = self.visual_proj(chosen.float())
        elif key == "audio":
            emb = self.audio(chosen)
        else:
            emb = self.text(chosen)
        return out.index_put((rows,), emb.to(out.dtype)), present

    def features(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The fused embedding the heads read: [B, dim]."""
        return self.encode(inputs)[0]

    def forward(self, inputs: Mapping[str, Any], with_features: bool = False) -> dict[str, torch.Tensor]:
        """See the class docstring for `inputs`; returns {"sentiment": [B, 3], "valence": [B], ...}."""
        pooled, _ = self.encode(inputs)
        out = self.heads(pooled)
        if with_features:
            out["features"] = pooled
        return out


def _modality_input(modality: str, inputs: Mapping[str, Any]) -> tuple[Any, str]:
    if modality == "video" and "video" in inputs and "visual" in inputs:
        raise ValueError("sentiment: give 'video' clips or a 'visual' embedding, not both")
    key = "visual" if modality == "video" and "visual" in inputs else modality
    return inputs.get(key), key


def _check_shape(key: str, data: torch.Tensor, model: SentimentModel) -> None:
    spec = model.spec
    expected = {
        "video": (5, f"[B, 3, {spec.clip_len}, {spec.frame_size[0]}, {spec.frame_size[1]}]"),
        "visual": (2, f"[B, {model.visual_dim}]"),
        "audio": (2, "[B, S]"),
        "text": (2, f"[B, L <= {model.tokenizer.max_len}] token ids in [0, {model.tokenizer.vocab_size})"),
    }
    ndim, shape = expected[key]
    ok = data.dim() == ndim
    if ok and key == "video":
        ok = tuple(data.shape[1:]) == (3, spec.clip_len, *spec.frame_size)
    elif ok and key == "visual":
        ok = data.shape[1] == model.visual_dim
    elif ok and key == "text":
        ok = not data.is_floating_point() and data.shape[1] <= model.tokenizer.max_len
        in_vocab = data.numel() == 0 or 0 <= int(data.min()) <= int(data.max()) < model.tokenizer.vocab_size
        ok = ok and in_vocab
    if not ok:
        raise ValueError(f"sentiment: {key!r} must be {shape}, got {data.dtype} {list(data.shape)}")


def _presence(
    inputs: Mapping[str, Any], modality: str, batch: int, device: torch.device, given: bool
) -> torch.Tensor:
    name = f"{modality}_present"
    if name not in inputs:
        return torch.full((batch,), given, dtype=torch.bool, device=device)
    mask = torch.as_tensor(inputs[name], device=device)
    if mask.shape != (batch,) or mask.dtype != torch.bool:
        raise ValueError(f"sentiment: {name!r} must be bool [{batch}], got {mask.dtype} {list(mask.shape)}")
    if mask.any() and not given:
        raise ValueError(f"sentiment: {name!r} marks samples present but no {modality} input was given")
    return mask


def _batch_size(inputs: Mapping[str, Any]) -> int:
    unknown = sorted(
        set(inputs) - {"video", "visual", "audio", "text"} - {f"{m}_present" for m in MODALITY_SLOTS}
    )
    if unknown:
        raise ValueError(f"sentiment: unknown input keys {unknown}")
    sizes = {k: len(v) for k, v in inputs.items() if v is not None}
    if not sizes:
        raise ValueError("sentiment: no inputs given (expected any of video/visual, audio, text)")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"sentiment: inputs disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


@register_model("sentiment")
def sentiment(
    heads: Mapping[str, Sequence[str]] | None = None,
    *,
    clip_len: int = 16,
    frame_size: Sequence[int] = (64, 64),
    fps: float = 15.0,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
    audio_rate: int = 16000,
    visual_dim: int = 128,
    visual_channels: Sequence[int] = (8, 16, 32, 64, 64),
    n_mels: int = 64,
    audio_channels: Sequence[int] = (16, 32, 64),
    text_vocab: int = 8192,
    text_max_len: int = 32,
    text_dim: int = 64,
    text_layers: int = 2,
    dim: int = 128,
    dropout: float = 0.2,
    text_pretrained: str | os.PathLike | None = None,
    text_config: Mapping[str, Any] | None = None,
    text_tokenizer: str | None = None,
    text_source: str | None = None,
) -> SentimentModel:
    """Video + audio + text sentiment: negative / neutral / positive and a valence in [-1, 1].

    The text branch hashes words, or with `text_pretrained` (a local folder: config.json, weights,
    tokenizer.json) runs that BERT-family encoder on its own tokenizer's ids (`text_max_len` of them at most).
    `text_config` (entries over the folder's config.json) and `text_tokenizer` (a tokenizer.json's content)
    build the same branch without the folder, randomly initialized: what a saved model rebuilds with.
    `text_source` records where the folder came from (default: the folder) in the spec.
    """
    call = dict(locals())  # the arguments as given: a pretrained text branch rebuilds from them
    text_encoder = None
    if text_pretrained is not None or text_config is not None or text_tokenizer is not None:
        text_encoder, text_config, text_tokenizer = pretrained_text(
            text_pretrained, text_config, text_tokenizer, text_max_len, dim
        )
        if text_source is None and text_pretrained is not None:
            text_source = str(model_folder(text_pretrained).resolve())
    spec = clip_spec(
        "sentiment",
        heads if heads is not None else {"sentiment": SENTIMENT_LABELS},
        default_head="sentiment",
        clip_len=clip_len,
        frame_size=frame_size,
        fps=fps,
        mean=mean,
        std=std,
        modalities=("video", "audio", "text"),
        audio_rate=audio_rate,
        source=text_source,
    )
    model = SentimentModel(
        spec,
        visual_dim=visual_dim,
        visual_channels=visual_channels,
        n_mels=n_mels,
        audio_channels=audio_channels,
        text_vocab=text_vocab,
        text_max_len=text_max_len,
        text_dim=text_dim,
        text_layers=text_layers,
        dim=dim,
        dropout=dropout,
        text_encoder=text_encoder,
    )
    if text_encoder is not None:
        del call["text_pretrained"]
        call.update(text_config=text_config, text_tokenizer=text_tokenizer, text_source=text_source)
        model.rebuild_kwargs = call
    return model
