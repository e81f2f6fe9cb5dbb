"""The non-finite guard: a step whose loss or gradient norm is not finite changes nothing.

    optimizer = SkippableAdamW(params, lr=...)        # fused AdamW whose update can be vetoed per step
    guard = NonFiniteGuard(max_consecutive=3, device=device)
    guard.observe_loss(torch.isfinite(loss))          # per micro-batch: a device tensor, never read
    finite = guard.take_window() & torch.isfinite(grad_norm)   # before the optimizer step
    ok = guard.decide(finite, step)                   # `finite` and-ed over the ranks first
    optimizer.found_inf = guard.found_inf             # the fused kernel skips the update on the device
    guard.check(step)                                 # at logging and checkpoint steps: may raise

A skipped step still counts as a step (the LR schedule and the per-step random streams stay a
function of the step number), but the weights, the optimizer moments and the EMA stay as they
were. The decision stays on the device, so an ordinary step never waits for the host to read a
value: fused AdamW takes it as `found_inf` (the same mechanism as AMP's grad scaler) and the EMA
as a zero weight. `max_consecutive` skipped steps in a row freeze every later update on the device
and record the step; the next `check` (a logging or checkpoint step) raises `NonFiniteError`
naming that step, which the entry point turns into exit status 3
(`sd3train.runtime.exit_codes.NONFINITE_EXIT_CODE`). So the run stops with the weights of the step
before the K-th bad one, exactly as if the host had looked at every step; no checkpoint is written
after a skipped step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the run is diverging."""


class SkippableAdamW(torch.optim.AdamW):
    """torch's fused AdamW (one kernel for every parameter; on CPU too, about 4x faster there than
    foreach) whose update is skipped when `found_inf` (a device tensor) is nonzero, read by the
    kernel itself, or when `skip_update` (a host bool: DeepSpeed's ZeRO decides on the host) is set.
    `grad_scale` (a device tensor, or None) divides every gradient inside the same kernel: gradient
    clipping without a pass of its own (the mechanism is AMP's grad scaler's, as for `found_inf`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("fused", True)
        super().__init__(*args, **kwargs)
        if not self.defaults.get("fused"):
            raise ValueError("SkippableAdamW needs fused=True: found_inf and grad_scale are read by the fused kernel")
        self.skip_update = False
        self.found_inf: Optional[torch.Tensor] = None
        self.grad_scale: Optional[torch.Tensor] = None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_update:
            return loss
        super().step()  # reads self.found_inf and self.grad_scale (torch's fused AdamW does)
        return loss


class NonFiniteGuard:
    """Counts skipped steps on the device; state round-trips through `state_dict` (kept in checkpoints)."""

    def __init__(self, max_consecutive: int, device: torch.device | str = "cpu"):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self._reset(torch.device(device))

    def _reset(self, device: torch.device, total: int = 0, consecutive: int = 0) -> None:
        def counter(value: int) -> torch.Tensor:
            return torch.full((), value, dtype=torch.int64, device=device)

        self.total, self.consecutive = counter(total), counter(consecutive)
        self.halted_at = counter(0)  # the step the K-th bad step in a row was, 0 while training goes on
        self.ok = torch.ones((), dtype=torch.bool, device=device)  # the last decided step was applied
        self._window_ok = torch.ones((), dtype=torch.bool, device=device)  # over the step's micro-batches

    def to(self, device: torch.device | str) -> "NonFiniteGuard":
        for name in ("total", "consecutive", "halted_at", "ok", "_window_ok"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def observe_loss(self, finite: torch.Tensor) -> None:
        if finite.device != self._window_ok.device:
            self.to(finite.device)
        self._window_ok = self._window_ok & finite

    def take_window(self) -> torch.Tensor:
        """Whether every micro-batch loss since the last call was finite (a device bool); starts a new window."""
        window, self._window_ok = self._window_ok, torch.ones_like(self._window_ok)
        return window

    def decide(self, finite: torch.Tensor, step: int) -> torch.Tensor:
        """Whether optimizer step `step` (1-based), whose losses and gradient norm were `finite` (a
        device bool, the same on every rank), may update anything: False when they were not, or
        once the guard halted."""
        if finite.device != self.total.device:  # the counters follow the training device
            self.to(finite.device)
        self.total += ~finite
        self.consecutive = torch.where(finite, 0, self.consecutive + 1)
        newly_halted = (self.halted_at == 0) & (self.consecutive >= self.max_consecutive)
        self.halted_at = torch.where(newly_halted, step, self.halted_at)
        self.ok = finite & (self.halted_at == 0)
        return self.ok

    @property
    def found_inf(self) -> torch.Tensor:
        """What fused AdamW skips on: 1.0 when the decided step must change nothing."""
        return (~self.ok).float()

    @property
    def last_skipped(self) -> bool:
        """Whether the last decided step was skipped (reads the device: checkpoint steps only)."""
        return not bool(self.ok)

    def check(self) -> None:
        """Raise NonFiniteError once `max_consecutive` steps in a row were skipped (reads the device)."""
        halted_at = int(self.halted_at)
        if halted_at:
            raise NonFiniteError(
                f"{self.max_consecutive} consecutive steps up to step {halted_at} had a non-finite loss or gradient "
                f"norm (trainer.max_nonfinite_steps={self.max_consecutive}); stopping without a new checkpoint. "
                "Lower optim.lr, check the data, or resume from the last checkpoint."
            )

    def state_dict(self) -> dict[str, int]:
        return {"total": int(self.total), "consecutive": int(self.consecutive)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._reset(self.total.device, int(state["total"]), int(state["consecutive"]))
