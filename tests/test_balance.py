"""Multi-task loss balancing (jobs/train/balance.py): learned weights move the right way, survive a
checkpoint, and the config names a bad key. Fast: no Ray, no corpus."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from jobs.config import ConfigError, load_config
from jobs.train import balance, loop
from jobs.train.config import ModelSection, TasksSection, TrainConfig
from jobs.train.plan import build_model

DEMO = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"


def _steps(balancer: balance.TaskBalancer, losses: dict[str, float], n: int, lr: float = 0.05) -> None:
    optimizer = torch.optim.Adam(balancer.parameters(), lr=lr)
    for _ in range(n):
        total = balancer({t: torch.tensor(v) for t, v in losses.items()})
        optimizer.zero_grad()
        total.backward()
        optimizer.step()


def test_uncertainty_turns_down_the_task_with_the_persistently_larger_loss():
    balancer = balance.UncertaintyBalancer({"big": 1.0, "small": 1.0, "scaled": 2.0})
    assert balancer.weights() == pytest.approx({"big": 1.0, "small": 1.0, "scaled": 2.0})
    _steps(balancer, {"big": 4.0, "small": 0.25, "scaled": 4.0}, 300)
    w = balancer.weights()
    assert w["big"] < 0.5 < 2.0 < w["small"], w
    # The optimum of exp(-s)·L + s is s = log L: the weight tends to prior / L.
    assert w["big"] == pytest.approx(1 / 4.0, rel=0.15)
    assert w["small"] == pytest.approx(1 / 0.25, rel=0.15)
    assert w["scaled"] == pytest.approx(2 * w["big"], rel=0.05)  # the prior still multiplies


def test_lr_scale_moves_the_learned_weights_faster():
    slow, fast = balance.UncertaintyBalancer({"a": 1.0}), balance.UncertaintyBalancer({"a": 1.0}, lr_scale=10)
    _steps(slow, {"a": 10.0}, 20, lr=0.003)
    _steps(fast, {"a": 10.0}, 20, lr=0.003)
    assert 1 - fast.weights()["a"] > 5 * (1 - slow.weights()["a"])


class _Toy(nn.Module):
    """A shared layer and two heads called as `heads(pooled, steps)`, like the models of this package."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)

        def forward(self, pooled: torch.Tensor, steps: torch.Tensor | None) -> dict[str, torch.Tensor]:
            return {"a": self.a(pooled).squeeze(-1), "b": self.b(pooled).squeeze(-1)}

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.heads = nn.Linear(4, 4), self.Heads()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.shared(x), None)


