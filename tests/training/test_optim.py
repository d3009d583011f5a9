"""AdamW parameter groups and the warm-up + decay schedules."""

import math

import pytest
import torch

from scaling.config import TrainArgs
from scaling.training.optim import build_optimizer, build_scheduler, lr_lambda, parameter_groups


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.embed_positions = torch.nn.Embedding(8, 4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_groups_split_decay_from_biases_norms_and_position_tables():
    model = Tiny()
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p is model.proj.weight for p in decay["params"]] == [True]
    assert {id(p) for p in no_decay["params"]} == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias),
                                                   id(model.embed_positions.weight)}


def test_optimizer_refuses_a_model_with_nothing_to_train():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainArgs())


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_linearly_then_decays(kind):
    warmup, total = 10, 100
    values = [lr_lambda(s, warmup, total, kind) for s in range(total + 1)]
    assert all(a < b for a, b in zip(values[:warmup], values[1:warmup + 1], strict=True))
    assert values[warmup] == pytest.approx(1.0)
    expected_end = {"cosine": 0.0, "linear": 0.0, "constant": 1.0}[kind]
    assert values[-1] == pytest.approx(expected_end, abs=1e-9)
    if kind == "cosine":
        assert values[warmup + 45] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_scheduler_state_round_trips_for_resume():
    args = TrainArgs(max_steps=20, warmup_ratio=0.1, lr=1e-3)
    model = Tiny()
    opt = build_optimizer(model, args)
    sched = build_scheduler(opt, args)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    sched2 = build_scheduler(build_optimizer(Tiny(), args), args)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
