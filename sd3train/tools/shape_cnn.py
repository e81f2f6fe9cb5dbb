"""An outside judge of a shapes run: a small CNN fitted on the training renders scores the prompted
shape in a checkpoint's samples, beside the project's own colour and shape adherence.

    python -m sd3train.tools.shape_cnn --checkpoint runs/shapes_cpu/main/checkpoints/last
    python -m sd3train.tools.shape_cnn --checkpoint CKPT --samples-per-caption 8 --net /tmp/shape_cnn.pt
    python -m sd3train.tools.shape_cnn --checkpoint runs/lora_tiny_cpu/main/checkpoints/last --new-shapes star

sd3train/eval/shape.py judges geometry (the fill ratio of the dominant colour's largest region);
this judges with what a classifier learned from the training images, so a lenient geometric rule
cannot flatter a model. The CNN (four 3x3 convolutions with batch norm, ReLU and max-pooling) is
fitted on the renders the default shards hold (`make_sample(0, i)`, i < --train; a 3x3 box blur on
half the batches, as samples are softer than renders; the learning rate decays to 0) and must reach --min-accuracy on held-out
renders (the validation seed) before it judges anything. --net saves it once it passes, or loads it if the file exists.
--new-shapes star adds the star as a fourth class (a quarter of the renders are stars, in random
poses and as make_concept draws them) and samples the star captions too (experiment=lora_tiny_cpu).
Samples use seeds from the run's eval.seed + --seed-offset: the default 300000 is neither
training's, the previews' nor the end-of-run evaluation's (+100000).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sd3train.checkpoint.training import read_training_checkpoint
from sd3train.data.shapes import SHAPES, image_to_array, make_concept_sample, make_sample, parse_caption
from sd3train.eval.shapes_suite import adherence_metrics, check_new_shapes, evaluation_prompts
from sd3train.inference import decode_to_uint8, generate_latents
from sd3train.lit.restore import restore_module
from sd3train.tools.make_shapes import VAL_SEED_OFFSET


def build_net(classes: int = len(SHAPES)) -> nn.Sequential:
    layers, channels = [], 3
    for width in (32, 64, 64, 64):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    # The last block pools globally (any image size), by max: a corner anywhere counts. Average
    # pooling learned the renders 2 to 3x slower (train accuracy 0.66-0.68 against 0.80-0.92 after
    # 4 epochs of 1024 renders, two seeds).
    layers[-1] = nn.AdaptiveMaxPool2d(1)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, classes))


def to_input(images: list[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) uint8 images -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def renders(seed: int, count: int, size: int, new_shapes: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` renders of the grammar, or with new shapes a quarter of them those shapes', half in
    random poses (the grammar's generator) and half as make_concept draws them."""
    extra = count // 4 if new_shapes else 0
    samples = [make_sample(seed, index, size) for index in range(count - extra)]
    for index in range(extra):
        shape = new_shapes[index % len(new_shapes)]
        samples.append(make_sample(seed, index, size, shapes=(shape,)) if index % 2
                       else make_concept_sample(seed, index, size, shape))
    classes = SHAPES + tuple(new_shapes)
    labels = [classes.index(parse_caption(caption).shape) for _, caption in samples]
    return to_input([image_to_array(image) for image, _ in samples]), torch.tensor(labels)


