"""sd3train-shards: folder and table inputs, sidecars, splitting, skips, errors, byte-identical re-runs."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd3train.data.tar_writer import read_manifest, sha256_file, verify_shards
from sd3train.tools.write_shards import main


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> bytes:
    """Write a small real image (format from the suffix) and return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix.lower()]
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path.read_bytes()


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive.getmembers()}


def _hashes(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir())}


def _run(*args: object) -> int:
    return main([str(arg) for arg in args])


def test_folder_mode_sidecars_synthetic_captions_and_json(tmp_path, capsys):
    root = tmp_path / "images"
    a = _image(root / "b" / "cat.JPG", (200, 10, 10), (12, 8))
    (root / "b" / "cat.txt").write_text("a red cat\n")
    (root / "b" / "cat.syn.txt").write_text("a small red square cat")
    b = _image(root / "a" / "dog.png", (10, 200, 10), (6, 10))
    (root / "a" / "dog.txt").write_text("a green dog")
    c = _image(root / "a" / "fox.jpeg", (10, 10, 200), (5, 5))
    (root / "a" / "fox.txt").write_text("a blue fox")

    assert _run("--images", root, "--out", tmp_path / "out") == 0
    members = _members(tmp_path / "out" / "shard-000000.tar")
    # Sorted relative paths: a/dog.png, a/fox.jpeg, b/cat.JPG; jpeg and JPG are written as jpg.
    assert sorted(members) == [
        "000000000.json", "000000000.png", "000000000.txt",
        "000000001.jpg", "000000001.json", "000000001.txt",
        "000000002.jpg", "000000002.json", "000000002.syn.txt", "000000002.txt",
    ]
    assert members["000000000.png"] == b and members["000000001.jpg"] == c and members["000000002.jpg"] == a
    assert members["000000002.txt"] == b"a red cat"
    assert members["000000002.syn.txt"] == b"a small red square cat"
    assert json.loads(members["000000002.json"]) == {
        "key": "000000002", "source_path": "b/cat.JPG", "width": 12, "height": 8,
        "caption": "a red cat", "synthetic_caption": "a small red square cat",
    }
    assert json.loads(members["000000000.json"]) == {
        "key": "000000000", "source_path": "a/dog.png", "width": 6, "height": 10, "caption": "a green dog",
    }
    manifest = read_manifest(tmp_path / "out")
    assert [(e["name"], e["samples"]) for e in manifest["shards"]] == [("shard-000000.tar", 3)]
    assert manifest["sources"]["shard"]["images"] == str(root)
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 shards, 3 samples, skipped 0" in summary and " bytes, " in summary and " s, " in summary


def test_folder_mode_custom_suffix_ext_prefix_and_key_digits(tmp_path):
    root = tmp_path / "images"
    _image(root / "x.webp", (1, 2, 3))
    (root / "x.txt").write_text("real")
    (root / "x.recap").write_text("synthetic")
    code = _run(
        "--images", root, "--out", tmp_path / "out", "--prefix", "train", "--key-digits", "4",
        "--synthetic-suffix", ".recap", "--synthetic-ext", "recap.txt",
    )
    assert code == 0
    assert sorted(_members(tmp_path / "out" / "train-000000.tar")) == ["0000.json", "0000.recap.txt", "0000.txt", "0000.webp"]


def _rows(tmp_path: Path) -> list[dict]:
    """Five images beside the tables (one in a subfolder), the second without a synthetic caption."""
    rows = []
    for index in range(5):
        relative = f"img/{index}.png" if index % 2 else f"{index}.jpg"
        _image(tmp_path / relative, (index * 40, 0, 0))
        rows.append({"path": relative, "caption": f"caption {index}", "synthetic_caption": "" if index == 1 else f"syn {index}"})
    return rows


