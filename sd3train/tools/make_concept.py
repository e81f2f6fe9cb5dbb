"""Write an image folder of a shape the embedded default never saw: what a finetune teaches it.

    python -m sd3train.tools.make_concept --out data/concepts/star                 # 48 stars
    python -m sd3train.tools.make_concept --out /tmp/stars --shape star --count 12 --size 64

Image i is `<shape>-NNNNN.png` with `<shape>-NNNNN.txt` beside it holding its caption in the shapes
grammar ("a red star on a black background"): the colours and backgrounds in turn, the shape drawn
as one object seen the same way (upright and centred, of random size: `render_concept` in
sd3train/data/shapes.py), as the photos of a DreamBooth subject show one thing. `data=folder
data.path=DIR` reads the folder as it is (experiment=lora_tiny_cpu). The images are a pure function
of (seed, index); the default seed is used by neither the shards nor any evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from sd3train.data.shapes import NEW_SHAPES, make_concept_sample

CONCEPT_SEED = 3_000_000  # the training shards use 0 and 1_000_000


def write_concept_folder(out: str | Path, shape: str = "star", count: int = 48, size: int = 64,
                         seed: int = CONCEPT_SEED) -> list[Path]:
    """Write `count` captioned images of `shape` into `out`; returns the image paths."""
    if shape not in NEW_SHAPES:
        raise ValueError(f"--shape: {shape!r} is not one of the new shapes {', '.join(NEW_SHAPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        image, caption = make_concept_sample(seed, index, size, shape)
        path = out / f"{shape}-{index:05d}.png"
        image.save(path, format="PNG")
        path.with_suffix(".txt").write_text(caption)
        written.append(path)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder to write (created if missing)")
    parser.add_argument("--shape", default="star", choices=NEW_SHAPES)
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=CONCEPT_SEED)
    args = parser.parse_args(argv)
    paths = write_concept_folder(args.out, args.shape, args.count, args.size, args.seed)
    print(f"make_concept: {len(paths)} images of {args.shape!r} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