def fit(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    steps = epochs * -(-len(images) // 64)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start:start + 64]
            x = images[batch]
            if torch.rand((), generator=generator) < 0.5:
                x = F.avg_pool2d(x, 3, 1, 1)
            loss = F.cross_entropy(net(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()  # cosine to 0: the last epoch's weights are settled, not one noisy step
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, images: torch.Tensor, new_shapes: tuple[str, ...] = ()) -> list[str]:
    classes = SHAPES + tuple(new_shapes)
    return [classes[index] for index in net.eval()(images).argmax(1).tolist()]


def judge(net: nn.Module, images: list[np.ndarray], prompts: list[str], new_shapes: tuple[str, ...] = ()) -> dict:
    """The project's evaluation (sd3train/eval/shapes_suite.py) and the CNN's shape adherence on the
    grammar's captions, and per shape (new shapes included)."""
    wanted = [parse_caption(prompt).shape for prompt in prompts]
    hits = [got == want for got, want in zip(predict(net, to_input(images), new_shapes), wanted)]
    base = [hit for hit, want in zip(hits, wanted) if want in SHAPES]
    project = {name.removeprefix("eval/"): value for name, value in adherence_metrics(images, prompts, new_shapes).items()}
    return {
        "samples": len(prompts),
        **project,
        "cnn_shape_adherence": float(np.mean(base)),
        "cnn_by_shape": {shape: float(np.mean([hit for hit, want in zip(hits, wanted) if want == shape]))
                         for shape in SHAPES + tuple(new_shapes) if shape in wanted},
    }


def sample_checkpoint(path: Path, samples_per_caption: int, seed_offset: int,
                      new_shapes: tuple[str, ...] = ()) -> tuple[list[np.ndarray], list[str], int]:
    checkpoint = read_training_checkpoint(path)
    cfg = checkpoint.config
    module = restore_module(checkpoint)
    prompts = evaluation_prompts(samples_per_caption, new_shapes)
    first_seed = cfg.eval.seed + seed_offset
    side = cfg.data.resolution // module.vae.downsample_factor
    with torch.no_grad():
        latents = generate_latents(module.sampling_model, module.sampling_text, prompts,
                                   [first_seed + index for index in range(len(prompts))],
                                   (cfg.vae.latent_channels, side, side), cfg.diffusion.sampler)
    return decode_to_uint8(module.vae, latents), prompts, first_seed


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sd3train.tools.shape_cnn", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoint (e.g. checkpoints/last)")
    parser.add_argument("--samples-per-caption", type=int, default=8, help="x 36 captions (default 8: 288 samples)")
    parser.add_argument("--seed-offset", type=int, default=300_000, help="first seed: the run's eval.seed + this")
    parser.add_argument("--net", type=Path, help="the fitted CNN's weights: loaded if the file exists, else saved there")
    parser.add_argument("--train", type=int, default=4096, help="training renders (default: the default shards' 4096)")
    parser.add_argument("--val", type=int, default=256, help="held-out renders the CNN is checked on (>= 1)")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="render side in pixels (the run's data.resolution)")
    parser.add_argument("--min-accuracy", type=float, default=0.99, help="refuse to judge below this on held-out renders")
    parser.add_argument("--new-shapes", nargs="*", default=[], help="shapes outside the grammar to judge too (star)")
    args = parser.parse_args(argv)
    try:
        args.new_shapes = check_new_shapes(args.new_shapes)
    except ValueError as error:
        parser.error(str(error).replace("eval.new_shapes", "--new-shapes"))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    net = build_net(len(SHAPES) + len(args.new_shapes))
    started = time.perf_counter()
    loaded = args.net is not None and args.net.exists()
    if loaded:
        net.load_state_dict(torch.load(args.net, weights_only=True))
    else:
        fit(net, *renders(0, args.train, args.size, args.new_shapes), args.epochs)
    val_images, val_labels = renders(VAL_SEED_OFFSET, args.val, args.size, args.new_shapes)
    with torch.no_grad():
        accuracy = float((net.eval()(val_images).argmax(1) == val_labels).float().mean()) if args.val else 0.0
    print(f"shape CNN: {accuracy:.3f} on {args.val} held-out renders ({time.perf_counter() - started:.0f} s)")
    if accuracy < args.min_accuracy:
        print(f"error: the CNN scored {accuracy:.3f} < --min-accuracy {args.min_accuracy} on held-out renders; "
              "fit it longer (--epochs, --train)")
        return 1
    if args.net is not None and not loaded:
        torch.save(net.state_dict(), args.net)
    images, prompts, first_seed = sample_checkpoint(args.checkpoint, args.samples_per_caption, args.seed_offset,
                                                    args.new_shapes)
    report = {"checkpoint": str(args.checkpoint), "first_seed": first_seed, "cnn_val_accuracy": accuracy,
              **judge(net, images, prompts, args.new_shapes)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
