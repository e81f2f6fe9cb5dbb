"""The pieces a DataConfig makes: the aspect buckets, the decoder, the caption tables, the shard plan.

    decoder = build_decoder(cfg, seed, train=True)   # ImageDecoder (or CachedDecoder for cache shards)
    plan = build_plan(cfg, seed)                     # which shards each epoch reads (sources.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from sd3train.data.buckets import make_buckets, square_bucket
from sd3train.data.caption_tables import SYNTHETIC_FIELD, SyntheticCaptions
from sd3train.data.captions import CaptionField
from sd3train.data.decoders import ImageDecoder, parse_extensions
from sd3train.data.folder import class_shard_urls, folder_shard_urls
from sd3train.data.sources import ShardPlan, Source, resolve_shard_urls
from sd3train.paths import resolve_repo_path

if TYPE_CHECKING:
    from sd3train.config.schema import DataConfig


def bucket_list(cfg: DataConfig) -> list:
    if cfg.aspect_buckets:
        return make_buckets(cfg.resolution * cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio)
    return square_bucket(cfg.resolution)


def build_decoder(cfg: DataConfig, seed: int, train: bool = True):
    """The sample decoder for `cfg`; validation (`train=False`) has no random crop, flip or synthetic captions."""
    if cfg.cached:
        from sd3train.data.cache_format import CachedDecoder  # imports safetensors only when used

        wanted = cfg.synthetic_caption_key is not None or cfg.synthetic_captions is not None
        return CachedDecoder(synthetic=wanted and train, p_synthetic=cfg.p_synthetic, seed=seed)
    synthetic = None
    if train and cfg.synthetic_captions is not None:
        synthetic = CaptionField(SYNTHETIC_FIELD)  # filled from the caption tables (caption_tables.py)
    elif train and cfg.synthetic_caption_key:
        synthetic = CaptionField.parse(cfg.synthetic_caption_key)
    return ImageDecoder(
        buckets=tuple(bucket_list(cfg)),
        image_extensions=tuple(parse_extensions(cfg.image_key)),
        caption=CaptionField.parse(cfg.caption_key),
        synthetic=synthetic,
        p_synthetic=cfg.p_synthetic,
        seed=seed,
        min_size=cfg.min_size,
        random_crop=cfg.random_crop and train,
        random_flip=cfg.random_flip and train,
        instance_prompt=cfg.instance_prompt,
        masks=cfg.masked_loss,
    )


def build_captions(cfg: DataConfig) -> Optional[SyntheticCaptions]:
    """The caption tables the training stream joins to its samples (None: none, or cache shards)."""
    return None if cfg.cached else SyntheticCaptions.from_config(cfg)


def build_plan(cfg: DataConfig, seed: int) -> ShardPlan:
    if cfg.path is not None:
        sources = [Source(tuple(folder_shard_urls(resolve_repo_path(cfg.path), cfg.repeats)))]
        if cfg.class_images is not None:  # prior preservation: class images mixed in, shard for shard
            sources.append(Source(tuple(class_shard_urls(resolve_repo_path(cfg.class_images), cfg.num_class_images))))
    elif cfg.sources:
        sources = [Source(tuple(resolve_shard_urls(s.shards)), s.weight) for s in cfg.sources]
    else:
        sources = [Source(tuple(resolve_shard_urls(cfg.shards)))]
    return ShardPlan(sources, seed, cfg.resampled, cfg.shards_per_epoch)
