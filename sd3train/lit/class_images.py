"""Prior preservation's class images, generated from the base model before training when the folder
holds fewer than `data.num_class_images` (DreamBooth's recipe).

    GenerateClassImages(cfg)   # a Lightning callback: on_fit_start, each rank draws its share

Image i is `class-NNNNN.png` with `class-NNNNN.txt` holding `data.class_prompt` (or
`data.class_prompts[i % count]`), drawn with the
project's sampler (diffusion.sampler) from seed eval.seed + 200000 + i: rank r draws the missing
indices r, r + world size, ... (every rank lists the folder before any writes to it); each file is
written to a temporary name and renamed, so a run stopped midway leaves whole images, and the next
start draws only what is missing (resumable). Under FSDP2 the sampler's forwards are collective, so
every rank runs the same number of batches: a rank out of indices draws a stand-in it does not keep.
The model is the one training starts from (the base, with zero-initialised adapters), before any
step. Then every rank waits for the others, and the data stream reads the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from PIL import Image

from sd3train.data.folder import class_image_stem
from sd3train.inference import decode_to_uint8, generate_latents
from sd3train.paths import resolve_repo_path

SEED_OFFSET = 200_000  # beside training's, the previews' and the evaluations' seeds
BATCH = 8


def missing_class_images(folder: Path, count: int) -> list[int]:
    return [index for index in range(count) if not (folder / f"{class_image_stem(index)}.png").is_file()]


def _write(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


class GenerateClassImages(L.Callback):
    def __init__(self, cfg):
        self.folder = resolve_repo_path(cfg.data.class_images)
        self.prompts = list(cfg.data.class_prompts) or [cfg.data.class_prompt]
        self.count = cfg.data.num_class_images
        self.seed = cfg.eval.seed + SEED_OFFSET

    def on_fit_start(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        missing = missing_class_images(self.folder, self.count)
        # A rank listing after another has written would split the list differently.
        trainer.strategy.barrier("GenerateClassImages: listed")
        mine = missing[trainer.global_rank::trainer.world_size]
        batches = -(-len(missing[::trainer.world_size]) // BATCH)  # rank 0's count, the largest: all run it
        if missing:
            shown = repr(self.prompts[0]) + (f" and {len(self.prompts) - 1} more" if len(self.prompts) > 1 else "")
            rank_zero_info(f"prior preservation: drawing {len(missing)} of {self.count} class images "
                           f"({shown}) into {self.folder}")
        cfg = pl_module.cfg
        side = cfg.data.resolution // pl_module.vae.downsample_factor
        for batch in range(batches):
            indices = mine[batch * BATCH:(batch + 1) * BATCH]
            kept = len(indices)
            indices = indices or missing[:1]  # a stand-in, so this rank's forwards match the others'
            prompts = [self.prompts[index % len(self.prompts)] for index in indices]
            with torch.no_grad():
                latents = generate_latents(pl_module.sampling_model, pl_module.sampling_text, prompts,
                                           [self.seed + index for index in indices],
                                           (cfg.vae.latent_channels, side, side), cfg.diffusion.sampler)
                images = decode_to_uint8(pl_module.vae, latents)
            for index, prompt, pixels in list(zip(indices, prompts, images))[:kept]:
                stem = self.folder / class_image_stem(index)
                _write(stem.with_suffix(".txt"), lambda path: path.write_text(prompt))
                _write(stem.with_suffix(".png"), lambda path: Image.fromarray(pixels).save(path, format="PNG"))
        trainer.strategy.barrier("GenerateClassImages")
