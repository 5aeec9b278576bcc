"""Space-time region graph (Wang & Gupta 2018, "Videos as Space-Time Region Graphs"), in plain tensor ops.

Nodes are the cells of a `grid`×`grid` lattice over a 3D-conv feature map at each of `time_steps` steps.
Three graphs connect them: spatial (4-neighbours at the same step), temporal (the same cell at adjacent
steps), both fixed and degree-normalized, and similarity (softmax of learned pairwise dot products, recomputed
per clip and per layer). A GCN layer sums G·X·W over the three graphs; the readout averages the nodes and
concatenates the backbone's pooled feature, as in the paper. With ≤ a few hundred nodes a dense adjacency is
cheaper and simpler than a sparse graph library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models._api import register_model
from models.heads import Heads
from models.spec import KINETICS_MEAN, KINETICS_STD, ModelSpec, clip_spec


def lattice_adjacency(time_steps: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial, temporal) adjacency [N, N] over nodes ordered (t, row, col), each D^-1/2 (A + I) D^-1/2."""
    n = time_steps * grid * grid
    idx = torch.arange(n).view(time_steps, grid, grid)
    spatial = torch.zeros(n, n)
    temporal = torch.zeros(n, n)
    for a, b in ((idx[:, 1:, :], idx[:, :-1, :]), (idx[:, :, 1:], idx[:, :, :-1])):
        spatial[a.flatten(), b.flatten()] = 1.0
    temporal[idx[1:].flatten(), idx[:-1].flatten()] = 1.0
    return _normalize(spatial), _normalize(temporal)


def _normalize(adj: torch.Tensor) -> torch.Tensor:
    adj = adj + adj.T + torch.eye(adj.shape[0])
    inv_sqrt = adj.sum(dim=1).rsqrt()
    return inv_sqrt[:, None] * adj * inv_sqrt[None, :]


class GraphConv(nn.Module):
    """Z = Σ_g G_g X W_g over the spatial, temporal and similarity graphs; LayerNorm, ReLU, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.spatial = nn.Linear(dim, dim, bias=False)
        self.temporal = nn.Linear(dim, dim, bias=False)
        self.similar = nn.Linear(dim, dim, bias=False)
        self.phi = nn.Linear(dim, dim, bias=False)
        self.phi_prime = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x: torch.Tensor, a_spatial: torch.Tensor, a_temporal: torch.Tensor) -> torch.Tensor:
        sim = torch.softmax(self.phi(x) @ self.phi_prime(x).transpose(1, 2) * self.scale, dim=-1)
        z = a_spatial @ self.spatial(x) + a_temporal @ self.temporal(x) + sim @ self.similar(x)
        return x + F.relu(self.norm(z))


class SpaceTimeGraph(nn.Module):
    """[B, 3, T, H, W] → 3D-conv feature map → region nodes → GCN layers → readout [B, 2·dim] → heads."""

    def __init__(
        self,
        spec: ModelSpec,
        channels: Sequence[int] = (16, 32, 64),
        grid: int = 4,
        time_steps: int = 4,
        dim: int = 128,
        gcn_layers: int = 2,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if not channels or min(channels) < 1 or grid < 1 or time_steps < 1 or gcn_layers < 1:
            raise ValueError("graph: channels, grid, time_steps and gcn_layers must be positive")
        self.spec = spec
        layers: list[nn.Module] = []
        cin = 3
        for i, cout in enumerate(channels):
            # A stem strided in space only; the first pool keeps time, later ones halve it, as in C3D.
            stride = (1, 2, 2) if i == 0 else 1
            pool = (1, 2, 2) if i == 0 else (2, 2, 2)
            layers += [
                nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool3d(pool, ceil_mode=True),
            ]
            cin = cout
        self.backbone = nn.Sequential(*layers)
        self.backbone.to(memory_format=torch.channels_last_3d)
        self.cells = nn.AdaptiveAvgPool3d((time_steps, grid, grid))
        self.project = nn.Linear(cin, dim)
        self.gcn = nn.ModuleList(GraphConv(dim) for _ in range(gcn_layers))
        a_spatial, a_temporal = lattice_adjacency(time_steps, grid)
        # Derived from (time_steps, grid), so not part of the state dict.
        self.register_buffer("a_spatial", a_spatial, persistent=False)
        self.register_buffer("a_temporal", a_temporal, persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = dim + cin
        self.heads = Heads(self.feature_dim, spec.heads)

    def nodes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(node features after the GCN layers [B, N, dim], backbone feature map pooled [B, C])."""
        self.spec.check_video(x, exact=False)
        fmap = self.backbone(x.contiguous(memory_format=torch.channels_last_3d))
        cells = self.cells(fmap).flatten(2).transpose(1, 2)  # [B, N, C], nodes in (t, row, col) order
        h = self.project(cells)
        for layer in self.gcn:
            h = layer(h, self.a_spatial, self.a_temporal)
        return h, fmap.mean(dim=(2, 3, 4))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(readout: mean of the nodes ‖ pooled backbone feature, [B, dim + C]; no per-step features)."""
        h, pooled = self.nodes(x)
        return self.dropout(torch.cat([h.mean(dim=1), pooled], dim=1)), None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The clip embedding the heads read: [B, dim + C]."""
        return self.encode(x)[0]

    def forward(self, x: torch.Tensor, with_features: bool = False) -> dict[str, torch.Tensor]:
        """x: [B, 3, T, H, W] → {head: logits [B, K] or score [B]} (+ "features")."""
        pooled, _ = self.encode(x)
        out = self.heads(pooled)
        if with_features:
            out["features"] = pooled
        return out


@register_model("graph")
def graph(
    num_classes: int | None = None,
    heads: Mapping[str, Sequence[str]] | None = None,
    *,
    clip_len: int = 16,
    frame_size: Sequence[int] = (64, 64),
    fps: float = 15.0,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
    channels: Sequence[int] = (16, 32, 64),
    grid: int = 4,
    time_steps: int = 4,
    dim: int = 128,
    gcn_layers: int = 2,
    dropout: float = 0.3,
) -> SpaceTimeGraph:
    """Space-time region graph with a "category" head by default; 4×4 cells × 4 steps = 64 nodes."""
    spec = clip_spec(
        "graph", heads, num_classes, clip_len=clip_len, frame_size=frame_size, fps=fps, mean=mean, std=std
    )
    return SpaceTimeGraph(
        spec, channels, grid=grid, time_steps=time_steps, dim=dim, gcn_layers=gcn_layers, dropout=dropout
    )
