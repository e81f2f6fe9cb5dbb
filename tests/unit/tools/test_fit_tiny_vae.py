"""fit_tiny_vae end to end on a few steps: the layout option, the written files and the report, in both worlds."""

import json

from safetensors.torch import load_file

from sd3train.checkpoint.components import vae_from_config
from sd3train.config.schema import VAEConfig
from sd3train.data.scenes import CATEGORIES, make_scene_sample
from sd3train.data.shapes import make_sample
from sd3train.tools.fit_tiny_vae import WORLD_DEFAULTS, main, scene_images


def test_block_out_channels_sets_the_layout_and_the_report_scores_shape_and_colour(tmp_path):
    conf = tmp_path / "tiny4.yaml"
    report = main(["--out", str(tmp_path / "vae"), "--conf", str(conf), "--steps", "4", "--batch-size", "2",
                   "--block-out-channels", "8", "16", "16", "--stats-images", "8", "--eval-images", "4"])
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["block_out_channels"] == [8, 16, 16] == report["config"]["block_out_channels"]
    vae = vae_from_config(VAEConfig(**config))
    assert vae.downsample_factor == 4  # three levels: two halvings
    assert set(load_file(str(tmp_path / "vae" / "vae.safetensors"))) == set(vae.state_dict())
    for quality in (report["eval"], report["eval_sampled_latents"]):
        assert 0 <= quality["shape_hits"] <= quality["num_images"] == 4
        assert 0 <= quality["colour_hits"] <= 4
    assert "block_out_channels: [8, 16, 16]" in conf.read_text()
    assert f"the shape {report['eval']['shape_hits']}/4" in conf.read_text()


def test_compose_world_reports_the_caption_share_kept_per_category(tmp_path):
    conf = tmp_path / "compose.yaml"
    report = main(["--world", "compose", "--out", str(tmp_path / "vae"), "--conf", str(conf), "--steps", "2",
                   "--batch-size", "2", "--block-out-channels", "8", "16", "16", "--stats-images", "4",
                   "--eval-images", "2"])
    assert report["world"] == "compose" and report["shapes_share"] == WORLD_DEFAULTS["compose"]["shapes_share"]
    for quality in (report["eval"], report["eval_sampled_latents"]):
        assert list(quality["satisfied"]) == list(CATEGORIES)
        assert all(share in (0.0, 0.5, 1.0) for share in quality["satisfied"].values())  # 2 scenes each
        assert quality["worst"] == min(quality["satisfied"].values())
        assert quality["images_per_category"] == 2
    text = conf.read_text()
    assert "compose scenes" in text and "--world compose" in text and "block_out_channels: [8, 16, 16]" in text
    assert f"position {report['eval']['satisfied']['position']:.3f}" in text


def test_scene_images_mix_in_the_asked_share_of_one_object_images():
    images, captions = scene_images(seed=3, start=0, count=200, size=16, shapes_share=0.25)
    assert images.shape == (200, 3, 16, 16) and -1.0 <= images.min() <= images.max() <= 1.0
    one_object = {index for index in range(200) if captions[index] == make_sample(3, index, 16)[1]}
    scenes = {index for index in range(200) if captions[index] == make_scene_sample(3, index, 16)[1]}
    assert one_object | scenes == set(range(200))
    assert 30 <= len(one_object - scenes) <= 70  # 50 expected
    _, again = scene_images(seed=3, start=100, count=100, size=16, shapes_share=0.25)
    assert again == captions[100:]  # a pure function of (seed, index)
    _, scenes_only = scene_images(seed=3, start=0, count=50, size=16)
    assert scenes_only == [make_scene_sample(3, index, 16)[1] for index in range(50)]
