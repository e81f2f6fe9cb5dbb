"""Reading and writing weight files: safetensors (single, sharded with an index), Lightning checkpoints
(a .ckpt file, a DeepSpeed or FSDP2 checkpoint directory, a published step directory).

Every read error names the file: a truncated or corrupt safetensors file fails here with its path,
never deep inside torch. Writes are atomic: a temporary sibling, then a rename, so a crash leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.step_dirs import training_checkpoint_file
from sd3train.durable import fsync_path, replace, temporary_file, with_default_mode

# Weight files of one diffusers / transformers component folder, in the order they are looked for.
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # Integer tensors (none in our models today) keep their type.
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def safetensors_header(file: Path) -> tuple[list[str], dict[str, str]]:
    """(keys, metadata) of a safetensors file without reading its tensors."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read safetensors file {file}: {error}") from error


def read_safetensors(
    file: Path,
    *,
    select: Callable[[str], str | None] = lambda key: key,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of `file` whose key `select` maps to a name (None skips the key), cast to `dtype`.

    Only selected tensors are read, one at a time, so one component of a large single file costs
    its own size in memory.
    """
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                name = select(key)
                if name is not None:
                    out[name] = _cast(handle.get_tensor(key), dtype)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read safetensors file {file}: {error}") from error
    return out


def with_prefix(prefix: str) -> Callable[[str], str | None]:
    """A `select` for `read_safetensors`: keys under `prefix`, with the prefix removed."""
    return lambda key: key[len(prefix):] if key.startswith(prefix) else None


def component_weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a diffusers / transformers component folder (shards via the index)."""
    for name in INDEX_NAMES:
        index = folder / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as error:
                raise CheckpointError(f"cannot read shard index {index}: {error}") from error
            shards = [folder / shard for shard in dict.fromkeys(weight_map.values())]
            absent = [str(shard) for shard in shards if not shard.is_file()]
            if absent:
                raise CheckpointError(f"shard index {index} names missing file(s): {', '.join(absent)}")
            return shards
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:  # e.g. a variant such as diffusion_pytorch_model.fp16.safetensors
        return candidates
    found = ", ".join(path.name for path in sorted(folder.iterdir())) or "nothing"
    raise CheckpointError(
        f"no safetensors weights in {folder}: looked for {', '.join(INDEX_NAMES + WEIGHT_NAMES)} "
        f"(or exactly one *.safetensors); found {found}"
    )


def read_component_weights(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a component folder, shards merged."""
    out: dict[str, torch.Tensor] = {}
    for file in component_weight_files(folder):
        out.update(read_safetensors(file, dtype=dtype))
    return out


def read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {file}: {error}") from error


def torch_load(file: Path, *, weights_only: bool, what: str) -> object:
    """`torch.load` onto the CPU, memory-mapped (tensors paged in on use) unless the file is in the
    legacy non-zip format; CheckpointError naming `what` and the file if it cannot be read."""
    try:
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=weights_only)
        except RuntimeError as error:
            if "mmap" not in str(error):  # only the legacy (non-zip) format cannot be mapped
                raise
            return torch.load(file, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # torch raises many types for a damaged pickle or zip
        raise CheckpointError(f"cannot read {what} {file}: {type(error).__name__}: {error}") from error


# What DeepSpeed keeps beside Lightning's own state in a ZeRO model-states file.
DEEPSPEED_STATE_KEYS = frozenset({
    "module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "buffer_names", "param_shapes", "frozen_param_shapes",
    "frozen_param_fragments", "shared_params", "ds_config", "ds_version", "data_sampler", "random_ltd",
    "checkpoint_parallel_dimensions",
})


def read_zero_checkpoint(folder: Path) -> dict:
    """A DeepSpeed ZeRO checkpoint directory (what Lightning's DeepSpeed strategy saves as `*.ckpt/`)
    consolidated in memory into a Lightning checkpoint dict: fp32 `state_dict` gathered from every
    rank's shards (the `_forward_module.` wrapper prefix removed), plus the Lightning state saved
    beside it (global_step, sd3train_config, ...)."""
    try:
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
            get_model_state_file,
            get_optim_files,
        )
    except ImportError as error:
        raise CheckpointError(f"{folder} is a DeepSpeed checkpoint directory; reading it needs deepspeed "
                              f"installed ({error})") from error
    latest = folder / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{folder} is a directory but not a DeepSpeed checkpoint (no 'latest' file)")
    try:
        tag_dir = folder / latest.read_text().strip()
        with contextlib.redirect_stdout(sys.stderr):  # deepspeed prints its progress
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(folder))
        optim = torch.load(get_optim_files(str(tag_dir))[0], map_location="cpu", weights_only=False)
        model_file = get_model_state_file(str(tag_dir), optim["optimizer_state_dict"]["zero_stage"])
        client_state = torch.load(model_file, map_location="cpu", weights_only=False)
    except Exception as error:  # deepspeed raises ValueError, FileNotFoundError, pickle and zip errors
        raise CheckpointError(f"cannot read DeepSpeed checkpoint {folder}: {type(error).__name__}: {error}") from error
    checkpoint = {key: value for key, value in client_state.items() if key not in DEEPSPEED_STATE_KEYS}
    prefix = "_forward_module."
    checkpoint["state_dict"] = {key[len(prefix):] if key.startswith(prefix) else key: value
                                for key, value in state_dict.items()}
    return checkpoint


DCP_METADATA_FILES = ("meta.pt", ".metadata")  # Lightning's rest of the checkpoint; DCP's index


def read_dcp_checkpoint(folder: Path) -> dict:
    """An FSDP2 checkpoint directory (torch.distributed.checkpoint shards, what strategy=fsdp saves)
    consolidated in memory, in one process, into a Lightning checkpoint dict: the full `state_dict`
    (every shard of every rank joined) and the Lightning state in meta.pt. Optimizer states are
    not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = "state_dict."
    try:
        saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        tensors = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
                   for key, meta in saved.items()
                   if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"state_dict": tensors}, checkpoint_id=str(folder), no_dist=True)
        checkpoint = torch.load(folder / DCP_METADATA_FILES[0], map_location="cpu", weights_only=False)
    except Exception as error:  # DCP raises CheckpointException, OSError, pickle and zip errors
        raise CheckpointError(f"cannot read FSDP2 (DCP) checkpoint {folder}: {type(error).__name__}: {error}") from error
    checkpoint["state_dict"] = tensors
    return checkpoint


def read_lightning_checkpoint(file: Path) -> dict:
    """A Lightning checkpoint written by sd3train-train: a .ckpt file (memory-mapped, so tensors are
    paged in on use), a DeepSpeed or FSDP2 checkpoint directory (consolidated), or a published step
    directory / `last` holding either (see `step_dirs.training_checkpoint_file`).

    Unpickled with weights_only=False: the checkpoint is our own format and holds optimizer and
    loop state objects. Do not load .ckpt files from untrusted sources.
    """
    file = training_checkpoint_file(Path(file))
    if file.is_dir() and all((file / name).is_file() for name in DCP_METADATA_FILES):
        checkpoint = read_dcp_checkpoint(file)
    elif file.is_dir():
        checkpoint = read_zero_checkpoint(file)
    else:
        checkpoint = torch_load(file, weights_only=False, what="checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{file} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write `tensors` to `file` through a temporary sibling, fsynced, and a rename (`sd3train.durable`)."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = temporary_file(file.parent, file.name)
    os.close(descriptor)  # safetensors writes by name
    try:
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(staging), metadata=metadata)
        fsync_path(staging)
        replace(with_default_mode(staging), file)  # the mode after writing: safetensors makes the file anew
    finally:
        staging.unlink(missing_ok=True)
    return file


def write_json(data: dict, file: Path) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
