"""CLIP score: the per-sample cosine against one computed here from the model's encoders, the
per-sample clamp, open_clip's own preprocessing, and loading from a local folder only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sd3train.eval.clip_score import clip_score, load_clip
from tests.support.eval_models import write_tiny_openclip

CAPTIONS = ["a red circle on a blue background", "a dog", "two cats on a sofa", "x", "a green triangle"]


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    return write_tiny_openclip(tmp_path_factory.mktemp("openclip") / "tiny-clip")


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return load_clip(clip_folder)


def _images() -> list[np.ndarray]:
    """Noise at several sizes, non-square ones included (the crop matters)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in
            [(32, 32, 3), (48, 40, 3), (40, 64, 3), (100, 37, 3), (32, 32, 3)]]


def _pixels_by_hand(images, size, mean, std) -> torch.Tensor:
    """open_clip's eval transform on tensors: bicubic shorter side to `size`, centre crop, normalise."""
    from torchvision.transforms import v2

    transform = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(size), v2.Lambda(lambda x: x.clamp(0, 1)), v2.Normalize(mean, std)])
    return torch.stack([transform(torch.from_numpy(image).permute(2, 0, 1).float() / 255) for image in images])


def test_score_is_100_times_the_cosine_of_the_encoders_outputs(scorer):
    import open_clip

    images = _images()
    pixels = _pixels_by_hand(images, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        image_embeddings = scorer.model.encode_image(pixels).double()
        text_embeddings = scorer.model.encode_text(scorer.tokenizer(CAPTIONS)).double()
    expected = 100 * F.cosine_similarity(image_embeddings, text_embeddings, dim=-1)
    scores = scorer.score(images, CAPTIONS)  # one batch, as above
    assert scores.dtype == torch.float64 and scores.shape == (5,)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    # Other batch sizes change only float32 rounding inside the encoders (about 1e-8 in the cosine).
    torch.testing.assert_close(scorer.score(images, CAPTIONS, batch_size=2), scores, rtol=0, atol=1e-4)
    assert scores.abs().max() > 1  # not a degenerate model: the scores differ from 0


def test_preprocessing_matches_open_clips_pil_transform_within_a_grey_level(clip_folder, scorer):
    import open_clip
    from PIL import Image

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_folder}")
    rows, columns = np.mgrid[0:70, 0:45]  # smooth, so only rounding differs, not the resampling of noise
    image = np.stack([columns * 255 // 45, rows * 255 // 70, (rows + columns) * 255 // 115], -1).astype(np.uint8)
    ours = scorer.pixels([image])[0]
    theirs = preprocess(Image.fromarray(image))
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert (ours - theirs).abs().max() < 1.5 / 255 / min(open_clip.OPENAI_DATASET_STD)


class _FixedScores:
    def score(self, images, captions, batch_size=32):
        return torch.tensor([30.0, -10.0, 20.0], dtype=torch.float64)


def test_clip_score_clamps_each_sample_before_averaging(scorer):
    # Hessel et al.'s CLIP-S: (30 + 0 + 20) / 3; torchmetrics' clamp of the mean would give 40 / 3.
    assert clip_score(_FixedScores(), [np.zeros((4, 4, 3), np.uint8)] * 3, ["a"] * 3) == pytest.approx(50 / 3)
    images = _images()
    scores = scorer.score(images, CAPTIONS)
    assert (scores < 0).any() and (scores > 0).any()  # the random model gives both signs here
    assert clip_score(scorer, images, CAPTIONS) == pytest.approx(float(scores.clamp(min=0).mean()), abs=1e-9)


def test_score_refuses_mismatched_or_bad_inputs(scorer):
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer.score(_images()[:2], ["a"])
    with pytest.raises(ValueError, match="uint8"):
        scorer.score([np.zeros((32, 32, 3), np.float32)], ["a"])


def test_load_clip_names_a_missing_folder_config_or_weights(tmp_path, clip_folder):
    with pytest.raises(FileNotFoundError, match="CLIP model folder not found: .*nowhere"):
        load_clip(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no open_clip_config.json"):
        load_clip(tmp_path / "empty")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "open_clip_config.json").write_text((clip_folder / "open_clip_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no-weights has no weights"):
        load_clip(tmp_path / "no-weights")
