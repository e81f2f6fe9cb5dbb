"""`strategy=fsdp`: PyTorch FSDP2 through Lightning's `ModelParallelStrategy`.

    sd3train-train experiment=tiny_cpu strategy=fsdp trainer.devices=2          # 2 CPU processes, gloo
    sd3train-train strategy=fsdp_hybrid trainer.devices=8 trainer.num_nodes=4   # HSDP over 4 nodes

The module shards itself in `configure_model` (`SD3LitModule.configure_model`, with
`sd3train.model.sharding.shard_mmdit`) over `fsdp_mesh`: one dimension of every rank, or for
`strategy.hybrid` (replicate over nodes, shard within a node). The frozen VAE and text encoders
are not sharded: every rank keeps a copy (or, on the precompute cache, does not build them).

Checkpoints are torch.distributed.checkpoint (DCP) directories: each rank writes its shards, rank 0
the rest of Lightning's checkpoint (`meta.pt`). DCP reshards on load, so a checkpoint resumes on
any number of ranks. Frozen parts loaded from weight files are not saved
(`SD3LitModule.on_save_checkpoint`); loading reads the keys the checkpoint holds and leaves those
as the weight files gave them.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy

# The top-level keys Lightning's ModelParallelStrategy writes into the DCP checkpoint.
MODEL_KEY = "state_dict"
OPTIMIZER_KEY = "optimizer_{}"


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with one data-parallel mesh dimension of all ranks (no tensor
    parallelism), a (replicate, shard) mesh for hybrid sharding, checkpoint loading that tolerates
    the frozen parts a checkpoint leaves out, and the process group destroyed at teardown (2-process
    gloo runs otherwise sometimes abort at exit)."""

    strategy_name = "fsdp2"

    def __init__(self, world_size: int, num_nodes: int, hybrid: bool, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = default_pg_timeout):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.hybrid = hybrid
        self.hybrid_nodes = num_nodes
        self._fsdp_mesh = None

    @property
    def fsdp_mesh(self):
        """The mesh the MM-DiT is sharded over: (world,) or, hybrid, (nodes, ranks per node)."""
        if self._fsdp_mesh is None:
            if self.hybrid:
                from torch.distributed.device_mesh import init_device_mesh

                per_node = self.world_size // self.hybrid_nodes
                self._fsdp_mesh = init_device_mesh(self.root_device.type, (self.hybrid_nodes, per_node),
                                                   mesh_dim_names=("replicate", "shard"))
            else:
                self._fsdp_mesh = self.device_mesh["data_parallel"]
        return self._fsdp_mesh

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not (path / _METADATA_FILENAME).is_file():
            raise FileNotFoundError(f"{path} is not an FSDP2 (DCP) checkpoint directory: no {_METADATA_FILENAME}")
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        model = self.model
        current = get_model_state_dict(model)
        # Keys the checkpoint holds; the rest (frozen parts from weight files) stay as they are.
        wanted = {key: value for key, value in current.items() if f"{MODEL_KEY}.{key}" in saved}
        dcp.load({MODEL_KEY: wanted}, checkpoint_id=path)
        set_model_state_dict(model, wanted, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = OPTIMIZER_KEY.format(index)
            state = {key: get_optimizer_state_dict(model, optimizer)}
            dcp.load(state, checkpoint_id=path)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state[key])
        return torch.load(path / _METADATA_FILENAME, weights_only=False)

    def teardown(self) -> None:
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