def _write_tables(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    tables = {"jsonl": tmp_path / "t.jsonl", "csv": tmp_path / "t.csv", "parquet": tmp_path / "t.parquet"}
    tables["jsonl"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    with open(tables["csv"], "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tables["parquet"])
    return tables


def test_table_modes_give_identical_shards(tmp_path):
    rows = _rows(tmp_path)
    tables = _write_tables(tmp_path, rows)
    hashes = {}
    for kind, table in tables.items():
        out = tmp_path / f"out-{kind}"
        assert _run("--table", table, "--out", out, "--samples-per-shard", "2") == 0
        hashes[kind] = {name: h for name, h in _hashes(out).items() if name != "manifest.json"}
    assert hashes["jsonl"] == hashes["csv"] == hashes["parquet"]
    assert sorted(hashes["csv"]) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    members = _members(tmp_path / "out-csv" / "shard-000000.tar")
    assert members["000000000.jpg"] == (tmp_path / "0.jpg").read_bytes()
    assert members["000000001.png"] == (tmp_path / "img" / "1.png").read_bytes()
    assert "000000001.syn.txt" not in members  # an empty synthetic caption is no synthetic caption
    assert members["000000000.syn.txt"] == b"syn 0"
    assert json.loads(members["000000001.json"])["source_path"] == "img/1.png"


def test_table_custom_columns(tmp_path):
    _image(tmp_path / "a.png", (5, 5, 5))
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"file": "a.png", "text": "hello", "recap": "hi there"}) + "\n")
    code = _run(
        "--table", table, "--out", tmp_path / "out",
        "--path-column", "file", "--caption-column", "text", "--synthetic-column", "recap",
    )
    assert code == 0
    members = _members(tmp_path / "out" / "shard-000000.tar")
    assert members["000000000.txt"] == b"hello" and members["000000000.syn.txt"] == b"hi there"


def test_samples_per_shard_split_and_manifest(tmp_path):
    root = tmp_path / "images"
    for index in range(7):
        _image(root / f"{index:02d}.png", (index, index, index))
        (root / f"{index:02d}.txt").write_text(f"grey {index}")
    assert _run("--images", root, "--out", tmp_path / "out", "--samples-per-shard", "3") == 0
    manifest = read_manifest(tmp_path / "out")
    assert [(e["name"], e["samples"]) for e in manifest["shards"]] == [
        ("shard-000000.tar", 3), ("shard-000001.tar", 3), ("shard-000002.tar", 1),
    ]
    for entry in manifest["shards"]:
        path = tmp_path / "out" / entry["name"]
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
        assert len(_members(path)) == 3 * entry["samples"]  # image + txt + json
    assert verify_shards(tmp_path / "out", manifest["shards"]) == []
    assert sorted(_members(tmp_path / "out" / "shard-000002.tar")) == ["000000006.json", "000000006.png", "000000006.txt"]


