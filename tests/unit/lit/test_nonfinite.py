"""The non-finite guard's parts: a vetoed AdamW step changes nothing, consecutive skips stop the run."""

from __future__ import annotations

import pytest
import torch

from sd3train.lit.nonfinite import NonFiniteError, NonFiniteGuard, SkippableAdamW


def _trained_pair():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = SkippableAdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # moments exist from here on
    return model, optimizer


def test_a_vetoed_step_leaves_weights_and_moments_alone_and_runs_the_closure():
    model, optimizer = _trained_pair()
    weights = [p.detach().clone() for p in model.parameters()]
    moments = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = model(torch.randn(2, 4)).sum() * float("nan")
        loss.backward()
        return loss

    optimizer.skip_update = True
    loss = optimizer.step(closure)
    assert calls == [1] and torch.isnan(loss)
    assert all(torch.equal(before, after) for before, after in zip(weights, model.parameters()))
    assert all(torch.equal(moments[k], optimizer.state[model.weight][k]) for k in moments)
    optimizer.skip_update = False
    optimizer.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(weights[0], model.weight)  # the control: an allowed step moves the weights


def test_guard_counts_skips_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard(max_consecutive=3)
    for finite_loss, expected_skip in [(True, False), (False, True), (False, True), (True, False), (False, True)]:
        guard.observe_loss(finite_loss)
        assert guard.decide(grad_norm_finite=True) == expected_skip
        guard.check(step=0)
    assert (guard.total, guard.consecutive) == (3, 1)
    guard.observe_loss(True)
    assert guard.decide(grad_norm_finite=False)  # an infinite gradient norm alone skips too
    guard.observe_loss(False)
    guard.decide(True)
    with pytest.raises(NonFiniteError, match="3 consecutive steps up to step 9.*trainer.max_nonfinite_steps=3"):
        guard.check(step=9)
    restored = NonFiniteGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert (restored.total, restored.consecutive) == (5, 3)


def test_a_non_finite_micro_batch_skips_the_whole_accumulated_step():
    guard = NonFiniteGuard(max_consecutive=2)
    for finite in (True, False, True):
        guard.observe_loss(finite)
    assert guard.decide(True)
    guard.observe_loss(True)
    assert not guard.decide(True)  # the window was reset
