"""Export a checkpoint as a diffusers pipeline folder or as one Stability-style safetensors file.

    sd3train-export checkpoint=runs/tiny_cpu/main/checkpoints/last format=diffusers out=exports/tiny
    sd3train-export checkpoint=runs/.../checkpoints/step-0002500 format=single_file out=exports/tiny.safetensors dtype=bf16

Arguments are key=value, like Hydra overrides:
  checkpoint     (required) our checkpoint (a step directory, checkpoints/last or a .ckpt; EMA weights when
                 present), a single file, or a diffusers folder
  format         (required) diffusers | single_file | lora_diffusers | lora_kohya
  out            (required) the folder (diffusers) or .safetensors file (the others) to write
  merge          an adapter run's checkpoint as diffusers / single_file: true merges the adapter into
                 its base (required for those formats; the lora_* formats write the adapter alone)
  dtype          fp32 | bf16 | fp16 (default fp32)
  vae, text      take the VAE / the text encoders from another checkpoint (default: checkpoint)
  text_encoders  single_file: include the text encoders too (default false, as in sd3.5_large.safetensors)
  shift          the scheduler's shift (default: the checkpoint's sampler shift, else 3.0)
  t5_tokenizer, t5_max_length   for text encoders read from a single file (which has no tokenizers)
  overwrite      replace an existing out (default false)

An adapter run's LoRA (adapter=lora) exports alone: lora_diffusers loads with
`StableDiffusion3Pipeline.load_lora_weights(out)` (diffusers module names, the fused qkv split into q,
k and v, alpha / rank folded into B), lora_kohya in ComfyUI and kohya sd-scripts
(`lora_unet_joint_blocks_N_..._lora_down/lora_up/alpha`). The EMA adapter is exported when there is one.
Adapted text encoders (adapter.text_encoders) go in the same file: `text_encoder.` / `text_encoder_2.`
(diffusers) or `lora_te1_` / `lora_te2_` (kohya) keys; merge=true merges them into the exported
encoders (single_file then needs text_encoders=true).

The diffusers folder loads with `StableDiffusion3Pipeline.from_pretrained(out)`; sample with
`max_sequence_length` set to the training T5 length (recorded as tokenizer_3's model_max_length;
T5 runs unmasked, so padding changes its output) and the negative prompt "" (the pipeline's default).
The single file loads with `SD3Transformer2DModel.from_single_file(out, config=<folder with a diffusers
transformer config.json>)` and `AutoencoderKL.from_single_file(out, config=...)` offline.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sd3train.cli import fail, parse_key_values

PROG = "sd3train-export"
ALLOWED = {"checkpoint", "format", "out", "dtype", "vae", "text", "text_encoders", "shift", "t5_tokenizer",
           "t5_max_length", "overwrite", "merge"}
FORMATS = ("diffusers", "single_file", "lora_diffusers", "lora_kohya")
LORA_FORMATS = ("lora_diffusers", "lora_kohya")
DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_SHIFT = 3.0  # the released SD3 / SD3.5 schedulers'


def checkpoint_shift(path: str | Path) -> float | None:
    """The sampler shift a checkpoint records, if it records one."""
    from sd3train.checkpoint.files import read_json, safetensors_header
    from sd3train.checkpoint.formats import LIGHTNING, PIPELINE, SINGLE_FILE, detect, export_metadata
    from sd3train.checkpoint.training import read_training_checkpoint

    source = detect(path)
    if source.kind == LIGHTNING:
        return read_training_checkpoint(source.path).config.diffusion.sampler.shift
    if source.kind == PIPELINE and (source.path / "scheduler" / "scheduler_config.json").is_file():
        return read_json(source.path / "scheduler" / "scheduler_config.json").get("shift")
    if source.kind == SINGLE_FILE:
        _, metadata = safetensors_header(source.path)
        return export_metadata(metadata, source.path).get("scheduler", {}).get("shift")
    return None


def training_checkpoint(path: str | Path):
    """The sd3train training checkpoint at `path`, or None for any other source."""
    from sd3train.checkpoint.formats import LIGHTNING, detect
    from sd3train.checkpoint.training import read_training_checkpoint

    source = detect(path)
    return read_training_checkpoint(source.path) if source.kind == LIGHTNING else None


def export_lora(path: str | Path, format: str, out: Path, dtype) -> Path:
    """An adapter run's (EMA) LoRA as one safetensors file in the diffusers or kohya layout."""
    from sd3train.checkpoint.transformer_loader import adapted_transformer
    from sd3train.checkpoint.errors import CheckpointError
    from sd3train.checkpoint.files import save_safetensors_atomic
    from sd3train.checkpoint.lora_formats import (
        TEXT_KOHYA_PREFIXES,
        lora_to_diffusers,
        lora_to_kohya,
        text_lora_to_diffusers,
    )
    from sd3train.checkpoint.text_adapters import text_adapter_weights
    from sd3train.model.adapters import adapter_state_dict

    checkpoint = training_checkpoint(path)
    if checkpoint is None or checkpoint.config.adapter.kind != "lora":
        raise CheckpointError(f"format={format}: {path} is not the checkpoint of a run with adapter=lora")
    adapter_cfg, model_cfg = checkpoint.config.adapter, checkpoint.config.model
    adapter = adapter_state_dict(adapted_transformer(checkpoint))
    if format == "lora_kohya":
        tensors = lora_to_kohya(adapter, adapter_cfg.alpha)
    else:
        tensors = lora_to_diffusers(adapter, adapter_cfg.alpha, adapter_cfg.rank, model_cfg.depth,
                                    model_cfg.dual_attention_layers)
    for name in adapter_cfg.text_encoders:  # the (EMA) text adapters, straight from the checkpoint
        text_adapter = text_adapter_weights(checkpoint, name)
        tensors.update(lora_to_kohya(text_adapter, adapter_cfg.alpha, TEXT_KOHYA_PREFIXES[name])
                       if format == "lora_kohya" else
                       text_lora_to_diffusers(text_adapter, name, adapter_cfg.alpha, adapter_cfg.rank))
    tensors = {key: value.to(dtype) if value.is_floating_point() and value.dim() else value
               for key, value in tensors.items()}
    return save_safetensors_atomic(tensors, out, metadata={"format": "pt", "sd3train_layout": format})


