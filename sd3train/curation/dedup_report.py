"""What the search stage leaves: the blocklist training reads, a JSON report, and example image grids.

    write_blocklist(out / "blocklist.txt", removed)
    write_groups(out / "groups.txt", groups, keys)
    entries = write_examples(out / "examples", example_groups(groups, keys, 8), url_of_key)
    write_report(out / "report.json", report)

The blocklist is one key per line, sorted, after one `#` comment line, which
`sd3train.data.skips.load_blocklist` ignores: train with `data.blocklist=OUT/blocklist.txt`.
`groups.txt` lists every group for review, one per line, its keys sorted (the kept one first).
Grids show the largest groups (ties: smallest kept key), one row of up to `GRID_COLUMNS`
thumbnails per group, the kept image first with a green frame, the blocklisted ones in red;
images are read back from the shards (a shard that cannot be read leaves grey tiles).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from sd3train.durable import write_bytes_atomic, write_text_atomic
from sd3train.data.tar_reader import RawSample, read_shard

TILE = 160  # pixels per thumbnail side
FRAME = 4
GRID_COLUMNS = 8
KEPT_COLOUR, REMOVED_COLOUR, MISSING_COLOUR = (40, 170, 60), (200, 40, 40), (128, 128, 128)


def blocklist_text(removed: list[str]) -> str:
    header = f"# sd3train-dedup: {len(removed)} near-duplicate key(s) to leave out (data.blocklist=this file)\n"
    return header + "".join(f"{key}\n" for key in sorted(removed))


def write_blocklist(path: Path, removed: list[str]) -> None:
    write_text_atomic(path, blocklist_text(removed))


def groups_text(groups: list[list[int]], keys: list[str]) -> str:
    """One line per group: its keys sorted, so the kept one first; groups in order of their kept key."""
    lines = sorted(" ".join(sorted(keys[row] for row in group)) for group in groups)
    return "".join(f"{line}\n" for line in lines)


def write_groups(path: Path, groups: list[list[int]], keys: list[str]) -> None:
    write_text_atomic(path, groups_text(groups, keys))


def size_histogram(groups: list[list[int]]) -> dict[str, int]:
    """{group size: number of groups}, sizes ascending (JSON keys are strings)."""
    return {str(size): count for size, count in sorted(Counter(len(group) for group in groups).items())}


def example_groups(groups: list[list[int]], keys: list[str], count: int) -> list[list[str]]:
    """Up to `count` groups as key lists (kept key first), the largest first."""
    named = [sorted(keys[row] for row in group) for group in groups]
    return sorted(named, key=lambda names: (-len(names), names[0]))[:count]


def _images(wanted: dict[str, str]) -> dict[str, Image.Image]:
    """{key: image} for the keys in `wanted` ({key: shard url}), read back from their shards."""
    images: dict[str, Image.Image] = {}
    for url in sorted(set(wanted.values())):
        for event in read_shard(url):
            if not isinstance(event, RawSample) or wanted.get(event.key) != url:
                continue
            for extension in ("jpg", "jpeg", "png", "webp"):
                if extension in event.fields:
                    try:
                        image = Image.open(io.BytesIO(event.fields[extension]))
                        image.draft("RGB", (TILE, TILE))
                        images[event.key] = image.convert("RGB")
                    except Exception:  # noqa: BLE001  (a tile stays grey)
                        pass
                    break
    return images


def grid(names: list[str], images: dict[str, Image.Image]) -> Image.Image:
    """One row: the kept image (green frame), then the blocklisted ones (red frames)."""
    shown = names[:GRID_COLUMNS]
    canvas = Image.new("RGB", (len(shown) * TILE, TILE), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for column, key in enumerate(shown):
        left = column * TILE
        colour = KEPT_COLOUR if column == 0 else REMOVED_COLOUR
        draw.rectangle((left, 0, left + TILE - 1, TILE - 1), fill=colour)
        inner = TILE - 2 * FRAME
        if key in images:
            tile = images[key].copy()
            tile.thumbnail((inner, inner))
            canvas.paste(tile, (left + FRAME + (inner - tile.width) // 2, FRAME + (inner - tile.height) // 2))
        else:
            draw.rectangle((left + FRAME, FRAME, left + TILE - FRAME - 1, TILE - FRAME - 1), fill=MISSING_COLOUR)
    return canvas


def write_examples(folder: Path, named_groups: list[list[str]], url_of_key: dict[str, str]) -> list[dict]:
    """`folder/group-NNN.png` per group; their entries for the report. Older grids are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("group-*.png"):
        old.unlink()
    images = _images({key: url_of_key[key] for names in named_groups for key in names[:GRID_COLUMNS]})
    entries = []
    for number, names in enumerate(named_groups):
        path = folder / f"group-{number:03d}.png"
        buffer = io.BytesIO()
        grid(names, images).save(buffer, format="PNG")
        write_bytes_atomic(path, buffer.getvalue())
        entries.append({"image": f"{folder.name}/{path.name}", "kept": names[0], "blocklisted": names[1:]})
    return entries


def write_report(path: Path, report: dict) -> None:
    write_text_atomic(path, json.dumps(report, indent=2, sort_keys=True) + "\n")
