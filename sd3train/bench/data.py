"""Data-path throughput: JPEG shards decoded, resized and cropped into 512^2 aspect buckets, and the
precompute cache read back, per CPU core and through the DataLoader.

    python -m sd3train.bench.data --out /tmp/sd3-data-bench            # writes the shards once, then times
    python -m sd3train.bench.data --out /tmp/sd3-data-bench --samples 2000 --workers 2 --json

Photo shards: `--samples` JPEGs (quality 90) of sizes drawn from `PHOTO_SIZES` (typical web photo
shapes, 0.3 to 1.2 megapixels), smooth gradients with noise so the files are photo-sized (about
100-250 kB). Cache shards: records exactly as sd3train-precompute writes them at 512^2 for SD3's
encoders (16x64x64 latent mean and std, CLIP-L 77x768, bigG 77x1280, T5 77x4096 and the pooled
vectors, bf16, plus the synthetic caption's outputs), filled with random values.

Reported, each over the whole shard set after one untimed pass:
- image_per_core: read + decode + bucket + resize + crop + to tensor in one process, one thread;
- image_loader: the training stream (ShardDataModule, `--workers` DataLoader workers) samples/s;
- cached_per_core and cached_loader: the same for the cache shards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sd3train.config.schema import DataConfig
from sd3train.data.cache_format import DTYPES, TEXT_OUTPUTS, sample_record
from sd3train.data.datamodule import ShardDataModule, build_decoder
from sd3train.data.decoders import Skip
from sd3train.data.tar_reader import RawSample, read_shard
from sd3train.data.tar_writer import EncodedImage, ShardSample, read_manifest, write_shards

PROG = "python -m sd3train.bench.data"
PHOTO_SIZES = ((1024, 768), (768, 1024), (800, 800), (1200, 675), (640, 480), (480, 640), (1000, 562))
# SD3 at 512^2: latent (16, 64, 64); CLIP-L / bigG / T5 widths 768 / 1280 / 4096, 77 tokens each.
CACHE_SHAPES = {
    "clip_l_hidden": (77, 768), "clip_l_pooled": (768,), "clip_g_hidden": (77, 1280), "clip_g_pooled": (1280,),
    "t5_hidden": (77, 4096),
}
RESOLUTION = 512


def _photo(width: int, height: int, rng: np.random.Generator) -> bytes:
    import io

    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_photo_shards(folder: Path, samples: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)

    def records():
        for index in range(samples):
            width, height = PHOTO_SIZES[index % len(PHOTO_SIZES)]
            yield ShardSample(f"{index:09d}", EncodedImage(_photo(width, height, rng), "jpg"), f"photo {index}",
                              None, {"syn.txt": f"a synthetic caption of photo {index}".encode()})

    write_shards(records(), folder, prefix="photos", samples_per_shard=per_shard)


def write_cache_shards(folder: Path, samples: int, per_shard: int) -> None:
    import webdataset as wds

    from sd3train.data.tar_writer import TAR_GROUP, TAR_MODE, TAR_MTIME, TAR_USER

    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(-(-samples // per_shard)):
        with open(folder / f"cache-{shard:06d}.tar", "wb") as stream:
            writer = wds.TarWriter(stream, user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False)
            for index in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                text = {name: torch.randn(CACHE_SHAPES[name], generator=generator) for name in TEXT_OUTPUTS}
                synthetic = {name: torch.randn(CACHE_SHAPES[name], generator=generator) for name in TEXT_OUTPUTS}
                latent = torch.randn((2, 16, RESOLUTION // 8, RESOLUTION // 8), generator=generator)
                meta = {"caption": f"photo {index}", "synthetic_caption": f"synthetic {index}",
                        "bucket": [RESOLUTION, RESOLUTION], "original_size": [768, 1024], "crop_offset": [0, 128]}
                writer.write(sample_record(f"{index:09d}", latent[0], latent[1].abs(), text, synthetic, meta, DTYPES["bf16"]))
            writer.close()


def _config(shards: str, cached: bool, workers: int, batch: int) -> DataConfig:
    return DataConfig(
        shards=shards, val_shards=None, resolution=RESOLUTION, aspect_buckets=not cached, batch_size=batch,
        num_workers=workers, shuffle_buffer=0, synthetic_caption_key="syn.txt", cached=cached,
        skip_budget_min_samples=0,
    )


def per_core(shards: list[str], cfg: DataConfig) -> float:
    """Samples/s of read + decode in this process (the caller pins one thread)."""
    decoder = build_decoder(cfg, seed=0, train=True)
    count, start = 0, time.perf_counter()
    for url in shards:
        for raw in read_shard(url):
            if isinstance(raw, RawSample) and not isinstance(decoder.decode(raw, 0), Skip):
                count += 1
    return count / (time.perf_counter() - start)


def through_loader(cfg: DataConfig, samples: int) -> float:
    """Samples/s of the training stream, one epoch, after the workers started."""
    datamodule = ShardDataModule(cfg, seed=0)
    loader = datamodule.train_dataloader()
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    start, count = time.perf_counter(), 0
    while datamodule.epoch == 0:
        count += len(next(batches)["keys"])
    elapsed = time.perf_counter() - start
    batches.close()
    loader.shutdown()
    return count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the generated shards (reused when present)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the *_loader figures")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.samples < args.per_shard or args.workers < 1:
        parser.error("--samples must be >= --per-shard and --workers >= 1")
    torch.set_num_threads(1)
    out = Path(args.out)
    photos, cache = out / "photos", out / "cache"
    if (read_manifest(photos) or {}).get("shards") is None or sum(
        entry["samples"] for entry in read_manifest(photos)["shards"]
    ) != args.samples:
        write_photo_shards(photos, args.samples, args.per_shard)
    num_shards = -(-args.samples // args.per_shard)
    if len(list(cache.glob("cache-*.tar"))) != num_shards:
        write_cache_shards(cache, args.samples, args.per_shard)
    photo_urls = [str(photos / f"photos-{i:06d}.tar") for i in range(num_shards)]
    cache_urls = [str(cache / f"cache-{i:06d}.tar") for i in range(num_shards)]
    photo_spec = f"{photos}/photos-{{000000..{num_shards - 1:06d}}}.tar"
    cache_spec = f"{cache}/cache-{{000000..{num_shards - 1:06d}}}.tar"
    bytes_per_photo = sum(Path(url).stat().st_size for url in photo_urls) / args.samples
    bytes_per_cached = sum(Path(url).stat().st_size for url in cache_urls) / args.samples

    image_cfg = _config(photo_spec, False, args.workers, args.batch)
    cache_cfg = _config(cache_spec, True, args.workers, args.batch)
    per_core(photo_urls[:1], image_cfg)  # warm the page cache and imports
    results = {
        "samples": args.samples,
        "photo_kb": round(bytes_per_photo / 1e3, 1),
        "cached_kb": round(bytes_per_cached / 1e3, 1),
        "image_per_core": per_core(photo_urls, image_cfg),
        "image_loader": through_loader(image_cfg, args.samples),
        "cached_per_core": per_core(cache_urls, cache_cfg),
        "cached_loader": through_loader(cache_cfg, args.samples),
        "workers": args.workers,
    }
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{PROG}: {args.samples} samples at {RESOLUTION}^2 buckets "
              f"({results['photo_kb']} kB per JPEG, {results['cached_kb']} kB per cached sample)")
        for name in ("image_per_core", "image_loader", "cached_per_core", "cached_loader"):
            where = f"{args.workers} workers" if name.endswith("loader") else "1 core"
            print(f"  {name:16s} {results[name]:8.1f} samples/s ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
