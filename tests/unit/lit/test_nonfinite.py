"""The non-finite guard's parts: a vetoed AdamW step changes nothing, consecutive skips stop the run,
and the decision stays on the device until a check reads it."""

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


def _nan_closure(model, optimizer, calls):
    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = model(torch.randn(2, 4)).sum() * float("nan")
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("veto", ["skip_update", "found_inf"])
def test_a_vetoed_step_leaves_weights_and_moments_alone_and_runs_the_closure(veto):
    model, optimizer = _trained_pair()
    assert optimizer.defaults["fused"]
    weights = [p.detach().clone() for p in model.parameters()]
    moments = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    calls = []
    if veto == "skip_update":  # decided on the host (DeepSpeed)
        optimizer.skip_update = True
    else:  # decided on the device, read by the fused kernel
        optimizer.found_inf = torch.ones(())
    loss = optimizer.step(_nan_closure(model, optimizer, calls))
    assert calls == [1] and torch.isnan(loss)
    assert all(torch.equal(before, after) for before, after in zip(weights, model.parameters()))
    assert all(torch.equal(moments[k], optimizer.state[model.weight][k]) for k in moments)  # the step count too
    optimizer.skip_update, optimizer.found_inf = False, torch.zeros(())
    optimizer.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(weights[0], model.weight)  # the control: an allowed step moves the weights


def _decide(guard: NonFiniteGuard, losses_finite, grad_finite, step: int) -> bool:
    for finite in losses_finite:
        guard.observe_loss(torch.tensor(finite))
    return bool(guard.decide(guard.take_window() & torch.tensor(grad_finite), step))


def test_guard_counts_skips_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard(max_consecutive=3)
    for step, (finite_loss, expected_skip) in enumerate(
            [(True, False), (False, True), (False, True), (True, False), (False, True)], start=1):
        assert _decide(guard, [finite_loss], True, step) != expected_skip
        assert guard.last_skipped == expected_skip and float(guard.found_inf) == float(expected_skip)
        guard.check()
    assert (int(guard.total), int(guard.consecutive)) == (3, 1)
    assert not _decide(guard, [True], False, 6)  # an infinite gradient norm alone skips too
    assert not _decide(guard, [False], True, 7)
    with pytest.raises(NonFiniteError, match="3 consecutive steps up to step 7.*trainer.max_nonfinite_steps=3"):
        guard.check()
    restored = NonFiniteGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert (int(restored.total), int(restored.consecutive)) == (5, 3)
    assert not _decide(guard, [True], True, 8)  # halted at step 7: a finite step updates nothing either
    with pytest.raises(NonFiniteError, match="up to step 7"):
        guard.check()


def test_a_non_finite_micro_batch_skips_the_whole_accumulated_step():
    guard = NonFiniteGuard(max_consecutive=2)
    assert not _decide(guard, [True, False, True], True, 1)
    assert _decide(guard, [True], True, 2)  # the window was reset


def test_the_decision_is_a_device_tensor_read_only_by_check():
    guard = NonFiniteGuard(max_consecutive=1)
    ok = guard.decide(guard.take_window() & torch.tensor(False), step=4)
    assert isinstance(ok, torch.Tensor) and ok.dtype == torch.bool and ok.shape == ()
    assert int(guard.halted_at) == 4
