"""Shard writing and the shapes dataset tool: layout, manifest, byte-identical rebuilds, idempotence."""

from __future__ import annotations

import inspect
import io
import json
import math
import tarfile
from dataclasses import asdict
from pathlib import Path

import braceexpand
import pytest
from omegaconf import OmegaConf
from PIL import Image

from sd3train.config.compose import compose_raw
from sd3train.config.schema import DataConfig
from sd3train.data.tar_writer import (
    EncodedImage,
    ShardSample,
    check_sidecar_ext,
    read_manifest,
    sha256_file,
    verify_shards,
    write_shards,
)
from sd3train.tools.make_shapes import build_shapes, main

SMALL = dict(train=32, val=8, size=16, seed=0, samples_per_shard=16)


def _file_hashes(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir())}


def test_make_shapes_builds_are_byte_identical(tmp_path):
    build_shapes(tmp_path / "a", **SMALL)
    build_shapes(tmp_path / "b", **SMALL)
    hashes_a, hashes_b = _file_hashes(tmp_path / "a"), _file_hashes(tmp_path / "b")
    assert sorted(hashes_a) == ["manifest.json", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert hashes_a == hashes_b
    # Fixed headers are what make that possible.
    with tarfile.open(tmp_path / "a" / "val-000000.tar") as archive:
        members = archive.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "sd3train", "sd3train", 0o444)}