def test_bad_inputs_are_skipped_counted_and_listed(tmp_path, capsys):
    root = tmp_path / "images"
    _image(root / "good.png", (1, 1, 1))
    (root / "good.txt").write_text("fine")
    _image(root / "nocaption.png", (2, 2, 2))
    _image(root / "empty.png", (3, 3, 3))
    (root / "empty.txt").write_text("  \n")
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "broken.txt").write_text("a broken image")
    truncated = _image(tmp_path / "t.png", (4, 4, 4))
    (root / "truncated.png").write_bytes(truncated[:-20])  # header fine, end missing: verify() notices
    (root / "truncated.txt").write_text("cut short")

    assert _run("--images", root, "--out", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "skipped nocaption.png: missing_caption" in err
    assert "skipped empty.png: empty_caption" in err
    assert "skipped broken.jpg: undecodable_image" in err
    assert "skipped truncated.png: undecodable_image" in err
    summary = err.strip().splitlines()[-1]
    assert "1 shards, 1 samples, skipped 4 (empty_caption 1, missing_caption 1, undecodable_image 2)" in summary
    members = _members(tmp_path / "out" / "shard-000000.tar")
    assert sorted(members) == ["000000000.json", "000000000.png", "000000000.txt"]  # keys stay contiguous


def test_table_missing_images_are_skipped(tmp_path, capsys):
    _image(tmp_path / "ok.png", (1, 1, 1))
    table = tmp_path / "t.csv"
    table.write_text("path,caption\nok.png,fine\nmissing.png,gone\n,no path\nok.png,\n")
    assert _run("--table", table, "--out", tmp_path / "out") == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 samples, skipped 3 (empty_caption 1, missing_image 2)" in summary


def test_all_bad_exits_2_and_keeps_existing_shards(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    _image(good / "a.png", (1, 1, 1))
    (good / "a.txt").write_text("fine")
    _image(bad / "a.png", (1, 1, 1))  # no caption
    out = tmp_path / "out"
    assert _run("--images", good, "--out", out) == 0
    before = _hashes(out)
    capsys.readouterr()
    assert _run("--images", bad, "--out", out) == 2
    assert "0 samples, skipped 1 (missing_caption 1)" in capsys.readouterr().err
    assert _hashes(out) == before  # nothing replaced by an empty dataset
    (tmp_path / "empty").mkdir()
    assert _run("--images", tmp_path / "empty", "--out", tmp_path / "out2") == 2
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one of --images"),
        (["--images", "{d}", "--table", "{d}/t.csv"], "exactly one of --images"),
        (["--table", "{d}/t.tsv"], "unknown table type '.tsv'"),
        (["--table", "{d}/nothere.csv"], "nothere.csv: no such file"),
        (["--images", "{d}/nothere"], "not a folder"),
        (["--table", "{d}/t.csv", "--caption-column", "text"], "t.csv: no column 'text'"),
        (["--table", "{d}/t.csv", "--synthetic-column", "recap"], "t.csv: no column 'recap'"),
        (["--table", "{d}/t.parquet", "--path-column", "file"], "t.parquet: no column 'file'"),
        (["--table", "{d}/t.jsonl", "--caption-column", "text"], "t.jsonl: no column 'text'"),
        (["--images", "{d}", "--synthetic-ext", "txt"], "--synthetic-ext"),
        (["--images", "{d}", "--samples-per-shard", "0"], "--samples-per-shard"),
    ],
)
def test_usage_errors_exit_2_and_name_the_problem(tmp_path, capsys, args, message):
    rows = [{"path": "a.png", "caption": "x"}]
    _image(tmp_path / "a.png", (1, 1, 1))
    (tmp_path / "t.tsv").write_text("path\tcaption\n")
    _write_tables(tmp_path, rows)
    argv = [arg.format(d=tmp_path) for arg in args] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reruns_are_byte_identical(tmp_path):
    root = tmp_path / "images"
    for index in range(5):
        _image(root / f"{index}.jpg", (index * 50, 20, 20))
        (root / f"{index}.txt").write_text(f"red {index}")
        (root / f"{index}.syn.txt").write_text(f"synthetic red {index}")
    assert _run("--images", root, "--out", tmp_path / "a", "--samples-per-shard", "2") == 0
    assert _run("--images", root, "--out", tmp_path / "b", "--samples-per-shard", "2") == 0
    first = _hashes(tmp_path / "a")
    assert first == _hashes(tmp_path / "b")
    assert sorted(first) == ["manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    # Into the same folder again: same bytes; fewer shards: the stale ones go.
    assert _run("--images", root, "--out", tmp_path / "a", "--samples-per-shard", "2") == 0
    assert _hashes(tmp_path / "a") == first
    assert _run("--images", root, "--out", tmp_path / "a", "--samples-per-shard", "5") == 0
    assert sorted(_hashes(tmp_path / "a")) == ["manifest.json", "shard-000000.tar"]


def test_module_docstring_shows_the_commands():
    import sd3train.tools.write_shards as tool

    assert "sd3train-shards --images" in tool.__doc__ and "python -m sd3train.tools.write_shards" in tool.__doc__
