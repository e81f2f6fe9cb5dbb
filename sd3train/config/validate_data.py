"""Cross-field checks of the `data` group: buckets against the model's patch grid, the caption mix
and its caption tables, the bad-data budget, sources, and settings that cannot go together."""

from __future__ import annotations

from sd3train.config.schema import TrainConfig
from sd3train.paths import resolve_repo_path


def data_problems(cfg: TrainConfig, multiple: int) -> list[str]:
    """`multiple`: pixels per latent patch (VAE downsampling x patch size); bucket sides must divide by it."""
    data = cfg.data
    problems: list[str] = []
    for name, low, high in (("p_synthetic", 0.0, 1.0), ("skip_budget", 0.0, 1.0)):
        value = getattr(data, name)
        if not low <= value <= high:
            problems.append(f"data.{name}: {value} is outside [{low}, {high}]")
    for name in ("min_size", "skip_budget_min_samples", "val_batches", "shuffle_buffer"):
        if getattr(data, name) < 0:
            problems.append(f"data.{name}: must be >= 0, got {getattr(data, name)}")
    if data.shards_per_epoch is not None and data.shards_per_epoch < 1:
        problems.append(f"data.shards_per_epoch: must be >= 1 or null, got {data.shards_per_epoch}")
    for index, source in enumerate(data.sources):
        if not source.weight > 0:
            problems.append(f"data.sources[{index}].weight: must be > 0, got {source.weight}")
        if not source.shards.strip():
            problems.append(f"data.sources[{index}].shards: is empty")
    if data.aspect_buckets:
        problems.extend(_bucket_problems(cfg, multiple))
    problems.extend(_folder_problems(cfg))
    per_visit = [name for name in ("random_crop", "random_flip") if getattr(data, name)]
    # data.cache_latents is ignored with data.cached (the latents are precomputed already).
    if data.cache_latents and per_visit and not data.cached:
        problems.append(f"data.cache_latents: a cached posterior would freeze the {' and '.join(per_visit)} "
                        "of the first visit; turn one of them off")
    if data.cached:
        if per_visit:
            problems.append(f"data.cached: the precompute cache holds one centre crop per sample; "
                            f"{', '.join('data.' + name for name in per_visit)} must be false")
    if data.blocklist is not None and not resolve_repo_path(data.blocklist).is_file():
        problems.append(f"data.blocklist: {data.blocklist} does not exist")
    if data.synthetic_captions is not None:
        problems.extend(_caption_table_problems(data))
    return problems


def _caption_table_problems(data) -> list[str]:
    """A caption folder of sd3train-caption, and shard names that each pick one table of it."""
    from collections import Counter

    from sd3train.data.caption_tables import CAPTION_FORMAT, CAPTION_INFO_NAME, read_caption_info, table_name
    from sd3train.data.sources import resolve_shard_urls

    folder = resolve_repo_path(data.synthetic_captions)
    if not folder.is_dir():
        return [f"data.synthetic_captions: {folder} is not a folder (write one with sd3train-caption)"]
    info = read_caption_info(folder)
    if info is None:
        return [f"data.synthetic_captions: {folder} has no readable {CAPTION_INFO_NAME}: not a folder sd3train-caption wrote"]
    if info.get("format") != CAPTION_FORMAT:
        return [f"data.synthetic_captions: {folder}/{CAPTION_INFO_NAME} has format {info.get('format')!r}, "
                f"this sd3train reads {CAPTION_FORMAT}"]
    if data.cached:
        return []  # the cache shards hold the synthetic captions already; no table is read
    try:
        urls = [url for spec in ([s.shards for s in data.sources] or [data.shards]) for url in resolve_shard_urls(spec)]
        names = [table_name(url) for url in urls]
    except ValueError as error:  # a bad shard spec, or a url that names no tar (ShardNameError)
        return [f"data.synthetic_captions: {error}"]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        return [f"data.synthetic_captions: several train shards share the file name of caption table "
                f"{', '.join(repeated[:3])}; a caption folder needs distinct shard names"]
    if not any((folder / name).is_file() for name in names):
        return [f"data.synthetic_captions: {folder} has a caption table for none of the {len(urls)} train shard(s) "
                f"(e.g. {names[0]}); caption these shards with sd3train-caption"]
    return []


def _bucket_problems(cfg: TrainConfig, multiple: int) -> list[str]:
    from sd3train.data.buckets import make_buckets

    data, model = cfg.data, cfg.model
    if data.bucket_step % multiple:
        return [f"data.bucket_step={data.bucket_step} is not a multiple of {multiple} (VAE downsampling x "
                f"model.patch_size): bucket sides would not make whole latent patches"]
    if data.max_aspect_ratio < 1:
        return [f"data.max_aspect_ratio: must be >= 1, got {data.max_aspect_ratio}"]
    try:
        buckets = make_buckets(data.resolution * data.resolution, data.bucket_step, data.max_aspect_ratio)
    except ValueError as error:
        return [f"data.aspect_buckets: {error} (data.resolution={data.resolution})"]
    longest = max(max(bucket.height, bucket.width) for bucket in buckets)
    if longest // multiple > model.pos_embed_max_size:
        return [f"data.aspect_buckets: the longest bucket side {longest} gives {longest // multiple} patches, more "
                f"than model.pos_embed_max_size={model.pos_embed_max_size}; lower data.max_aspect_ratio"]
    return []


def _folder_problems(cfg: TrainConfig) -> list[str]:
    """data=folder (data.path) and the masked loss."""
    from sd3train.paths import resolve_repo_path

    data, problems = cfg.data, []
    if data.repeats < 1:
        problems.append(f"data.repeats: must be >= 1, got {data.repeats}")
    if data.path is not None:
        if not resolve_repo_path(data.path).is_dir():
            problems.append(f"data.path: {data.path} is not a folder")
        if data.sources:
            problems.append("data.path: an image folder replaces the shards; data.sources must be empty")
        if data.cached:
            problems.append("data.path: an image folder is read as images; data.cached needs precompute shards")
    elif data.repeats != 1:
        problems.append("data.repeats: repeats an image folder (data.path); shards repeat by epochs")
    if data.class_images is not None:
        if data.path is None:
            problems.append("data.class_images: prior preservation mixes class images into an image folder's; "
                            "set data.path (data=folder)")
        if bool(data.class_prompt) == bool(data.class_prompts):
            problems.append("data.class_images: needs data.class_prompt (the class images' caption) or "
                            "data.class_prompts (theirs in turn), not both")
        if data.num_class_images < 1:
            problems.append(f"data.num_class_images: must be >= 1, got {data.num_class_images}")
        if cfg.strategy.name not in ("ddp", "fsdp"):
            problems.append(f"data.class_images: class images are drawn under strategy ddp or fsdp "
                            f"(strategy.name is {cfg.strategy.name})")
    if data.masked_loss and data.cached:
        problems.append("data.masked_loss: the precompute cache holds no masks; train on images (data.cached=false)")
    return problems

