"""The SSCD model: output shape and norm, GeM against its formula, the authors' weight layouts, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd3train.curation.sscd import (
    GEM_EPS,
    SSCD,
    GeMPool,
    SSCDWeightsError,
    load_sscd,
    preprocess,
    resized_size,
    to_authors_layout,
)


@pytest.fixture(scope="module")
def model() -> SSCD:
    torch.manual_seed(0)
    return SSCD().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W)


@pytest.fixture(scope="module")
def expected(model, images) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


@pytest.fixture(scope="module")
def authors_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "sscd_disc_mixup.torchvision.pt"
    torch.save(to_authors_layout(model.state_dict()), path)
    return path


def test_descriptors_are_512_wide_and_unit_norm(expected):
    assert expected.shape == (2, 512) and expected.dtype == torch.float32
    torch.testing.assert_close(expected.norm(dim=1), torch.ones(2))
    assert not torch.allclose(expected[0], expected[1])


def test_gem_pooling_is_the_generalised_mean_of_its_formula():
    features = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(2))  # some negative: clamped
    pooled = GeMPool(p=3.0)(features)
    values = features.double().numpy().reshape(3, 5, -1)
    reference = np.mean(np.maximum(values, GEM_EPS) ** 3.0, axis=2) ** (1 / 3.0)
    assert pooled.shape == (3, 5)
    np.testing.assert_allclose(pooled.numpy(), reference, rtol=1e-5)
    positive = features.abs() + 0.1
    torch.testing.assert_close(GeMPool(p=1.0)(positive), positive.mean(dim=(2, 3)))  # p = 1: average pooling
    assert torch.all(GeMPool(p=3.0)(positive) <= positive.amax(dim=(2, 3)))


def test_the_authors_torchvision_layout_loads_and_gives_the_same_descriptors(model, authors_file, images, expected):
    state = torch.load(authors_file, weights_only=True)
    assert "backbone.layer1.0.conv1.weight" in state and tuple(state["backbone.fc.weight"].shape) == (512, 2048)
    assert not any(key.startswith("projection.") or key.startswith("pool.") for key in state)
    loaded = load_sscd(authors_file)
    assert isinstance(loaded, SSCD) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected)


def test_a_torchscript_export_loads_and_gives_the_same_descriptors(model, images, expected, tmp_path):
    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    torch.jit.script(model).save(str(path))
    loaded = load_sscd(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected)


@pytest.mark.parametrize("edit, message", [
    ("missing", "missing key 'backbone.layer3.2.bn2.running_var'"),
    ("unexpected", "unexpected key 'backbone.head.weight'"),
    ("shape", "key 'backbone.fc.weight' has shape (256, 2048), the model needs (512, 2048)"),
])
def test_a_wrong_state_dict_fails_naming_the_key_and_the_file(authors_file, tmp_path, edit, message):
    state = torch.load(authors_file, weights_only=True)
    if edit == "missing":
        del state["backbone.layer3.2.bn2.running_var"]
    elif edit == "unexpected":
        state["backbone.head.weight"] = torch.zeros(3)
    else:
        state["backbone.fc.weight"] = torch.zeros(256, 2048)
    path = tmp_path / f"{edit}.pt"
    torch.save(state, path)
    with pytest.raises(SSCDWeightsError) as caught:
        load_sscd(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_batchnorm_counters_may_be_absent(authors_file, tmp_path):
    state = {key: value for key, value in torch.load(authors_file, weights_only=True).items()
             if not key.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "no-counters.pt")
    assert isinstance(load_sscd(tmp_path / "no-counters.pt"), SSCD)


def test_a_file_that_is_no_model_fails_naming_it(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not weights")
    with pytest.raises(SSCDWeightsError, match="not a TorchScript file or a state dict") as caught:
        load_sscd(path)
    assert str(path) in str(caught.value)


def test_preprocessing_is_the_authors_resize_to_tensor_normalize():
    from torchvision import transforms

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, size=(451, 300, 3), dtype=np.uint8))  # W 300, H 451
    authors = transforms.Compose([transforms.Resize(288), transforms.ToTensor(),
                                  transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    ours = preprocess(image, "small288")
    assert ours.shape == (3, 432, 288) and resized_size(300, 451, "small288") == (288, 432)  # int(), as torchvision
    np.testing.assert_allclose(ours, authors(image).numpy(), atol=1e-5)
    square = preprocess(image, "skew320")
    assert square.shape == (3, 320, 320)


def test_a_large_jpeg_gets_the_authors_preprocessing_of_its_full_decode(model):
    """No libjpeg scaled decode (draft) for SSCD: a 1200x900 JPEG is prepared exactly as torchvision
    prepares its full-size decode, as the same picture stored losslessly would be."""
    import io

    from torchvision import transforms

    from sd3train.curation.dedup_embed import Embedder
    from sd3train.curation.descriptors import SSCDDescriptor
    from sd3train.data.tar_reader import RawSample

    rng = np.random.default_rng(5)
    smooth = Image.fromarray(rng.integers(0, 256, size=(9, 12, 3), dtype=np.uint8)).resize((1200, 900),
                                                                                          Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    smooth.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    descriptor = SSCDDescriptor(None, "cpu", model=model)
    prepared = Embedder(descriptor, batch_size=1)._prepare(RawSample("k", "shard.tar", {"jpg": data}))
    authors = transforms.Compose([transforms.Resize(288), transforms.ToTensor(),
                                  transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    full = Image.open(io.BytesIO(data)).convert("RGB")
    assert prepared.shape == (3, 288, 384)
    np.testing.assert_allclose(prepared, authors(full).numpy(), atol=1e-5)


def test_the_embed_stage_with_sscd_stores_the_models_descriptors(model, authors_file, tmp_path):
    """Four images of three aspect ratios: batched per shape, stored in shard order."""
    import io

    from sd3train.curation.dedup import main
    from sd3train.curation.dedup_embed import read_embeddings
    from sd3train.data.tar_writer import EncodedImage, ShardSample, write_shards

    rng = np.random.default_rng(4)
    pictures = [Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
                for width, height in ((64, 48), (48, 64), (64, 48), (50, 50))]
    samples = []
    for index, picture in enumerate(pictures):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        samples.append(ShardSample(f"k{index}", EncodedImage(buffer.getvalue(), "png"), "caption"))
    write_shards(samples, tmp_path / "shards", prefix="sscd", samples_per_shard=4)
    out = tmp_path / "out"
    assert main(["embed", "--out", str(out), "--shards", str(tmp_path / "shards" / "sscd-000000.tar"),
                 "--descriptor", "sscd", "--weights", str(authors_file), "--device", "cpu", "--batch-size", "2"]) == 0
    keys, descriptors, name = read_embeddings(out / "embeddings" / "sscd-000000.npz")
    assert keys == ["k0", "k1", "k2", "k3"] and descriptors.shape == (4, 512)
    assert name.startswith("sscd(weights=") and name.endswith(", small288)")
    with torch.no_grad():
        one_by_one = torch.cat([model(torch.from_numpy(preprocess(picture))[None]) for picture in pictures])
    np.testing.assert_allclose(descriptors, one_by_one.numpy(), atol=1e-5)


def test_the_shape_batcher_embeds_per_shape_and_returns_rows_in_order():
    from sd3train.curation.dedup_embed import PENDING_BATCHES, _ShapeBatcher

    batches = []

    def embed(batch: np.ndarray) -> np.ndarray:
        batches.append((batch.shape, batch[:, 0, 0].astype(int).tolist()))
        return batch[:, 0, :1]

    batcher = _ShapeBatcher(batch_size=2, embed=embed)
    shapes = [(1, 3), (1, 4), (1, 3), (1, 5), (1, 4), (1, 4)] + [(1, 6 + index) for index in range(2 * PENDING_BATCHES)]
    for index, shape in enumerate(shapes):
        batcher.add(index, np.full(shape, index, dtype=np.float32))
    rows = batcher.finish(len(shapes))
    assert rows[:, 0].astype(int).tolist() == list(range(len(shapes)))
    assert batches[:2] == [((2, 1, 3), [0, 2]), ((2, 1, 4), [1, 4])]
    assert all(len(set(indices)) == len(indices) for _, indices in batches)
    assert sorted(index for _, indices in batches for index in indices) == list(range(len(shapes)))


class _PoolWithoutParameters(torch.nn.Module):
    """GeM with p = 3 written as an average pool over the whole map (a formulation of our own, not
    sscd.py's): it sits where the authors put theirs, in place of torchvision's avgpool, and has no
    parameters, so it adds no key."""

    def forward(self, x):
        cubed = x.clamp(min=1e-6).pow(3.0)
        return torch.nn.functional.avg_pool2d(cubed, kernel_size=cubed.shape[-2:]).pow(1.0 / 3.0).flatten(1)


class _ReferenceTree(torch.nn.Module):
    """The module tree of the authors' Model("TV_RESNET50", 512, 3.0) (facebookresearch/sscd-copy-
    detection, sscd/models/model.py): a torchvision resnet50 under `backbone` with a 512-wide fc
    and GeM in place of its avgpool, then a parameter-free L2 normalisation. Built from that
    description, not from sd3train's model, so its state dict keys are the authors'."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        self.backbone = resnet50(num_classes=512, zero_init_residual=True)
        self.backbone.avgpool = _PoolWithoutParameters()

    def forward(self, x):
        return torch.nn.functional.normalize(self.backbone(x))


