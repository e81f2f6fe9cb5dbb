"""Process groups for the tests of sharded code: `world_size` spawned CPU processes joined by gloo.

    def rank_main(rank, world_size, out): ...          # a module-level function (it is pickled)
    run_ranks(rank_main, 2, str(tmp_path / "result"))  # returns once every rank has finished
"""

from __future__ import annotations

import os
import socket
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, main: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        main(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(main: Callable, world_size: int, *args) -> None:
    """Call `main(rank, world_size, *args)` in `world_size` processes inside one gloo process group;
    an exception in any of them fails the call."""
    mp.spawn(_entry, args=(world_size, free_port(), main, args), nprocs=world_size, join=True)
