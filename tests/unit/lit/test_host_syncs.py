"""An ordinary training step (neither a logging nor a checkpoint step) never waits for the device:
no tensor value is read back to the host, and no tensor made on the host is copied to the device.

Counted from Python, where every such read or copy starts (`__torch_function__` sees each tensor
method call): `.item()`, `.tolist()`, `.numpy()`, `bool()`, `float()`, `int()` of a tensor, and
`.to()` / `.copy_()` / `.cuda()` that move a tensor between devices, from one ordinary step's start
to the next step's start (Lightning's own work after the step included). On a CPU-only machine a
move between devices cannot happen, so the copies count only on a GPU; the reads count everywhere.
"""

from __future__ import annotations

import collections
import traceback

import lightning as L
import torch
from torch.overrides import TorchFunctionMode

from sd3train.train import fit
from tests.support.config import tiny_config

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__array__}
MOVES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cuda}
LOG_EVERY = 4


def _devices_in(args, kwargs) -> set[torch.device]:
    found = set()
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.add(value.device)
        elif isinstance(value, (str, torch.device)):
            try:
                found.add(torch.device(value))
            except RuntimeError:  # a dtype name or another string
                pass
    return found


class CountHostTraffic(TorchFunctionMode):
    """Counts reads and cross-device moves while `active`, keyed by what and where (the stack)."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.seen: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            moved = func in MOVES and args and isinstance(args[0], torch.Tensor) and any(
                device.type != args[0].device.type for device in _devices_in(args[1:], kwargs))
            if func in READS or moved:
                where = "".join(traceback.format_stack(limit=6)[:-1])
                self.seen[f"{func.__name__}\n{where}"] += 1
        return func(*args, **kwargs)


class CountOrdinarySteps(L.Callback):
    """Switches the counter on from the start of each ordinary step to the start of the next."""

    def __init__(self, counter: CountHostTraffic, checkpoint_every: int):
        self.counter = counter
        self.checkpoint_every = checkpoint_every
        self.counted_steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step + 1  # the optimizer step this batch makes
        ordinary = step > 1 and step % LOG_EVERY and step % self.checkpoint_every and step < trainer.max_steps
        self.counter.active = bool(ordinary)
        self.counted_steps += bool(ordinary)

    def on_train_end(self, trainer, pl_module):
        self.counter.active = False


def test_ordinary_training_steps_read_nothing_back_from_the_device(small_shapes, tmp_path):
    cfg = tiny_config(small_shapes, tmp_path, "model.depth=1", "data.batch_size=4", "data.num_workers=1",
                      "trainer.max_steps=10", f"trainer.log_every_n_steps={LOG_EVERY}",
                      "trainer.checkpoint_every_n_steps=5", "data.val_shards=null", "eval.prompts=[]",
                      "eval.samples_per_caption=0", "logger.wandb=false", "trainer.progress_bar=true",
                      "model.pos_embed_random_crop=true", "ema.every_n_steps=1", "optim.grad_clip=1.0")
    counter = CountHostTraffic()
    steps = CountOrdinarySteps(counter, cfg.trainer.checkpoint_every_n_steps)
    with counter:
        fit(cfg, extra_callbacks=(steps,))
    assert steps.counted_steps == 5  # steps 2, 3, 6, 7, 9
    assert not counter.seen, "\n".join(f"{count}x {where}" for where, count in counter.seen.most_common(5))


def test_the_counter_sees_a_read_and_a_move():
    counter = CountHostTraffic()
    counter.active = True
    with counter:
        float(torch.ones(()))
        torch.ones(2).to("meta")
    assert sum(counter.seen.values()) == 2
