"""Sample images from a training checkpoint: PNGs plus samples.jsonl (prompt, seed, file).

    sd3train-sample checkpoint=runs/tiny_cpu/main/checkpoints/last \
        prompts='["a red circle on a white background"]' seeds='[0]' out=samples/

Arguments are key=value, like Hydra overrides:
  checkpoint      (required) a checkpoint written by sd3train-train: a step directory
                  (checkpoints/step-NNNNNNN), checkpoints/last, or a .ckpt; its config is stored inside it
  out             output folder (default: <run dir>/samples/<checkpoint name>, e.g. samples/step-0000100)
  prompts         list of prompts (default: the run's eval.prompts)
  prompt_file     text file with one prompt per line (instead of prompts)
  seeds           list of seeds, one per prompt (default: eval.seed, eval.seed + 1, ...)
  num_steps, guidance_scale, shift, uncond   override the run's diffusion.sampler settings
  skip_layers, skip_layer_scale, skip_layer_start, skip_layer_stop
                  skip-layer guidance, e.g. skip_layers='[7,8,9]' skip_layer_scale=2.5 (SD3.5-Medium)
  ema             use the EMA weights when the checkpoint has them (default true)
  device          cpu | cuda (default: cuda when available)
"""

from __future__ import annotations

import os
from pathlib import Path

from sd3train.cli import fail, parse_key_values

PROG = "sd3train-sample"
SAMPLER_KEYS = ("num_steps", "guidance_scale", "shift", "uncond", "skip_layers", "skip_layer_scale",
                "skip_layer_start", "skip_layer_stop")
ALLOWED = {"checkpoint", "out", "prompts", "prompt_file", "seeds", "ema", "device", *SAMPLER_KEYS}


def _fail(message: str) -> None:
    fail(PROG, message)


def default_out_dir(checkpoint: Path) -> Path:
    """<run dir>/samples/<checkpoint name>: step-NNNNNNN for a step directory, for `last` (the step it
    points to) and for the checkpoint.ckpt inside one; the file's stem for a plain .ckpt."""
    from sd3train.checkpoint.step_dirs import TRAINING_CHECKPOINT_FILE

    if checkpoint.name == TRAINING_CHECKPOINT_FILE:
        checkpoint = checkpoint.parent
    if checkpoint.is_symlink():  # checkpoints/last -> step-NNNNNNN
        checkpoint = checkpoint.parent / Path(os.readlink(checkpoint)).name
    return checkpoint.parent.parent / "samples" / checkpoint.stem


def sampler_settings(cfg, args: dict, on_error):
    """The run's diffusion.sampler with the arguments' sampler keys over it, checked; `on_error`
    gets the message of what is wrong."""
    import dataclasses

    from sd3train.config.typed import ConfigError, build_typed
    from sd3train.config.validate import skip_layer_problems

    values = {**dataclasses.asdict(cfg.diffusion.sampler), **{k: args[k] for k in SAMPLER_KEYS if k in args}}
    sampler, problems = build_typed(type(cfg.diffusion.sampler), values)
    if not problems:
        problems = skip_layer_problems(sampler, cfg.model.depth)
    if problems:
        on_error(str(ConfigError(problems)))
    return sampler


def main(argv: list[str] | None = None) -> None:
    args = parse_key_values(argv, prog=PROG, allowed=ALLOWED, required=("checkpoint",))
    checkpoint_path = Path(args["checkpoint"])
    if not checkpoint_path.exists():
        _fail(f"checkpoint {checkpoint_path} does not exist")

    import torch

    from sd3train.checkpoint import CheckpointError
    from sd3train.checkpoint.training import read_training_checkpoint
    from sd3train.inference import decode_to_uint8, generate_latents, write_samples
    from sd3train.lit.restore import restore_module

    try:
        # Its config, with the weights the run started from replaced by the checkpoint's own.
        checkpoint = read_training_checkpoint(checkpoint_path)
    except CheckpointError as error:
        _fail(str(error))
    cfg = checkpoint.config
    cfg.diffusion.sampler = sampler_settings(cfg, args, _fail)

    if "prompt_file" in args:
        prompts = [line.strip() for line in Path(args["prompt_file"]).read_text().splitlines() if line.strip()]
    else:
        prompts = list(args.get("prompts", cfg.eval.prompts))
    if not prompts:
        _fail("no prompts: pass prompts=[...] or prompt_file=PATH")
    seeds = [int(seed) for seed in args.get("seeds", [cfg.eval.seed + i for i in range(len(prompts))])]
    if len(seeds) != len(prompts):
        _fail(f"{len(prompts)} prompts but {len(seeds)} seeds")

    device = args.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    module = restore_module(checkpoint).to(device)
    model = module.sampling_model if args.get("ema", True) else module.mmdit
    text = module.sampling_text if args.get("ema", True) else module.text  # EMA text adapters too
    side = cfg.data.resolution // module.vae.downsample_factor
    latents = generate_latents(model, text, prompts, seeds, (cfg.vae.latent_channels, side, side),
                               cfg.diffusion.sampler)
    images = decode_to_uint8(module.vae, latents)
    out_dir = Path(args["out"]) if "out" in args else default_out_dir(checkpoint_path)
    manifest = write_samples(out_dir, images, prompts, seeds)
    print(f"wrote {len(images)} images and {manifest}")


if __name__ == "__main__":
    main()