def test_make_shapes_manifest_counts_and_hashes(tmp_path):
    build_shapes(tmp_path, train=40, val=8, size=16, seed=0, samples_per_shard=16)
    manifest = read_manifest(tmp_path)
    assert [(e["name"], e["samples"]) for e in manifest["shards"]] == [
        ("train-000000.tar", 16),
        ("train-000001.tar", 16),
        ("train-000002.tar", 8),
        ("val-000000.tar", 8),
    ]
    for entry in manifest["shards"]:
        path = tmp_path / entry["name"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == sha256_file(path)
        with tarfile.open(path) as archive:
            assert len(archive.getnames()) == 3 * entry["samples"]  # png + txt + json per sample
    assert manifest["sources"]["train"]["count"] == 40
    assert manifest["sources"]["val"]["seed"] == manifest["sources"]["train"]["seed"] + 1_000_000
    assert verify_shards(tmp_path, manifest["shards"]) == []


def test_make_shapes_val_is_held_out_from_train(tmp_path):
    build_shapes(tmp_path, **SMALL)
    def pngs(name):
        with tarfile.open(tmp_path / name) as archive:
            return {archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(".png")}
    train, val = pngs("train-000000.tar") | pngs("train-000001.tar"), pngs("val-000000.tar")
    assert len(train) == 32 and len(val) == 8
    assert not train & val


def test_make_shapes_rerun_does_nothing_and_new_arguments_rebuild(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--train", "32", "--val", "8", "--size", "16", "--samples-per-shard", "8"]) == 0
    stamps = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    assert len(stamps) == 1 + 4 + 1
    assert build_shapes(tmp_path, train=32, val=8, size=16, seed=0, samples_per_shard=8) is False
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == stamps
    # A damaged shard is noticed and rewritten.
    (tmp_path / "train-000001.tar").write_bytes(b"broken")
    assert build_shapes(tmp_path, train=32, val=8, size=16, seed=0, samples_per_shard=8) is True
    assert verify_shards(tmp_path, read_manifest(tmp_path)["shards"]) == []
    # Fewer, bigger shards: the stale ones are removed.
    assert build_shapes(tmp_path, train=32, val=8, size=16, seed=0, samples_per_shard=16) is True
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "manifest.json", "train-000000.tar", "train-000001.tar", "val-000000.tar"
    ]


def test_write_shards_layout_and_atomic_names(tmp_path):
    samples = [
        ("k0", Image.new("RGB", (8, 8), (255, 0, 0)), "red", {"index": 0}),
        ("k1", Image.new("RGB", (8, 8), (0, 255, 0)), "green", None),
        ("k2", Image.new("RGB", (8, 8), (0, 0, 255)), "blue", None),
    ]
    entries = write_shards(samples, tmp_path, prefix="part", samples_per_shard=2, image_format="jpg")
    assert [(e["name"], e["samples"]) for e in entries] == [("part-000000.tar", 2), ("part-000001.tar", 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "part-000000.tar", "part-000001.tar"]
    with tarfile.open(tmp_path / "part-000000.tar") as archive:
        assert archive.getnames() == ["k0.jpg", "k0.json", "k0.txt", "k1.jpg", "k1.txt"]
        assert archive.extractfile("k0.txt").read() == b"red"
        assert json.loads(archive.extractfile("k0.json").read()) == {"index": 0}
        image = Image.open(io.BytesIO(archive.extractfile("k1.jpg").read()))
        assert image.format == "JPEG" and image.size == (8, 8)
    # A second prefix in the same folder keeps the first one's entries.
    write_shards(samples[:1], tmp_path, prefix="other", samples_per_shard=2)
    assert [e["name"] for e in read_manifest(tmp_path)["shards"]] == ["other-000000.tar", "part-000000.tar", "part-000001.tar"]


def test_write_shards_rejects_dotted_key_and_leaves_no_partial_file(tmp_path):
    with pytest.raises(ValueError, match="contain no '.'"):
        write_shards([("a.b", Image.new("RGB", (4, 4)), "x", None)], tmp_path, prefix="bad", samples_per_shard=4)
    assert list(tmp_path.iterdir()) == []


def test_shapes_defaults_match_data_config_and_shipped_yaml():
    defaults = {name: p.default for name, p in inspect.signature(build_shapes).parameters.items()}
    data = DataConfig()
    train_names = [Path(p).name for p in braceexpand.braceexpand(data.shards)]
    assert train_names == [f"train-{i:06d}.tar" for i in range(math.ceil(defaults["train"] / defaults["samples_per_shard"]))]
    assert len(train_names) == 8
    assert data.val_shards == "data/shapes/val-000000.tar" and defaults["val"] <= defaults["samples_per_shard"]
    assert defaults["size"] == data.resolution == 64
    # The shipped option adds nothing to the schema's defaults (conf/data/shapes.yaml is empty).
    shipped = OmegaConf.to_container(compose_raw(["data=shapes"]).data)
    assert shipped == asdict(data)


def _png_bytes(colour=(1, 2, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_write_shards_sidecars_and_encoded_image_extensions(tmp_path):
    webp = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(webp, format="WEBP")
    samples = [
        ("a", EncodedImage(webp.getvalue(), "webp"), "one", None, {"syn.txt": b"synthetic one"}),
        ShardSample("b", EncodedImage(b"jpeg bytes as they are", "jpeg"), "two", {"i": 1}, {"syn.txt": b"s2", "mask": b"m"}),
        ("c", _png_bytes(), "three", None),  # plain bytes still go under image_format
        ShardSample("d", Image.new("RGB", (4, 4)), "four"),
    ]
    write_shards(samples, tmp_path, prefix="x", samples_per_shard=10, image_format="jpg")
    with tarfile.open(tmp_path / "x-000000.tar") as archive:
        assert archive.getnames() == [
            "a.syn.txt", "a.txt", "a.webp",
            "b.jpeg", "b.json", "b.mask", "b.syn.txt", "b.txt",
            "c.jpg", "c.txt",
            "d.jpg", "d.txt",
        ]
        assert archive.extractfile("a.webp").read() == webp.getvalue()
        assert archive.extractfile("b.jpeg").read() == b"jpeg bytes as they are"
        assert archive.extractfile("a.syn.txt").read() == b"synthetic one"
        assert archive.extractfile("c.jpg").read() == _png_bytes()


@pytest.mark.parametrize("ext", ["txt", "json", "png", "JPG", ".syn.txt", "_meta", "syn..txt", "a/b", ""])
def test_sidecar_extensions_that_would_clash_or_break_grouping_are_rejected(tmp_path, ext):
    with pytest.raises(ValueError, match="sidecar extension"):
        check_sidecar_ext(ext)
    with pytest.raises(ValueError, match="sidecar extension"):
        write_shards([("k", _png_bytes(), "c", None, {ext: b"x"})], tmp_path, prefix="bad", samples_per_shard=4)
    assert list(tmp_path.iterdir()) == []


def test_encoded_image_and_sample_shape_are_checked(tmp_path):
    assert check_sidecar_ext("syn.txt") == "syn.txt"
    with pytest.raises(ValueError, match="image extension"):
        EncodedImage(b"x", "gif")
    with pytest.raises(TypeError, match="must be bytes"):
        write_shards([("k", _png_bytes(), "c", None, {"syn.txt": "text"})], tmp_path, prefix="bad", samples_per_shard=4)
    with pytest.raises(ValueError, match="fields"):
        write_shards([("k", _png_bytes(), "c")], tmp_path, prefix="bad", samples_per_shard=4)
