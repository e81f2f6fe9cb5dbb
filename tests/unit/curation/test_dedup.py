"""sd3train-dedup end to end on shards with planted near-duplicates: what it finds, task splits,
kill-and-rerun, exit statuses, and training with its blocklist."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd3train.curation.dedup import main
from sd3train.data.skips import load_blocklist
from sd3train.data.tar_writer import EncodedImage, ShardSample, write_shards
from sd3train.durable import TEMP_MARK
from tests.support.datamodules import one_epoch_keys
from tests.support.dedup_shards import write_planted_shards
from tests.support.processes import sigkill_while_feeding_fifo

ORIGINALS, COPIES, PER_SHARD = 270, 30, 50  # 300 samples, 10% planted copies, 6 shards
SHARDS = 6
THUMBNAIL = ("--descriptor", "thumbnail")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_shards(tmp_path_factory.mktemp("planted"), ORIGINALS, COPIES, PER_SHARD, seed=0)


def run_dedup(stage: str, out: Path, spec: str, *flags: str) -> int:
    embed_flags = THUMBNAIL if stage in ("embed", "all") else ()
    return main([stage, "--out", str(out), "--shards", spec, *embed_flags, *flags])


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def reference(planted, tmp_path_factory) -> Path:
    """One uninterrupted `all` run, one task."""
    out = tmp_path_factory.mktemp("reference")
    assert run_dedup("all", out, planted.spec) == 0
    return out


def read_groups(out: Path) -> list[list[str]]:
    return [line.split() for line in (out / "groups.txt").read_text().splitlines()]


# ------------------------------------------------------------- what it finds


def test_finds_the_planted_copies_and_flags_almost_no_clean_sample(planted, reference):
    found = read_groups(reference)
    blocklisted = load_blocklist(reference / "blocklist.txt")
    found_sets = {frozenset(group) for group in found}
    recovered = [group for group in planted.groups if frozenset(group) in found_sets]  # exactly this group
    recall = len(recovered) / len(planted.groups)
    in_groups = {key for group in found for key in group}
    false_flags = [key for key in planted.clean if key in in_groups]
    false_flag_rate = len(false_flags) / len(planted.clean)
    print(f"\nplanted groups {len(planted.groups)}, recovered exactly {len(recovered)} (recall {recall:.1%}); "
          f"clean samples {len(planted.clean)}, in a group {len(false_flags)} ({false_flag_rate:.2%})")
    assert len(planted.keys) == ORIGINALS + COPIES and len(planted.groups) == 27 and len(planted.clean) == 243
    assert recall >= 0.95 and false_flag_rate <= 0.01
    assert recall == 1.0 and false_flags == []  # measured: every planted group exactly, no clean sample
    # One kept per group, the smallest key; the blocklist holds exactly the others, sorted.
    assert blocklisted == {key for group in found for key in sorted(group)[1:]}
    lines = [line for line in (reference / "blocklist.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines == sorted(blocklisted) and len(lines) == COPIES

    report = json.loads((reference / "report.json").read_text())
    assert report["samples"] == 300 and report["shards"] == SHARDS and report["blocklisted"] == COPIES
    assert report["groups"] == 27 and report["group_size_histogram"] == {"2": 24, "3": 3}
    assert report["threshold"] == 0.85 and report["descriptor"] == "thumbnail(side=16)"
    assert report["clusters_requested"] == 16000 and report["clusters"] == 300 // 39
    assert report["min_pair_similarity"] > 0.9
    assert len(report["examples"]) == 8 and report["examples"][0]["image"] == "examples/group-000.png"
    assert len(report["examples"][0]["blocklisted"]) == 2  # the largest groups first
    from PIL import Image

    with Image.open(reference / "examples" / "group-000.png") as grid:
        assert grid.size == (3 * 160, 160)


def test_without_the_copies_nothing_is_flagged(tmp_path):
    clean = write_planted_shards(tmp_path / "shards", originals=150, copies=0, per_shard=50, seed=1, triples=0)
    out = tmp_path / "out"
    assert run_dedup("all", out, clean.spec) == 0
    assert load_blocklist(out / "blocklist.txt") == frozenset()
    assert json.loads((out / "report.json").read_text())["groups"] == 0


def test_a_duplicate_key_a_blocklist_cannot_hold_exits_2_naming_it(tmp_path, capsys):
    # Two identical images, the copy under a key data.blocklist would read as a comment.
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buffer, format="PNG")
    samples = [ShardSample(key, EncodedImage(buffer.getvalue(), "png"), "caption") for key in ("#2", "!1")]
    write_shards(samples, tmp_path, prefix="hash", samples_per_shard=2)
    out = tmp_path / "out"
    assert run_dedup("all", out, str(tmp_path / "hash-000000.tar"), "--clusters", "1") == 2
    assert "'#2'" in capsys.readouterr().err and not (out / "blocklist.txt").exists()


# --------------------------------------------------------------- task splits


def test_three_tasks_give_the_same_bytes_as_one(planted, reference, tmp_path):
    out = tmp_path / "split"
    for index in (2, 0, 1):
        assert run_dedup("embed", out, planted.spec, "--num-tasks", "3", "--task-index", str(index)) == 0
        if index == 2:
            assert sorted(file_bytes(out / "embeddings")) == ["planted-000002.npz", "planted-000005.npz"]
    assert run_dedup("cluster", out, planted.spec) == 0
    assert run_dedup("search", out, planted.spec) == 0
    assert file_bytes(out / "embeddings") == file_bytes(reference / "embeddings")
    for name in ("clusters.npz", "blocklist.txt", "groups.txt", "report.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_embeddings_hold_unit_descriptors_keyed_in_shard_order(planted, reference):
    from sd3train.curation.dedup_embed import read_embeddings

    keys, descriptors, name = read_embeddings(reference / "embeddings" / "planted-000003.npz")
    assert keys == planted.keys[150:200] and name == "thumbnail(side=16)"
    assert descriptors.dtype == np.float32 and descriptors.shape == (50, 768)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------ kill and rerun


def test_a_killed_embed_task_rerun_gives_the_uninterrupted_result(planted, reference, tmp_path):
    """SIGKILL while the second shard is half read (it is a FIFO this test feeds); the rerun finishes
    it and the blocklist is byte-identical."""
    source = tmp_path / "source"
    source.mkdir()
    originals = Path(planted.spec.rsplit("/", 1)[0])
    for index in range(SHARDS):
        name = f"planted-{index:06d}.tar"
        if index == 1:
            os.mkfifo(source / name)
        else:
            shutil.copy(originals / name, source / name)
    spec = f"{source}/planted-{{000000..{SHARDS - 1:06d}}}.tar"
    out = tmp_path / "out"
    log = tmp_path / "embed.log"
    command = [sys.executable, "-m", "sd3train.curation.dedup", "embed", "--out", str(out), "--shards", spec,
               *THUMBNAIL, "--batch-size", "8", "--threads", "1"]
    second = (originals / "planted-000001.tar").read_bytes()
    embeddings = out / "embeddings"
    sigkill_while_feeding_fifo(
        command, log, source / "planted-000001.tar", second[: len(second) // 2],
        ready=lambda: ((embeddings / "planted-000000.npz").exists()
                       and bool(list(embeddings.glob(f".planted-000001.npz{TEMP_MARK}*")))),
        ready_what="the first shard's embeddings and the second one's temporary file",
        settle_s=0.3,  # let it read and embed some of the half shard
    )
    assert sorted(path.name for path in embeddings.glob("*.npz")) == ["planted-000000.npz"]
    assert list(embeddings.glob(f".planted-000001.npz{TEMP_MARK}*"))  # only under a temporary name

    (source / "planted-000001.tar").unlink()
    shutil.copy(originals / "planted-000001.tar", source / "planted-000001.tar")
    assert run_dedup("all", out, spec) == 0
    assert not list(embeddings.glob(f".*{TEMP_MARK}*"))
    assert file_bytes(embeddings) == file_bytes(reference / "embeddings")
    assert (out / "blocklist.txt").read_bytes() == (reference / "blocklist.txt").read_bytes()


# -------------------------------------------------------------- exit statuses


def test_an_unreadable_shard_exits_1_the_others_are_done_and_a_rerun_retries_it(planted, tmp_path, capsys):
    folder = tmp_path / "shards"
    broken = [ShardSample(f"b{index:03d}", EncodedImage(data, "jpg"), "caption")
              for index, data in enumerate([b"not a jpeg", b"", b"\xff\xd8\xff truncated"])]
    write_shards(broken, folder, prefix="broken", samples_per_shard=10)
    originals = Path(planted.spec.rsplit("/", 1)[0])
    spec = f"{folder}/broken-000000.tar::{originals}/planted-000000.tar::{folder}/late-000000.tar"
    out = tmp_path / "out"
    assert run_dedup("all", out, spec) == 1
    err = capsys.readouterr().err
    assert "FAILED, cannot read" in err and "late-000000.tar" in err and "decode_error 3" in err, err
    assert sorted(path.name for path in (out / "embeddings").glob("*.npz")) == ["broken-000000.npz",
                                                                                "planted-000000.npz"]
    assert not (out / "clusters.npz").exists()  # `all` stops after a failed embed

    from sd3train.curation.dedup_embed import read_embeddings

    assert read_embeddings(out / "embeddings" / "broken-000000.npz")[0] == []  # every sample skipped
    shutil.copy(originals / "planted-000001.tar", folder / "late-000000.tar")
    assert run_dedup("all", out, spec) == 0
    assert "2 skipped (already there)" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["samples"] == 100


@pytest.mark.parametrize("argv, message", [
    (["embed", "--descriptor", "sscd"], "--descriptor sscd needs --weights"),
    (["embed", "--descriptor", "sscd", "--weights", "MISSING"], "--weights: MISSING: no such file"),
    (["embed", "--descriptor", "thumbnail", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["embed", "--descriptor", "thumbnail", "--num-tasks", "2", "--task-index", "2"], "task index 2 is outside"),
    (["cluster"], "have no embeddings"),
    (["search", "--probe", "0"], "--probe must be >= 1"),
    (["search", "--threshold", "50"], "--threshold must be between 0 and 1"),  # a percentage by mistake
    (["all", "--descriptor", "thumbnail", "--threshold", "-0.2"], "--threshold must be between 0 and 1"),
])
def test_usage_errors_exit_2_naming_the_option_or_file(planted, tmp_path, capsys, argv, message):
    argv = [arg.replace("MISSING", str(tmp_path / "sscd.pt")) for arg in argv]
    message = message.replace("MISSING", str(tmp_path / "sscd.pt"))
    assert main([*argv, "--out", str(tmp_path / "out"), "--shards", planted.spec]) == 2
    assert message in capsys.readouterr().err


def test_bad_shard_specs_and_mixed_descriptors_exit_2(planted, reference, tmp_path, capsys, monkeypatch):
    assert main(["embed", "--out", str(tmp_path), "--shards", "::", *THUMBNAIL]) == 2
    assert "--shards: shard spec '::' names no shard" in capsys.readouterr().err
    assert main(["embed", "--out", str(tmp_path), "--shards", "/a/x.tar::/b/x.tar", *THUMBNAIL]) == 2
    assert "same embeddings file x.npz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: a missing required option
        main(["embed", "--shards", planted.spec])
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err

    out = tmp_path / "mixed"
    shutil.copytree(reference / "embeddings", out / "embeddings")
    (out / "embeddings" / "planted-000004.npz").unlink()
    from sd3train.curation import dedup_stages
    from sd3train.curation.descriptors import ThumbnailDescriptor

    monkeypatch.setattr(dedup_stages, "_descriptor", lambda settings: (ThumbnailDescriptor(side=32), "cpu"))
    assert run_dedup("embed", out, planted.spec) == 2
    err = capsys.readouterr().err
    assert "was made with descriptor thumbnail(side=16), this run uses thumbnail(side=32)" in err


# ------------------------------------------------------- training with it


def test_training_with_the_blocklist_never_yields_a_blocklisted_key(planted, reference):
    from sd3train.config.schema import DataConfig
    from sd3train.data.datamodule import ShardDataModule

    blocklisted = load_blocklist(reference / "blocklist.txt")
    assert len(blocklisted) == COPIES
    cfg = DataConfig(shards=planted.spec, val_shards=None, resolution=32, aspect_buckets=False, batch_size=10,
                     num_workers=1, shuffle_buffer=16, blocklist=str(reference / "blocklist.txt"),
                     skip_budget=0.05, skip_budget_min_samples=0)
    keys, skipped = one_epoch_keys(ShardDataModule(cfg, seed=0))
    assert not set(keys) & blocklisted
    assert Counter(keys) == Counter(key for key in planted.keys if key not in blocklisted)  # each other key once
    assert dict(skipped) == {"blocklisted": COPIES}


# ------------------------------------------------------------- at scale


def test_loading_the_embeddings_holds_the_descriptors_once(tmp_path):
    """cluster and search load every descriptor (1e8 x 512 float32 is 200 GB): the loader fills one
    array shard by shard instead of holding every shard's block and their concatenation at once."""
    import tracemalloc

    from sd3train.curation.dedup_files import write_arrays
    from sd3train.curation.dedup_stages import load_embeddings

    shards, rows, dims = 20, 1000, 512
    rng = np.random.default_rng(0)
    (tmp_path / "embeddings").mkdir()
    for shard in range(shards):
        vectors = rng.normal(size=(rows, dims)).astype(np.float32)
        write_arrays(tmp_path / "embeddings" / f"s-{shard:03d}.npz", {
            "keys": np.array([f"{shard:03d}-{row:05d}" for row in range(rows)], dtype=np.str_),
            "descriptors": vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
            "descriptor": np.array("thumbnail(side=16)"),
        })
    spec = f"{tmp_path}/s-{{000..{shards - 1:03d}}}.tar"
    tracemalloc.start()
    try:
        embeddings = load_embeddings(spec, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = shards * rows * dims * 4  # 41 MB
    assert embeddings.descriptors.shape == (shards * rows, dims) and embeddings.keys[rows] == "001-00000"
    np.testing.assert_allclose(np.linalg.norm(embeddings.descriptors[::997], axis=1), 1.0, rtol=1e-5)
    assert peak < 1.3 * total, f"peak {peak / 1e6:.0f} MB for {total / 1e6:.0f} MB of descriptors"


def test_embeddings_of_another_width_are_refused_naming_the_file(planted, reference, tmp_path, capsys):
    from sd3train.curation.dedup_files import write_arrays

    out = tmp_path / "out"
    shutil.copytree(reference / "embeddings", out / "embeddings")
    write_arrays(out / "embeddings" / "planted-000004.npz", {
        "keys": np.array(["x"], dtype=np.str_), "descriptors": np.ones((1, 12), dtype=np.float32),
        "descriptor": np.array("thumbnail(side=16)")})
    assert run_dedup("cluster", out, planted.spec) == 2
    err = capsys.readouterr().err
    assert "planted-000004.npz" in err and "12" in err and "768" in err, err


def test_the_search_maps_only_the_example_keys_to_their_shards(planted, reference, tmp_path, monkeypatch):
    """Example grids need the shard of a few keys; a {key: url} dict of every sample would be
    about 10 GB at 1e8 samples."""
    from sd3train.curation import dedup_report

    out = tmp_path / "out"
    shutil.copytree(reference / "embeddings", out / "embeddings")
    shutil.copy(reference / "clusters.npz", out / "clusters.npz")
    seen = []
    real = dedup_report.write_examples

    def spy(folder, named_groups, url_of_key):
        seen.append((named_groups, dict(url_of_key)))
        return real(folder, named_groups, url_of_key)

    monkeypatch.setattr(dedup_report, "write_examples", spy)
    assert run_dedup("search", out, planted.spec, "--examples", "2") == 0
    (named_groups, url_of_key), = seen
    assert len(named_groups) == 2 and set(url_of_key) == {key for names in named_groups for key in names}
    shard_of = {key: planted.spec.rsplit("/", 1)[0] + f"/planted-{planted.keys.index(key) // PER_SHARD:06d}.tar"
                for key in url_of_key}
    assert url_of_key == shard_of
    assert (out / "blocklist.txt").read_bytes() == (reference / "blocklist.txt").read_bytes()
