"""Multi-task loss balancing: how the per-task losses of `jobs.train.loop` become one training loss.

`fixed` is a plain weighted sum, Σ_t w_t·L_t, with the weights of the config's `tasks` section.

`uncertainty` learns the weights (homoscedastic uncertainty, Kendall, Gal & Cipolla, CVPR 2018). Each task
has a learned log-variance s_t = log σ_t², and the loss is

    Σ_t w_t · (exp(−s_t) · L_t + s_t)

where w_t is the configured weight, kept as a prior multiplier. For a fixed L_t the s_t that minimises the
term is log L_t, so each task's effective weight w_t·exp(−s_t) tends to w_t / L_t: a task whose loss stays
large is turned down, one whose loss is small is turned up, whatever the units or the number of terms of the
losses (cross-entropy over 16 frames against one clip's, MSE against BCE), and w_t still scales a task up or
down. The paper writes ½·exp(−s)·L + ½·s for a Gaussian (regression) likelihood and exp(−s)·L + ½·s for a
softmax one; both have their optimum at the same exp(−s_t) = 1 / L_t, with the effective weight 1/(2 L_t)
for every kind of task, so one form, without the ½ factors, serves regression and classification alike
(the common implementation; the whole loss is only scaled by 2 against the paper's).

Parameters: the s_t live here, not in the model, so they never reach the saved model's state_dict or spec.
They join the optimizer as an extra parameter group (no weight decay) and get the learning-rate schedule of
the model; `lr_scale` lets them move faster than the network's weights (a few hundred steps of lr 3e-3 would
move log-weights by well under 1) by parametrising s_t = lr_scale · θ_t (Adam's steps in θ are ~lr whatever
the gradient's size, so s moves ~lr_scale·lr per step). Under DDP, `all_reduce_grads` averages their
gradients across workers before each optimizer step, so every worker keeps the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

BALANCES = ("fixed", "uncertainty", "gradnorm")


class TaskBalancer(nn.Module):
    """The total loss of a step from the per-task losses; the base class is the fixed weighted sum.

    `priors` are the configured task weights. Subclasses with learned weights have parameters; the fixed
    one has none (and an empty state_dict), so a checkpoint of either kind loads into either kind.
    """

    def __init__(self, priors: Mapping[str, float]) -> None:
        super().__init__()
        if not priors:
            raise ValueError("balance: no tasks to weight")
        self.tasks: tuple[str, ...] = tuple(priors)
        self.priors: dict[str, float] = {t: float(w) for t, w in priors.items()}

    def forward(
        self, losses: Mapping[str, torch.Tensor], floors: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The loss to back-propagate: Σ_t weight_t · L_t. `floors`: the part of a task's loss no model can
        remove (see `loss_floors`); only GradNorm's training rates use it."""
        return sum(self.priors[t] * losses[t] for t in self.tasks)  # type: ignore[return-value]

    def weights(self) -> dict[str, float]:
        """Each task's current effective weight (what multiplies its loss), for logging."""
        return dict(self.priors)

    def attach(self, model: nn.Module) -> None:
        """Hook into the (unwrapped) model if the method needs more than the losses; here nothing."""

    def _prior_tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.priors[t] for t in self.tasks], dtype=like.dtype, device=like.device)

    def all_reduce_grads(self) -> None:
        """Average the learned parameters' gradients across DDP workers (no-op without parameters)."""
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


