"""EMA of model weights: warm-up decay, exact update rule, frozen shadow."""

from __future__ import annotations

import torch
from torch import nn

from sd3train.lit.ema import EMAModel


def test_ema_update_follows_the_formula():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMAModel(model, decay=0.9)
    before = [p.detach().clone() for p in ema.shadow.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    decay = ema.current_decay()
    assert decay == min(0.9, 1 / 10)
    ema.update(model)
    for shadow, old, new in zip(ema.shadow.parameters(), before, model.parameters()):
        # lerp and the written-out formula round differently: allow one float32 ulp (~1.2e-7 relative).
        torch.testing.assert_close(shadow, decay * old + (1 - decay) * new, rtol=2.4e-7, atol=1e-7)
    assert int(ema.num_updates) == 1


def test_ema_decay_warms_up_to_the_configured_value():
    ema = EMAModel(nn.Linear(1, 1), decay=0.99)
    ema.num_updates.fill_(10_000)
    assert ema.current_decay() == 0.99


def test_shadow_is_frozen_and_stays_in_eval_mode():
    ema = EMAModel(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), decay=0.9)
    ema.train()
    assert not ema.shadow.training
    assert not any(p.requires_grad for p in ema.shadow.parameters())


def test_ema_state_round_trips():
    model = nn.Linear(3, 2)
    ema = EMAModel(model, decay=0.9)
    ema.update(model)
    copy = EMAModel(nn.Linear(3, 2), decay=0.9)
    copy.load_state_dict(ema.state_dict())
    assert int(copy.num_updates) == 1
    for a, b in zip(copy.shadow.parameters(), ema.shadow.parameters()):
        assert torch.equal(a, b)


def test_every_k_steps_the_average_takes_decay_to_the_k_and_a_skipped_step_changes_nothing():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMAModel(model, decay=0.9, every_n_steps=4)
    ema.num_updates.fill_(1000)  # past the warm-up
    assert [ema.due(step) for step in range(1, 9)] == [False, False, False, True] * 2
    assert torch.isclose(ema.current_decay(), torch.tensor(0.9**4, dtype=torch.float64))
    before = [p.detach().clone() for p in ema.shadow.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, applied=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow.parameters())) and int(ema.num_updates) == 1000
    ema.update(model, applied=torch.tensor(True))
    for shadow, old, new in zip(ema.shadow.parameters(), before, model.parameters()):
        torch.testing.assert_close(shadow, 0.9**4 * old + (1 - 0.9**4) * new, rtol=2.4e-7, atol=1e-7)
    assert int(ema.num_updates) == 1001


def test_the_warm_up_counts_steps_so_every_k_keeps_the_horizon_of_every_step():
    every_step = EMAModel(nn.Linear(1, 1), decay=0.9999)
    every_ten = EMAModel(nn.Linear(1, 1), decay=0.9999, every_n_steps=10)
    # After 300 steps: 300 updates of one, 30 updates of the other.
    every_step.num_updates.fill_(300)
    every_ten.num_updates.fill_(30)
    assert every_ten.current_decay() == (301 / 310) ** 10
    # Ten single-step updates from there multiply to nearly the same decay (0.7480 against 0.7448;
    # counting updates instead of steps would give (31 / 40) ** 10 = 0.078).
    product = 1.0
    for n in range(300, 310):
        product *= (1 + n) / (10 + n)
    assert abs(float(every_ten.current_decay()) - product) < 5e-3
    assert every_step.current_decay() == 301 / 310
