"""The non-finite guard: a step whose loss or gradient norm is not finite changes nothing.

    optimizer = SkippableAdamW(params, lr=...)        # AdamW whose update can be vetoed per step
    guard = NonFiniteGuard(max_consecutive=3)
    guard.observe_loss(loss_is_finite)                # per micro-batch, all ranks agreeing
    skip = guard.decide(grad_norm_is_finite)          # before the optimizer step
    optimizer.skip_update = skip

A skipped step still counts as a step (the LR schedule and the per-step random streams stay a
function of the step number), but the weights, the optimizer moments and the EMA stay as they
were. `max_consecutive` skipped steps in a row raise `NonFiniteError`, which the entry point
turns into exit status 3 (`sd3train.runtime.exit_codes.NONFINITE_EXIT_CODE`); no checkpoint is written after a skipped step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the run is diverging."""


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose `step` runs the closure but leaves parameters and state alone when
    `skip_update` is set (the flag is read after the closure, which is where it gets decided)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip_update = False

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_update:
            return loss
        super().step()
        return loss


class NonFiniteGuard:
    """Counts skipped steps; state round-trips through `state_dict` (kept in checkpoints)."""

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0
        self._window_finite = True  # over the micro-batches of the step being accumulated
        self.last_skipped = False

    def observe_loss(self, finite: bool) -> None:
        self._window_finite = self._window_finite and bool(finite)

    def decide(self, grad_norm_finite: bool) -> bool:
        """True when the step must be skipped; resets the micro-batch window."""
        skip = not (self._window_finite and bool(grad_norm_finite))
        self._window_finite = True
        self.last_skipped = skip
        if skip:
            self.total += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        return skip

    def check(self, step: int) -> None:
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps up to step {step} had a non-finite loss or gradient norm "
                f"(trainer.max_nonfinite_steps={self.max_consecutive}); stopping without a new checkpoint. "
                "Lower optim.lr, check the data, or resume from the last checkpoint."
            )

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total = int(state["total"])
        self.consecutive = int(state["consecutive"])
