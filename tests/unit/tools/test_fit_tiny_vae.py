"""fit_tiny_vae end to end on a few steps: the layout option, the written files and the report."""

import json

from safetensors.torch import load_file

from sd3train.checkpoint.components import vae_from_config
from sd3train.config.schema import VAEConfig
from sd3train.tools.fit_tiny_vae import main


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
