"""Test-wide environment: nothing may reach a hub or the W&B servers; one thread per process;
child processes (console scripts, srun tasks) can import `tests.support` (the faults they are
given by dotted path in `trainer.callbacks`).

Tiny models run no faster on two threads, and two test processes (or a test and its
subprocess) fighting over two cores made tiny backward passes tens of times slower.
"""

import os
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([_REPO, *filter(None, [os.environ.get("PYTHONPATH")])])

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402  (after the environment: importing torch must see OMP_NUM_THREADS)
import torch  # noqa: E402

from sd3train.tools.make_shapes import build_shapes  # noqa: E402


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread in the test process too (torch may have read OMP_NUM_THREADS earlier):
    tiny models run fastest on one, and two threads on a busy 2-core box were 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restored_environment():
    """Each test leaves os.environ as it found it. A run inside the test process sets variables
    that console scripts started later would inherit: W&B's service address (WANDB_SERVICE; the
    shared service then refuses a resumed run's id as "in use"), and Lightning's LOCAL_RANK,
    NODE_RANK and MASTER_PORT after an in-process FSDP2 run (a 2-rank run started later then takes
    its processes as launched externally and waits for a rank that never comes)."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def small_shapes(tmp_path_factory) -> Path:
    """4 train shards of 64 samples and a 32-sample validation shard, written by the project's tool."""
    out = tmp_path_factory.mktemp("shapes")
    build_shapes(out, train=256, val=32, samples_per_shard=64)
    return out


@pytest.fixture(scope="session")
def repo_shapes() -> Path:
    """The default shards under data/shapes, as `make train` writes them (idempotent)."""
    out = Path(_REPO) / "data" / "shapes"
    build_shapes(out)
    return out
