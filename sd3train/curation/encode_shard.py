"""Encoding one source shard into one cache shard: the frozen encoders, batching, the tar write.

    precomputer = Precomputer(cfg, Encoders(cfg, "cuda"), "bf16", batch_size=16)
    result = precomputer.run(url, out / name)       # ShardResult: samples, skips, failure

Samples are decoded as validation decodes them, batched per aspect bucket (at most
`REORDER_WINDOW_BATCHES` batches' worth waiting), encoded, and written in source order to a
temporary file that is renamed into place only when the source could be read (`sd3train.durable`). The
command line around it is `sd3train.curation.precompute`.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd3train.curation.tasks import note_problem
from sd3train.durable import replace, sync, temporary_file

# A sample waits in its bucket's partial batch until at most this many batches' worth of later
# samples have been read; then that bucket is encoded as it is. Bounds the memory held for
# writing in source order when a bucket is rare.
REORDER_WINDOW_BATCHES = 16


def _pack(image):
    """Decoded pixels as uint8 when that is lossless (a quarter of the memory while they wait)."""
    import torch

    if image.dtype == torch.float32:
        packed = torch.round((image + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)
        if torch.equal(_unpack(packed), image):
            return packed
    return image


def _unpack(image):
    import torch

    # The decoder's own formula (decoders.image_to_tensor), so the floats are bit-for-bit the same.
    return image.to(torch.float32) / 127.5 - 1.0 if image.dtype == torch.uint8 else image


class Encoders:
    """The frozen VAE and text encoders of a config, in eval mode, fp32, on one device."""

    def __init__(self, cfg, device: str):
        import torch

        from sd3train.checkpoint.components import text_conditioner_from_config, vae_from_config

        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True  # the same convolution algorithm on every run
        self.vae = vae_from_config(cfg.vae).to(self.device, torch.float32)
        self.text = text_conditioner_from_config(cfg.text).requires_grad_(False).eval().to(self.device)

    def images(self, images):
        """(B, 3, h, w) in [-1, 1] -> (mean, std) of the posterior, fp32 on the CPU."""
        import torch

        with torch.no_grad():
            mean, logvar = self.vae.encode_moments(images.to(self.device))
            std = torch.exp(0.5 * logvar.float())  # what the training module computes from logvar
        return mean.float().cpu(), std.cpu()

    def captions(self, prompts: list[str]) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            outputs = self.text.encode_per_encoder(prompts)
        return {name: tensor.float().cpu() for name, tensor in outputs.items()}


@dataclass
class _Item:
    index: int  # position among this shard's usable samples
    key: str
    image: Any  # packed pixels (see _pack)
    bucket: Any
    caption: str
    synthetic: str | None
    original_size: list[int]
    crop_offset: list[int]


class _SourceOrderBatcher:
    """Per-bucket batches in, records out in source order (see REORDER_WINDOW_BATCHES)."""

    def __init__(self, batch_size: int, window: int, encode: Callable[[list[_Item]], list[dict]],
                 write: Callable[[dict], None]):
        self.batch_size = batch_size
        self.window = window
        self.encode = encode
        self.write = write
        self.pending: dict[Any, list[_Item]] = {}
        self.buckets: dict[int, Any] = {}  # index -> bucket, for every sample not written yet
        self.done: dict[int, dict] = {}
        self.order: deque[int] = deque()

    def add(self, item: _Item) -> None:
        self.order.append(item.index)
        self.buckets[item.index] = item.bucket
        batch = self.pending.setdefault(item.bucket, [])
        batch.append(item)
        if len(batch) == self.batch_size:
            self._encode(item.bucket)
        while len(self.order) > self.window:  # the oldest waits in a partial batch: encode it now
            self._encode(self.buckets[self.order[0]])

    def finish(self) -> None:
        for bucket in sorted(self.pending):
            self._encode(bucket)

    def _encode(self, bucket: Any) -> None:
        items = self.pending.pop(bucket)
        for item, record in zip(items, self.encode(items), strict=True):
            self.done[item.index] = record
        while self.order and self.order[0] in self.done:
            index = self.order.popleft()
            del self.buckets[index]
            self.write(self.done.pop(index))


@dataclass
class ShardResult:
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one detail
    failure: str | None = None  # why the shard could not be read (nothing written)

    def skip(self, reason: str, key: str | None, detail: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"{key}: {detail}" if key else detail)


class Precomputer:
    """Turns one source shard into one cache shard."""

    def __init__(self, cfg, encoders: Encoders, dtype_name: str, batch_size: int, keep_truncated: bool = False):
        from sd3train.data.cache_format import DTYPES
        from sd3train.data.caption_tables import SyntheticCaptions
        from sd3train.data.captions import CaptionField
        from sd3train.data.datamodule import build_decoder

        self.decoder = build_decoder(cfg.data, cfg.trainer.seed, train=False)
        key = cfg.data.synthetic_caption_key
        self.synthetic = CaptionField.parse(key) if key else None
        # data.synthetic_captions: the caption tables come first, the sample's own synthetic caption second.
        self.captions = SyntheticCaptions.from_config(cfg.data)
        self.encoders = encoders
        self.dtype = DTYPES[dtype_name]
        self.batch_size = batch_size
        # A truncated source is usually a transient read failure (a reset pipe): publishing its
        # first half would make every rerun skip the shard. Only kept when asked.
        self.keep_truncated = keep_truncated

    def _records(self, items: list[_Item]) -> list[dict]:
        import torch

        from sd3train.data.cache_format import TEXT_OUTPUTS, sample_record

        mean, std = self.encoders.images(torch.stack([_unpack(item.image) for item in items]))
        text = self.encoders.captions([item.caption for item in items])
        rows = [row for row, item in enumerate(items) if item.synthetic is not None]
        synthetic = self.encoders.captions([items[row].synthetic for row in rows]) if rows else {}
        synthetic_row = {row: position for position, row in enumerate(rows)}
        records = []
        for row, item in enumerate(items):
            meta: dict[str, Any] = {
                "caption": item.caption,
                "bucket": [item.bucket.height, item.bucket.width],
                "original_size": item.original_size,
                "crop_offset": item.crop_offset,
            }
            synthetic_text = None
            if item.synthetic is not None:
                meta["synthetic_caption"] = item.synthetic
                synthetic_text = {name: synthetic[name][synthetic_row[row]] for name in TEXT_OUTPUTS}
            records.append(sample_record(
                item.key, mean[row], std[row], {name: text[name][row] for name in TEXT_OUTPUTS},
                synthetic_text, meta, self.dtype,
            ))
        return records

    def run(self, url: str, out_path: Path) -> ShardResult:
        """Write the cache shard of `url` to `out_path` (atomically), unless the source cannot be read."""
        import webdataset as wds

        from sd3train.data.caption_tables import ShardCaptions
        from sd3train.data.decoders import Skip
        from sd3train.data.tar_reader import ShardProblem, read_shard
        from sd3train.data.tar_writer import TAR_GROUP, TAR_MODE, TAR_MTIME, TAR_USER

        result = ShardResult()
        # The sample's own synthetic caption, or its shard's caption table first (data.synthetic_captions).
        synthetic = self.captions.for_shard(url) if self.captions is not None else ShardCaptions({}, self.synthetic)
        descriptor, temporary = temporary_file(out_path.parent, out_path.name)
        try:
            with os.fdopen(descriptor, "wb") as stream:
                writer = wds.TarWriter(stream, user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE, mtime=TAR_MTIME,
                                       encoder=False)

                def write(record: dict) -> None:
                    writer.write(record)
                    result.samples += 1

                batcher = _SourceOrderBatcher(self.batch_size, REORDER_WINDOW_BATCHES * self.batch_size,
                                              self._records, write)
                index = 0
                for event in read_shard(url):
                    if isinstance(event, ShardProblem):
                        note_problem(result, event, self.keep_truncated)
                        continue
                    decoded = self.decoder.decode(event, 0)
                    if isinstance(decoded, Skip):
                        result.skip(decoded.reason, event.key, decoded.detail)
                        continue
                    images = decoded.tensors["images"]
                    bucket = decoded.bucket
                    if tuple(images.shape[-2:]) != (bucket.height, bucket.width):
                        raise RuntimeError(f"{event.key}: decoded {tuple(images.shape)} for bucket {bucket}")
                    batcher.add(_Item(
                        index=index,
                        key=event.key,
                        image=_pack(images),
                        bucket=bucket,
                        caption=decoded.values["captions"],
                        synthetic=synthetic.caption(event),
                        original_size=[int(v) for v in decoded.tensors["original_sizes"].tolist()],
                        crop_offset=[int(v) for v in decoded.tensors["crop_offsets"].tolist()],
                    ))
                    index += 1
                batcher.finish()
                writer.close()  # the end-of-archive blocks; the stream stays open
                sync(stream)
            if result.failure is None:
                replace(temporary, out_path)
        finally:
            temporary.unlink(missing_ok=True)
        return result