def export(args: dict) -> Path:
    import torch

    from sd3train.checkpoint import load_text_conditioner, load_transformer, load_vae
    from sd3train.checkpoint.errors import CheckpointError
    from sd3train.checkpoint.export_diffusers import export_diffusers
    from sd3train.checkpoint.export_single_file import export_single_file

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.get("dtype", "fp32")]
    checkpoint = args["checkpoint"]
    out = Path(args["out"])
    if out.exists() and not args.get("overwrite", False):
        raise FileExistsError(f"{out} already exists (pass overwrite=true to replace it)")
    if args["format"] in LORA_FORMATS:
        return export_lora(checkpoint, args["format"], out, dtype)
    training = training_checkpoint(checkpoint)
    if training is not None and training.config.adapter.kind != "none" and not args.get("merge", False):
        raise CheckpointError(f"{checkpoint} is an adapter run's checkpoint: export the adapter with "
                              "format=lora_diffusers or lora_kohya, or pass merge=true to merge it into its base")
    if (training is not None and training.config.adapter.text_encoders and args["format"] == "single_file"
            and not args.get("text_encoders", False)):
        raise CheckpointError(f"{checkpoint} adapted the text encoders {training.config.adapter.text_encoders}: "
                              "pass text_encoders=true so the merged file holds them")
    shift = args.get("shift")
    if shift is None:
        shift = checkpoint_shift(checkpoint)
    shift = DEFAULT_SHIFT if shift is None else float(shift)

    transformer = load_transformer(checkpoint, dtype=dtype)
    vae = load_vae(args.get("vae", checkpoint), dtype=dtype)
    text = None
    if args["format"] == "diffusers" or args.get("text_encoders", False):
        text = load_text_conditioner(
            args.get("text", checkpoint), dtype=dtype, t5_tokenizer=args.get("t5_tokenizer"),
            t5_max_length=args.get("t5_max_length"),
        )
    if args["format"] == "diffusers":
        return export_diffusers(out, transformer, vae, text, shift=shift, overwrite=args.get("overwrite", False))
    return export_single_file(out, transformer, vae, text, shift=shift)


def main(argv: list[str] | None = None) -> None:
    args = parse_key_values(argv, prog=PROG, allowed=ALLOWED, required=("checkpoint", "format", "out"))
    if args["format"] not in FORMATS:
        fail(PROG, f"format must be one of {', '.join(FORMATS)}, got {args['format']!r}")
    if args.get("dtype", "fp32") not in DTYPES:
        fail(PROG, f"dtype must be one of {', '.join(DTYPES)}, got {args['dtype']!r}")
    from sd3train.checkpoint.errors import CheckpointError

    try:
        out = export(args)
    except (CheckpointError, FileNotFoundError, FileExistsError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