def test_a_state_dict_of_the_authors_model_class_loads_and_gives_their_descriptors(tmp_path, images):
    """The layout is checked against the authors' module tree, not against to_authors_layout."""
    torch.manual_seed(5)
    authors = _ReferenceTree().eval()
    with torch.no_grad():  # random BatchNorm statistics and gains: zero_init_residual would hide the blocks
        for name, tensor in authors.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if name.endswith(("running_var", "bn3.weight"))
                             else tensor + 0.05 * torch.randn_like(tensor))
    path = tmp_path / "sscd_disc_mixup.torchvision.pt"
    torch.save(authors.state_dict(), path)
    loaded = load_sscd(path)
    with torch.no_grad():
        theirs, ours = authors(images), loaded(images)
    assert ours.shape == (2, 512)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_torchscript_archive_that_does_not_load_fails_naming_the_file(tmp_path):
    import zipfile

    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    with zipfile.ZipFile(path, "w") as archive:  # what a download cut short, or another zip, can look like
        archive.writestr("sscd/constants.pkl", b"not a pickle")
    with pytest.raises(SSCDWeightsError) as caught:
        load_sscd(path)
    assert str(path) in str(caught.value) and "TorchScript" in str(caught.value)


def test_a_classy_vision_file_is_refused_pointing_to_the_torchvision_one(authors_file, tmp_path):
    state = torch.load(authors_file, weights_only=True)
    classy = {key.replace("backbone.", "backbone.trunk.", 1): value for key, value in state.items()
              if not key.startswith("backbone.fc.")}
    classy["embeddings.1.weight"], classy["embeddings.1.bias"] = state["backbone.fc.weight"], state["backbone.fc.bias"]
    path = tmp_path / "sscd_disc_mixup.classy.pt"
    torch.save(classy, path)
    with pytest.raises(SSCDWeightsError) as caught:
        load_sscd(path)
    assert str(path) in str(caught.value) and ".torchvision.pt" in str(caught.value), str(caught.value)