def _lagging_a(steps: int = 100) -> tuple[balance.GradNormBalancer, _Toy]:
    """GradNorm over two tasks where b's loss falls to a tenth of its start and a's stays (a lags)."""
    torch.manual_seed(0)
    model = _Toy()
    balancer = balance.GradNormBalancer({"a": 1.0, "b": 1.0}, lr_scale=10.0)
    balancer.attach(model)
    balancer.attach(model)  # idempotent: one hook
    optimizer = torch.optim.Adam(balancer.parameters(), lr=0.01)
    x = torch.randn(32, 4)
    for step in range(steps):
        out = model(x)
        shrink = 1.0 if step == 0 else 0.1
        losses = {"a": out["a"].pow(2).mean() + 1.0, "b": shrink * (out["b"].pow(2).mean() + 1.0)}
        total = balancer(losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return balancer, model


def test_gradnorm_gives_the_lagging_task_more_weight():
    balancer, model = _lagging_a()
    x = torch.randn(32, 4)
    w = balancer.weights()
    assert sum(w.values()) == pytest.approx(2.0)
    assert w["a"] > 1.2 > 0.8 > w["b"], w
    with torch.no_grad():  # no gradient at the heads' input: the model loss alone, weights unchanged
        out = model(x)
        assert balancer({"a": out["a"].mean(), "b": out["b"].mean()}).requires_grad is False


def test_gradnorm_measures_training_rates_above_the_loss_floor():
    """A soft-target BCE that has reached its targets' entropy has learned all it can: not a lagging task."""
    y = torch.tensor([0.0, 1.0, 0.5, 0.25, float("nan")])
    floor = balance.loss_floors({"importance": y, "category": torch.tensor([1, 2])})
    assert set(floor) == {"importance"}
    entropy = -(0.5 * math.log(0.5) * 2 + 0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / 4
    assert float(floor["importance"]) == pytest.approx(entropy, abs=1e-4)

    def run(with_floor: bool) -> dict[str, float]:
        torch.manual_seed(0)
        model = _Toy()
        model.heads.b.load_state_dict(model.heads.a.state_dict())  # the same gradients at the shared layer
        balancer = balance.GradNormBalancer({"a": 1.0, "b": 1.0}, lr_scale=10.0)
        balancer.attach(model)
        optimizer = torch.optim.Adam(balancer.parameters(), lr=0.01)
        x = torch.randn(32, 4)
        for step in range(100):
            out = model(x)
            shrink = 1.0 if step == 0 else 0.1  # both tasks' reducible losses fall alike; a has a floor of 1
            losses = {"a": 1.0 + shrink * out["a"].pow(2).mean(), "b": shrink * out["b"].pow(2).mean()}
            floors = {"a": torch.tensor(1.0)} if with_floor else None
            total = balancer(losses, floors)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
        return balancer.weights()

    assert run(False)["a"] > 1.2  # seen raw, a seems to lag
    w = run(True)
    assert w["a"] == pytest.approx(1.0, abs=0.15), w


@pytest.mark.parametrize("kind", ["uncertainty", "gradnorm"])
def test_balancer_state_round_trips_through_a_checkpoint(kind, tmp_path):
    config = TrainConfig(
        corpus=str(tmp_path), model=ModelSection(kwargs={"channels": [4, 8], "hidden": 8}),
        tasks=TasksSection(balance=kind, action_steps=0.0),
    )  # fmt: skip
    heads = {"category": ["a", "b"], "action": ["x", "none"], "sentiment": ["neg", "pos"],
             "valence": [], "importance": []}  # fmt: skip
    weights = config.tasks.weights()
    model = build_model(config, heads)
    saved = balance.make_balancer(kind, weights, lr_scale=3.0)
    with torch.no_grad():
        saved.theta.copy_(torch.linspace(-0.2, 0.3, len(weights)))
    if isinstance(saved, balance.GradNormBalancer):
        saved.initial = torch.linspace(1.0, 2.0, len(weights))
    optimizer = loop.make_optimizer(model, config.optim)
    optimizer.add_param_group(balance.param_group(saved))
    (saved(dict.fromkeys(weights, torch.tensor(1.0, requires_grad=True)))).backward()
    optimizer.step()
    loop.save_checkpoint(tmp_path, model, optimizer, loop.TrainState(epoch=2), {}, saved)

    # The saved model carries no balancer parameter.
    payload = torch.load(tmp_path / loop.MODEL_FILE, map_location="cpu", weights_only=True)
    assert not any("theta" in k or "balance" in k for k in payload["state_dict"])
    assert "theta" not in str(payload["spec"])

    restored = balance.make_balancer(kind, weights, lr_scale=1.0)  # another lr_scale keeps the weights
    assert restored.weights() != pytest.approx(saved.weights())
    state, optimizer_state = loop.load_checkpoint(tmp_path, build_model(config, heads), restored)
    assert state.epoch == 2
    assert restored.weights() == pytest.approx(saved.weights())
    if isinstance(saved, balance.GradNormBalancer):
        assert torch.equal(restored.initial, saved.initial)
    fresh = loop.make_optimizer(model, config.optim)
    fresh.add_param_group(balance.param_group(restored))
    fresh.load_state_dict(balance.fit_optimizer_state(fresh, optimizer_state))
    assert len(fresh.param_groups) == len(optimizer.param_groups)
    assert fresh.param_groups[-1]["params"] == [restored.theta]


def test_checkpoint_from_before_balancing_still_loads(tmp_path):
    config = TrainConfig(corpus=str(tmp_path), model=ModelSection(kwargs={"channels": [4, 8], "hidden": 8}),
                         tasks=TasksSection(action_steps=0.0, sentiment=0.0, valence=0.0))  # fmt: skip
    heads = {"category": ["a", "b"], "action": ["x", "none"], "importance": []}
    model = build_model(config, heads)
    optimizer = loop.make_optimizer(model, config.optim)
    loop.save_checkpoint(tmp_path, model, optimizer, loop.TrainState(epoch=1), {})  # no balancer: old layout
    balancer = balance.make_balancer("uncertainty", config.tasks.weights(), lr_scale=10.0)
    _, optimizer_state = loop.load_checkpoint(tmp_path, model, balancer)
    assert balancer.weights() == pytest.approx(config.tasks.weights())  # left at its start
    grown = loop.make_optimizer(model, config.optim)
    grown.add_param_group(balance.param_group(balancer))
    grown.load_state_dict(balance.fit_optimizer_state(grown, optimizer_state))
    assert grown.param_groups[-1]["params"] == [balancer.theta]
    # ...and a balanced checkpoint loads into a fixed run (the extra group is dropped).
    loop.save_checkpoint(tmp_path, model, grown, loop.TrainState(epoch=1), {}, balancer)
    fixed = balance.make_balancer("fixed", config.tasks.weights())
    _, optimizer_state = loop.load_checkpoint(tmp_path, model, fixed)
    plain = loop.make_optimizer(model, config.optim)
    plain.load_state_dict(balance.fit_optimizer_state(plain, optimizer_state))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("tasks.balance=learned", "tasks.balance"),
        ("tasks.balance_lr_scale=0", "tasks.balance_lr_scale"),
        ("tasks.balance_alpha=-1", "tasks.balance_alpha"),
    ],
)
def test_bad_balance_config_is_an_error_naming_the_key(override, named, tmp_path):
    with pytest.raises(ConfigError, match=rf"config key '{named}'") as err:
        load_config(TrainConfig, DEMO, [f"storage={tmp_path}", override])
    assert len(str(err.value).splitlines()) == 1


def test_fixed_balance_is_the_weighted_sum():
    fixed = balance.make_balancer("fixed", {"a": 2.0, "b": 0.5})
    assert list(fixed.parameters()) == [] and balance.param_group(fixed) is None
    total = fixed({"a": torch.tensor(3.0), "b": torch.tensor(4.0)})
    assert float(total) == pytest.approx(8.0)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # each worker sees different data, hence different losses
        balancer = balance.UncertaintyBalancer({"a": 1.0, "b": 1.0}, lr_scale=10.0)
        optimizer = torch.optim.Adam(balancer.parameters(), lr=0.01)
        for _ in range(20):
            losses = {"a": torch.rand(()) * (1 + rank), "b": torch.rand(()) * 0.1}
            balancer(losses).backward()
            balancer.all_reduce_grads()
            optimizer.step()
            optimizer.zero_grad()
        gathered = [torch.zeros(2) for _ in range(world)]
        dist.all_gather(gathered, balancer.theta.detach().clone())
        if rank == 0:
            torch.save(gathered, out)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_learned_weights_stay_identical_across_ddp_workers(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "theta.pt")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    first, second = torch.load(out)
    assert torch.equal(first, second)
    assert not torch.equal(first, torch.zeros(2))  # they did move
