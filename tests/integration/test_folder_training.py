"""`data=folder`: an image folder with nested subfolders, a corrupt image, an image without a
caption, masks (a .mask.png and a PNG's alpha) and a synthetic caption trains with the masked
loss; the per-reason skip counts reach metrics.csv; an instance prompt captions the uncaptioned."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from PIL import Image

from sd3train.data.folder import folder_images, folder_shard_urls, read_folder_chunk
from sd3train.data.shapes import make_sample
from sd3train.train import fit, run_dir_of
from tests.support.config import tiny_config

IMAGES = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder") / "photos"
    for index in range(IMAGES):
        image, caption = make_sample(7, index, 64)
        sub = root / ("a" if index % 3 == 0 else "b/c" if index % 3 == 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        stem = sub / f"{index:03d}"
        if index == 5:  # a PNG whose alpha channel is its mask: the left half
            alpha = Image.new("L", image.size, 0)
            alpha.paste(255, (0, 0, 32, 64))
            rgba = image.convert("RGBA")
            rgba.putalpha(alpha)
            rgba.save(f"{stem}.png")
        else:
            image.save(f"{stem}.png")
        if index != 7:  # 007 has no caption
            Path(f"{stem}.txt").write_text(caption)
        if index == 2:
            Image.new("L", (64, 64), 255).save(f"{stem}.mask.png")
            Path(f"{stem}.syn.txt").write_text(f"a drawing: {caption}")
    (root / "b" / "broken.png").write_bytes(b"not an image at all")  # corrupt
    (root / "b" / "broken.txt").write_text("a broken image")
    (root / ".hidden").mkdir()
    make_sample(7, 99, 64)[0].save(root / ".hidden" / "skipped.png")
    return root


def test_the_folder_is_listed_recursively_without_masks_or_hidden_files(folder):
    images = folder_images(folder)
    assert len(images) == IMAGES + 1  # the corrupt one is an image by name
    assert not any(path.name.endswith(".mask.png") or path.parts[0] == ".hidden" for path in images)
    urls = folder_shard_urls(folder, repeats=2, chunks=4)
    assert len(urls) == 8
    samples = [sample for url in urls[:4] for sample in read_folder_chunk(url)]
    assert sorted(sample.key for sample in samples) == sorted(path.with_suffix("").as_posix() for path in images)
    by_key = {sample.key: sample for sample in samples}
    assert set(by_key["002"].fields) == {"png", "txt", "syn.txt", "mask.png"}
    assert "txt" not in by_key["b/c/007"].fields


def last_counts(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("data/samples_read")]
    return {name: float(value) for name, value in rows[-1].items() if name.startswith("data/") and value}


@pytest.mark.parametrize("instance_prompt", [None, "a shape"])
def test_a_folder_trains_with_masks_and_counts_what_it_skipped(folder, small_shapes, tmp_path, instance_prompt):
    overrides = ["data=folder", f"data.path={folder}", "data.masked_loss=true", "data.batch_size=4",
                 "trainer.max_steps=3", "model.depth=1", "eval.prompts=[]", "eval.samples_per_caption=0",
                 "logger.wandb=false", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
                 "data.val_shards=null"]
    if instance_prompt is not None:
        overrides.append(f"data.instance_prompt='{instance_prompt}'")
    cfg = tiny_config(small_shapes, tmp_path, *overrides)
    fit(cfg)
    counts = last_counts(run_dir_of(cfg))
    assert counts["data/samples_read"] == IMAGES + 1
    assert counts["data/skipped_decode_error"] == 1
    assert counts["data/skipped_no_caption"] == (0 if instance_prompt else 1)
    assert (run_dir_of(cfg) / "checkpoints" / "step-0000003" / "COMPLETE").is_file()


def test_the_decoder_gives_masks_from_the_sidecar_and_from_alpha(folder):
    from sd3train.data.builders import build_decoder
    from tests.support.config import compose_config

    cfg = compose_config("experiment=tiny_cpu", "data=folder", f"data.path={folder}", "data.masked_loss=true")
    decoder = build_decoder(cfg.data, seed=0)
    samples = {sample.key: sample for url in folder_shard_urls(folder) for sample in read_folder_chunk(url)}
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 64, 32))  # the top half
    buffer = io.BytesIO()
    half.save(buffer, format="PNG")
    sample = samples["002"]
    masked = decoder.decode(type(sample)(sample.key, sample.url, {**sample.fields, "mask.png": buffer.getvalue()}), 0)
    mask = masked.tensors["masks"]
    assert mask.shape == (1, 64, 64) and mask[0, :32].min() == 1.0 and mask[0, 32:].max() == 0.0
    assert decoder.decode(samples["a/000"], 0).tensors["masks"].min() == 1.0  # no mask: all ones
    alpha = decoder.decode(samples["005"], 0).tensors["masks"]
    assert alpha[0, :, :32].min() == 1.0 and alpha[0, :, 32:].max() == 0.0


def test_prior_preservation_draws_the_class_images_once_and_logs_their_loss(folder, small_shapes, tmp_path):
    classes = tmp_path / "class"
    common = ["data=folder", f"data.path={folder}", f"data.class_images={classes}", "data.class_prompt='a shape'",
              "data.num_class_images=4", "optim.prior_loss_weight=0.5", "diffusion.sampler.num_steps=2",
              "data.batch_size=8", "model.depth=1", "eval.prompts=[]", "eval.samples_per_caption=0",
              "logger.wandb=false", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
              "data.val_shards=null", "data.instance_prompt='a shape'"]
    cfg = tiny_config(small_shapes, tmp_path / "runs", *common, "trainer.max_steps=3")
    fit(cfg)
    images = sorted(classes.glob("class-*.png"))
    assert [path.name for path in images] == [f"class-{index:05d}.png" for index in range(4)]
    assert all(path.with_suffix(".txt").read_text() == "a shape" for path in images)
    stamps = [path.stat().st_mtime_ns for path in images]
    with open(run_dir_of(cfg) / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    for row in rows:  # the step's loss: the instance samples' plus 0.5 x the class images'
        expected = float(row["train/loss_instance"]) + 0.5 * float(row["train/loss_prior"])
        assert float(row["train/loss"]) == pytest.approx(expected, rel=1e-5)
    assert any(float(row["train/loss_prior"]) > 0 for row in rows)  # class images were in the batches
    # A second run (here: the resumed one) finds them all and draws none again.
    fit(tiny_config(small_shapes, tmp_path / "runs", *common, "trainer.max_steps=4"))
    assert [path.stat().st_mtime_ns for path in images] == stamps


def test_class_prompts_caption_the_class_images_in_turn(folder, small_shapes, tmp_path):
    """data.class_prompts (experiment=lora_tiny_cpu preserves the whole grammar): image i is drawn
    from, and captioned with, prompt i mod their count."""
    classes = tmp_path / "class"
    prompts = ["a red circle on a white background", "a blue square on a black background",
               "a green triangle on a white background"]
    cfg = tiny_config(small_shapes, tmp_path / "runs", "data=folder", f"data.path={folder}",
                      f"data.class_images={classes}", f"data.class_prompts=[{','.join(repr(p) for p in prompts)}]",
                      "data.num_class_images=4", "diffusion.sampler.num_steps=2", "data.batch_size=8",
                      "model.depth=1", "eval.prompts=[]", "eval.samples_per_caption=0", "logger.wandb=false",
                      "trainer.progress_bar=false", "data.val_shards=null", "data.instance_prompt='a shape'",
                      "trainer.max_steps=1")
    fit(cfg)
    written = [(classes / f"class-{index:05d}.txt").read_text() for index in range(4)]
    assert written == [prompts[0], prompts[1], prompts[2], prompts[0]]
