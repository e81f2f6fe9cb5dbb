"""Training checkpoints of adapter runs (`adapter=lora|dora|loha|lokr`): they hold the adapter weights
and `sd3train_adapter_base` ({"weights": model.weights, "digest": ...}); the base comes from that
path and must have that digest.

    check_adapter_base(checkpoint_dict, digest_of_the_base_here, "path/of/the/base")

The adapted MM-DiT of such a checkpoint: `sd3train.checkpoint.transformer_loader.adapted_transformer`.
"""

from __future__ import annotations

from sd3train.checkpoint.errors import CheckpointError

BASE_KEY = "sd3train_adapter_base"


def check_adapter_base(checkpoint: dict, digest: str, weights: str | None) -> None:
    """Refuse (CheckpointError, naming both) adapter weights trained on another base than the one
    `digest` identifies (the base `weights` this run loaded)."""
    saved = checkpoint.get(BASE_KEY)
    if saved is None:
        raise CheckpointError("the checkpoint holds no adapter base record (sd3train_adapter_base): it was not "
                              "written by an adapter run")
    if saved["digest"] != digest:
        raise CheckpointError(
            f"the adapter was trained on base weights {saved['weights']} (digest {saved['digest']}), but this "
            f"model's base, model.weights={weights}, has digest {digest}: load it onto the base it was trained on")
