"""Command-line overrides for shard specs that Hydra's grammar or the shell would otherwise break.

    sd3train-train data.shards=/data/out/{00000..00009}.tar

Unquoted, bash expands the braces into ten `data.shards=...` words, and even quoted, Hydra's
grammar reads `{...}` as a dict. `normalise_overrides` joins repeated shard overrides into one
'::'-separated list and quotes shard values, so both spellings mean the shards the user wrote.
"""

from __future__ import annotations

SHARD_KEYS = ("data.shards", "data.val_shards")
_PREFIXES = ("++", "+", "")


def _split(arg: str) -> tuple[str, str, str] | None:
    """(prefix, key, value) of a shard override, or None for any other argument."""
    if "=" not in arg:
        return None
    left, value = arg.split("=", 1)
    for prefix in _PREFIXES:
        if left.startswith(prefix) and left[len(prefix):] in SHARD_KEYS:
            return prefix, left[len(prefix):], value
    return None


def _quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


def _quote(value: str) -> str:
    if value in ("null", "") or _quoted(value):
        return value
    quote = "'" if "'" not in value else '"'
    return f"{quote}{value}{quote}"


def normalise_overrides(args: list[str]) -> list[str]:
    """`args` with each shard key given once, quoted; other arguments unchanged and in order."""
    values: dict[str, list[str]] = {}
    prefixes: dict[str, str] = {}
    positions: dict[str, int] = {}
    out: list[str | None] = []
    for arg in args:
        parsed = _split(arg)
        if parsed is None:
            out.append(arg)
            continue
        prefix, key, value = parsed
        if key not in positions:
            positions[key] = len(out)
            out.append(None)
        prefixes.setdefault(key, prefix)
        values.setdefault(key, []).append(value[1:-1] if _quoted(value) else value)
    for key, position in positions.items():
        joined = values[key][0] if len(values[key]) == 1 else "::".join(values[key])
        out[position] = f"{prefixes[key]}{key}={_quote(joined)}"
    return [arg for arg in out if arg is not None]
