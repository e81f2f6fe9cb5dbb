"""Which caption a sample trains with: the original or the synthetic one, decided per (seed, key, epoch).

    field = CaptionField.parse("syn.txt")          # a sidecar extension; "json:syn_caption" reads a JSON field
    text = field.read(sample.fields)               # None when the sample has no synthetic caption
    use_synthetic(seed=0, key="000001", epoch=3, p_synthetic=0.5)

The choice is a hash of its inputs, not a draw from a stream, so it is the same in any worker, in
any order, after any resume, and in the precompute cache (which stores both captions' embeddings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from sd3train.runtime.rng import derive_seed

_UNIT = float(1 << 63)


def unit_draw(*parts: object) -> float:
    """A number in [0, 1) that is a pure function of `parts`."""
    return derive_seed(*parts) / _UNIT


def use_synthetic(seed: int, key: str, epoch: int, p_synthetic: float) -> bool:
    return unit_draw("caption", seed, key, epoch) < p_synthetic


def decode_text(data: bytes | str) -> str:
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    return text.strip()


@dataclass(frozen=True)
class CaptionField:
    """A caption's place in a sample: a file extension ("txt", "syn.txt") or a JSON field ("json:caption")."""

    extension: str
    json_field: Optional[str] = None

    @classmethod
    def parse(cls, spec: str) -> "CaptionField":
        spec = spec.strip()
        if spec.startswith("json:"):
            name = spec[len("json:"):]
            if not name:
                raise ValueError(f"caption field {spec!r} names no JSON field (expected 'json:<field>')")
            return cls("json", name)
        extension = spec.lower().lstrip(".")
        if not extension:
            raise ValueError(f"caption field {spec!r} is empty")
        return cls(extension)

    def read(self, fields: dict[str, bytes]) -> Optional[str]:
        """The caption text, or None when it is absent, empty, or the JSON is unreadable."""
        if self.extension not in fields:
            return None
        if self.json_field is None:
            text = decode_text(fields[self.extension])
        else:
            try:
                value = json.loads(fields[self.extension]).get(self.json_field)
            except (ValueError, AttributeError):
                return None
            text = value.strip() if isinstance(value, str) else ""
        return text or None

    def __str__(self) -> str:
        return self.extension if self.json_field is None else f"json:{self.json_field}"
