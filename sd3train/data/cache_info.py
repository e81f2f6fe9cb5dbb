"""What a precompute cache depends on (`cache_info.json`), and the check that training matches it.

    info = cache_info(cfg, "bf16")                  # what sd3train-precompute records
    problems = training_cache_problems(cfg)         # [] when data.cached is off or the cache fits cfg

Kept apart from the precompute tool so training can check a cache without importing it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sd3train.data.sources import is_url, resolve_shard_urls

CACHE_FORMAT = 1
CACHE_INFO_NAME = "cache_info.json"

# Data settings the cached samples are a function of (the decoder is the validation one, so the
# random crop/flip settings do not matter).
DATA_FIELDS = (
    "resolution", "aspect_buckets", "bucket_step", "max_aspect_ratio", "image_key", "caption_key",
    "synthetic_caption_key", "min_size",
)
# Text settings used only while training (applied to the cached outputs then).
TRAINING_ONLY_TEXT_FIELDS = ("dropout_clip_l", "dropout_clip_g", "dropout_t5")

def cache_info(cfg, dtype_name: str) -> dict[str, Any]:
    """What `DIR/cache_info.json` holds for this config (plain JSON data)."""
    text = {name: value for name, value in asdict(cfg.text).items() if name not in TRAINING_ONLY_TEXT_FIELDS}
    info = {
        "format": CACHE_FORMAT,
        "dtype": dtype_name,
        "vae": asdict(cfg.vae),
        "text": text,
        "data": {name: getattr(cfg.data, name) for name in DATA_FIELDS},
    }
    if cfg.data.synthetic_captions is not None:  # recorded only when set: older caches stay valid
        from sd3train.paths import resolve_repo_path

        info["data"]["synthetic_captions"] = str(resolve_repo_path(cfg.data.synthetic_captions))
    return json.loads(json.dumps(info))  # tuples -> lists: compares equal to what is read back


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def _describe(value: Any, missing: object) -> str:
    return "nothing" if value is missing else json.dumps(value)


def info_differences(existing: Any, wanted: dict[str, Any], label: str = "cache") -> list[str]:
    """'key: cache has X, this run has Y' for every setting that differs (`label` names the folder's kind)."""
    if not isinstance(existing, dict):
        return [f"the file holds {type(existing).__name__}, not the settings object"]
    old, new = _flatten(existing), _flatten(wanted)
    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            lines.append(f"{key}: {label} has {_describe(before, missing)}, this run has {_describe(after, missing)}")
    return lines


# What training must match; caption keys and dtype may differ (training picks captions by
# data.synthetic_caption_key or data.synthetic_captions and casts the cached tensors to fp32).
_TRAINING_IGNORES = ("dtype", "data.image_key", "data.caption_key", "data.synthetic_caption_key",
                     "data.synthetic_captions")


def read_cache_info(folder: str | Path) -> Any:
    path = Path(folder) / CACHE_INFO_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def training_cache_problems(cfg) -> list[str]:
    """Differences between the config and the cache_info.json beside the (local) cache shards."""
    if not cfg.data.cached:
        return []
    specs = [source.shards for source in cfg.data.sources] or [cfg.data.shards]
    try:
        urls = [url for spec in specs for url in resolve_shard_urls(spec)]
    except ValueError:
        return []  # reported by the data checks
    folders = sorted({str(Path(url).parent) for url in urls if not is_url(url) and Path(url).is_file()})
    problems = []
    for folder in folders:
        info = read_cache_info(folder)
        if info is None:
            problems.append(f"data.shards: {folder} has no readable {CACHE_INFO_NAME}; data.cached=true needs "
                            "shards written by sd3train-precompute")
            continue
        differences = [
            line for line in info_differences(info, cache_info(cfg, info.get("dtype", "")))
            if not line.split(":", 1)[0].startswith(_TRAINING_IGNORES)
        ]
        problems.extend(f"data.shards: the cache in {folder} was made with other settings: {line}" for line in differences)
    return problems
