"""Training augmentation of clip batches, in torch, inside the training workers.

Clips are decoded once, a little longer and larger than the model reads (`Augment.decode_len`,
`Augment.decode_size`); each epoch then cuts a different view of them:

- temporal jitter: a random window of `clip_len` of the decoded frames (targets per frame follow it);
- random crop: a square-ish box covering `min_crop`..1 of each side, at a random place, resized to the
  model's frame size, so the model sees about the field of view that tagging (which decodes the whole frame
  at the model's size) shows it;
- horizontal flip, with action labels that name a direction swapped (`LabelSet.swap_permutation`).

Crop, resize and flip are one `grid_sample` over the whole batch. Validation clips are decoded at the
model's size and length and need no transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """How training clips are cut from the decoded ones.

    `clip_len`/`frame_size` are the model's; `jitter_frames` extra frames and `crop_margin` extra size are
    decoded so that there is room to move. `min_crop` is the smallest crop side as a fraction of the
    decoded side (1.0 and no margin: no spatial crop). `flip_permutation` maps action indices under a flip.
    """

    clip_len: int
    frame_size: tuple[int, int]
    jitter_frames: int = 0
    crop_margin: float = 0.0
    min_crop: float = 1.0
    flip: bool = False
    flip_permutation: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.clip_len < 1 or self.jitter_frames < 0:
            raise ValueError(f"augment: clip_len={self.clip_len} must be >= 1, jitter_frames >= 0")
        if not 0.0 <= self.crop_margin <= 1.0 or not 0.1 <= self.min_crop <= 1.0:
            raise ValueError(
                f"augment: crop_margin={self.crop_margin} must be in [0, 1], "
                f"min_crop={self.min_crop} in [0.1, 1]"
            )

    @property
    def decode_len(self) -> int:
        """Frames to decode per training clip."""
        return self.clip_len + self.jitter_frames

    @property
    def decode_size(self) -> tuple[int, int]:
        """(height, width) to decode training clips at (even, for the decoders' sake)."""
        return tuple(2 * round(s * (1 + self.crop_margin) / 2) for s in self.frame_size)


@dataclass
class Views:
    """What `augment` chose for each clip of a batch: temporal offset and whether it was flipped."""

    offsets: torch.Tensor  # long [B]
    flipped: torch.Tensor  # bool [B]


def augment(frames: torch.Tensor, aug: Augment, generator: torch.Generator) -> tuple[torch.Tensor, Views]:
    """uint8 [B, L, H, W, 3] decoded clips → float [B, clip_len, h, w, 3] in 0..255, and the views chosen."""
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"augment: frames must be [B, L, H, W, 3], got {list(frames.shape)}")
    b, length = frames.shape[:2]
    if length < aug.clip_len:
        raise ValueError(f"augment: clips have {length} frames, fewer than clip_len={aug.clip_len}")
    offsets = torch.randint(0, length - aug.clip_len + 1, (b,), generator=generator)
    clips = temporal_crop(frames, offsets, aug.clip_len)
    flipped = torch.rand(b, generator=generator) < 0.5 if aug.flip else torch.zeros(b, dtype=torch.bool)
    side = aug.min_crop + (1.0 - aug.min_crop) * torch.rand(b, 2, generator=generator)  # (h, w) fractions
    centre = (1.0 - side) * (2 * torch.rand(b, 2, generator=generator) - 1)  # within the frame, in [-1, 1]
    out = crop_resize(clips, side, centre, flipped, aug.frame_size)
    return out, Views(offsets, flipped)


def temporal_crop(x: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
    """Per-sample windows `x[i, offsets[i] : offsets[i] + length]` of a [B, L, ...] tensor."""
    steps = offsets.to(x.device)[:, None] + torch.arange(length, device=x.device)[None, :]
    index = steps.reshape(*steps.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


def crop_resize(
    clips: torch.Tensor,
    side: torch.Tensor,
    centre: torch.Tensor,
    flipped: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """[B, T, H, W, 3] → float [B, T, h, w, 3]: a box of every frame (side fractions (h, w) [B, 2], centre
    (y, x) in [-1, 1] [B, 2]), mirrored where `flipped`, resized to `size` = (h, w) bilinearly."""
    b, t, h, w, c = clips.shape
    x = clips.permute(0, 1, 4, 2, 3).reshape(b, t * c, h, w).float()
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    sign = 1.0 - 2.0 * flipped.to(x.dtype).to(x.device)
    theta[:, 0, 0] = side[:, 1].to(x) * sign
    theta[:, 0, 2] = centre[:, 1].to(x)
    theta[:, 1, 1] = side[:, 0].to(x)
    theta[:, 1, 2] = centre[:, 0].to(x)
    grid = F.affine_grid(theta, [b, t * c, *size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(b, t, c, *size).permute(0, 1, 3, 4, 2)


def audio_crop(
    audio: torch.Tensor, offsets: torch.Tensor, decoded_frames: int, clip_len: int
) -> torch.Tensor:
    """The audio under each clip's temporal window: [B, S] over `decoded_frames` → [B, S'] over `clip_len`."""
    per_frame = audio.shape[1] / decoded_frames
    length = round(per_frame * clip_len)
    starts = torch.round(offsets.to(torch.float64) * per_frame).long().clamp(max=audio.shape[1] - length)
    return temporal_crop(audio, starts, length)


def flip_labels(
    steps: torch.Tensor, flipped: torch.Tensor, permutation: tuple[int, ...] | None
) -> torch.Tensor:
    """Per-frame action indices [B, T] with direction-naming labels swapped where the clip was flipped."""
    if permutation is None or not bool(flipped.any()):
        return steps
    perm = torch.as_tensor(permutation, dtype=steps.dtype, device=steps.device)
    swap = flipped.to(steps.device)[:, None] & (steps >= 0)  # frames without ground truth stay ignored
    return torch.where(swap, perm[steps.clamp(min=0)], steps)