class UncertaintyBalancer(TaskBalancer):
    """Learned homoscedastic-uncertainty weights: Σ_t w_t·(exp(−s_t)·L_t + s_t), s_t = lr_scale·θ_t.

    `init_log_var` is the starting s_t (0: every effective weight starts at its prior).
    """

    def __init__(self, priors: Mapping[str, float], lr_scale: float = 1.0, init_log_var: float = 0.0) -> None:
        super().__init__(priors)
        if not (lr_scale > 0 and math.isfinite(lr_scale)):
            raise ValueError(f"balance: lr_scale must be > 0, got {lr_scale!r}")
        self.lr_scale = float(lr_scale)
        self.theta = nn.Parameter(torch.full((len(self.tasks),), init_log_var / self.lr_scale))

    def log_vars(self) -> torch.Tensor:
        """s_t = log σ_t², one per task in `tasks` order."""
        return self.theta * self.lr_scale

    def forward(
        self, losses: Mapping[str, torch.Tensor], floors: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        s = self.log_vars()
        stacked = torch.stack([losses[t].float().reshape(()) for t in self.tasks]).to(s.device)
        priors = self._prior_tensor(s)
        return (priors * (torch.exp(-s) * stacked + s)).sum()

    @torch.no_grad()
    def weights(self) -> dict[str, float]:
        s = self.log_vars().detach().cpu()
        return {t: self.priors[t] * math.exp(-float(v)) for t, v in zip(self.tasks, s, strict=True)}


class GradNormBalancer(TaskBalancer):
    """GradNorm (Chen et al., ICML 2018): learned weights that keep each task's gradient in step with how
    far behind its loss is.

    The weights are v = T·softmax(θ·lr_scale) (they sum to the number of tasks T; all 1 at the start), and
    each task's effective weight is prior_t·v_t. At every step, with g_t = ‖∂L_t/∂z‖ the norm of the task's
    gradient at the shared representation z (the input of the model's `heads`: the per-step features of a
    CNN-LSTM, else the clip embedding; the paper takes the last shared layer's weights, the representation
    is its cheap stand-in, one pass through the heads per task), G_t = v_t·g_t and the relative inverse
    training rate r_t = (L_t / L_t(0)) / mean_s(L_s / L_s(0)) — each L measured above its floor (the
    importance BCE against fractional targets cannot fall below their entropy; see `loss_floors`) — the
    weights descend

        Σ_t |G_t − mean_s(G_s) · r_t^α|

    with the targets held constant: a task whose loss has fallen least since the first step (r_t > 1) is
    given a larger share of the gradient, one that learns fast a smaller one; α sets how strongly. The
    model itself trains on Σ_t prior_t·v_t·L_t (v held constant there).
    """

    def __init__(self, priors: Mapping[str, float], lr_scale: float = 1.0, alpha: float = 1.5) -> None:
        super().__init__(priors)
        if not (lr_scale > 0 and math.isfinite(lr_scale)):
            raise ValueError(f"balance: lr_scale must be > 0, got {lr_scale!r}")
        self.lr_scale = float(lr_scale)
        self.alpha = float(alpha)
        self.theta = nn.Parameter(torch.zeros(len(self.tasks)))
        self.initial: torch.Tensor | None = None  # L_t(0), the first step's losses
        self._shared: torch.Tensor | None = None
        self._hooked: set[int] = set()

    def attach(self, model: nn.Module) -> None:
        """Watch the input of `model.heads` (the shared representation) in training forwards."""
        heads = getattr(model, "heads", None)
        if not isinstance(heads, nn.Module):
            if len(self.tasks) == 1:
                return  # one task: its weight is 1 whatever the gradients (the summarizer)
            raise ValueError(f"balance gradnorm: model {type(model).__name__} has no `heads` module to watch")
        if id(heads) in self._hooked:
            return
        self._hooked.add(id(heads))

        def keep(_module: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled():
                pooled, steps = args[0], args[1] if len(args) > 1 else None
                self._shared = steps if isinstance(steps, torch.Tensor) else pooled

        heads.register_forward_pre_hook(keep)

    def scale(self) -> torch.Tensor:
        """v_t, one per task in `tasks` order; they sum to T."""
        return len(self.tasks) * torch.softmax(self.theta * self.lr_scale, dim=0)

    def forward(
        self, losses: Mapping[str, torch.Tensor], floors: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        v = self.scale()
        stacked = torch.stack([losses[t].float().reshape(()) for t in self.tasks])
        priors = self._prior_tensor(stacked)
        model_loss = (priors * v.detach().to(stacked.device) * stacked).sum()
        shared, self._shared = self._shared, None
        if shared is None or not shared.requires_grad or not self.training:
            return model_loss
        norms = []
        for task in self.tasks:
            (grad,) = torch.autograd.grad(losses[task], shared, retain_graph=True, allow_unused=True)
            norms.append(torch.zeros(()) if grad is None else grad.detach().float().norm().cpu())
        g = torch.stack(norms).to(v.device)
        # The training rate is measured on what each loss can still lose: a soft-target BCE (importance,
        # the fraction of a clip in a highlight) never falls below its targets' entropy, and would seem
        # to lag for ever next to cross-entropies that fall to 0.
        floor = torch.stack([(floors or {}).get(t, torch.zeros(())).detach().float().reshape(()).cpu()
                             for t in self.tasks])  # fmt: skip
        current = (stacked.detach().cpu() - floor).clamp_min(1e-8).to(v.device)
        if self.initial is None:
            self.initial = current.clamp_min(1e-8).clone()
        ratio = current / self.initial.to(v.device)
        rate = ratio / ratio.mean().clamp_min(1e-12)
        grad_norms = v * g
        target = (grad_norms.mean() * rate**self.alpha).detach()
        balance_loss = (grad_norms - target).abs().sum()
        return model_loss + balance_loss.to(model_loss.device)

    @torch.no_grad()
    def weights(self) -> dict[str, float]:
        v = self.scale().detach().cpu()
        return {t: self.priors[t] * float(x) for t, x in zip(self.tasks, v, strict=True)}


def loss_floors(targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each task's irreducible loss on a batch: the mean binary entropy of the importance targets (BCE
    against a fraction y is KL + H(y) and cannot fall below H(y)); the other tasks' targets are hard labels
    or exact values, with floor 0, and are left out."""
    out: dict[str, torch.Tensor] = {}
    target = targets.get("importance")
    if target is not None:
        y = target.detach().float()
        y = y[torch.isfinite(y)].clamp(1e-6, 1 - 1e-6)
        if y.numel():
            out["importance"] = -(y * y.log() + (1 - y) * (1 - y).log()).mean()
    return out


def make_balancer(
    kind: str, priors: Mapping[str, float], lr_scale: float = 1.0, alpha: float = 1.5
) -> TaskBalancer:
    """The balancer a config's `tasks.balance` names, over the tasks (and weights) that train."""
    if kind == "fixed":
        return TaskBalancer(priors)
    if kind == "uncertainty":
        return UncertaintyBalancer(priors, lr_scale=lr_scale)
    if kind == "gradnorm":
        return GradNormBalancer(priors, lr_scale=lr_scale, alpha=alpha)
    raise ValueError(f"balance: must be one of {', '.join(BALANCES)}, got {kind!r}")


def param_group(balancer: TaskBalancer) -> dict[str, object] | None:
    """The optimizer parameter group of a balancer's learned parameters (no weight decay), or None."""
    params: Sequence[nn.Parameter] = [p for p in balancer.parameters() if p.requires_grad]
    return {"params": list(params), "weight_decay": 0.0} if params else None


def state(balancer: TaskBalancer) -> dict[str, object]:
    """What a checkpoint keeps of a balancer: its kind, its tasks and the learned log-variances s_t (not
    θ, so a restart with another `lr_scale` keeps the weights)."""
    out: dict[str, object] = {"kind": type(balancer).__name__, "tasks": list(balancer.tasks)}
    if isinstance(balancer, UncertaintyBalancer):
        out["log_vars"] = [float(v) for v in balancer.log_vars().detach().cpu()]
    if isinstance(balancer, GradNormBalancer):
        out["logits"] = [float(v) for v in (balancer.theta * balancer.lr_scale).detach().cpu()]
        if balancer.initial is not None:
            out["initial_losses"] = [float(v) for v in balancer.initial.cpu()]
    return out


def load_state(balancer: TaskBalancer, saved: Mapping[str, Any] | None) -> bool:
    """Restore a balancer from `state(...)`; False when `saved` (a checkpoint from before balancing: None,
    or of another kind or task list) could not be restored, which leaves the balancer at its start. A fixed
    balancer has nothing to restore."""
    if type(balancer) is TaskBalancer:
        return True
    if not saved or saved.get("kind") != type(balancer).__name__:
        return False
    if list(saved.get("tasks", ())) != list(balancer.tasks):
        return False
    key = "log_vars" if isinstance(balancer, UncertaintyBalancer) else "logits"
    theta = balancer.theta
    values = torch.tensor([float(v) for v in saved[key]], dtype=theta.dtype)
    with torch.no_grad():
        theta.copy_(values.to(theta.device) / balancer.lr_scale)
    if isinstance(balancer, GradNormBalancer) and saved.get("initial_losses") is not None:
        balancer.initial = torch.tensor([float(v) for v in saved["initial_losses"]])
    return True


def fit_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A saved optimizer state made to fit `optimizer` when only the balancer's trailing parameter group
    differs: a checkpoint from before balancing (or from `fixed`) gets the group with fresh state, and one
    from `uncertainty` restored into `fixed` drops it. Anything else is returned as it is."""
    groups = list(saved["param_groups"])
    have = len(optimizer.param_groups)
    if len(groups) == have:
        return saved
    if len(groups) < have:
        next_id = sum(len(g["params"]) for g in groups)
        for group in optimizer.param_groups[len(groups) :]:
            ids = list(range(next_id, next_id + len(group["params"])))
            next_id += len(ids)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {**saved, "param_groups": groups}
    kept = groups[:have]
    ids = {i for g in kept for i in g["params"]}
    return {**saved, "param_groups": kept, "state": {k: v for k, v in saved["state"].items() if k in ids}}
