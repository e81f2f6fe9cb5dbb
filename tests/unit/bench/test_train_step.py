"""The training-step benchmark runs both models on a tiny CPU config and reports like with like."""

import json
import sys

import pytest
import torch

from sd3train.bench import train_step
from sd3train.config.typed import ConfigError
from tests.support.reference_models import perturb, relative_error

diffusers = pytest.importorskip("diffusers")

# conf/model/tiny.yaml cut down to one narrow block: 32x32 pixels -> 4x4 latents -> 2x2 patches.
TINY_ARGS = ["--model", "tiny", "--depth", "1", "--hidden", "32", "--heads", "2", "--resolution", "32",
             "--batch", "2", "--text-tokens", "4", "--device", "cpu", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    """--threads sets torch's process-wide thread count; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_main_times_both_models_and_reports_their_ratio(capsys):
    result = train_step.main([*TINY_ARGS, "--warmup", "1", "--steps", "2", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    for name in ("ours", "diffusers"):
        assert result[name]["median_ms"] > 0
        assert result[name]["samples_per_s"] == pytest.approx(2 / (result[name]["median_ms"] / 1e3))
        assert result[name]["mfu"] is None  # CPU: no peak unless --peak-tflops
    assert result["ratio_diffusers_over_ours"] == pytest.approx(
        result["diffusers"]["median_ms"] / result["ours"]["median_ms"])
    assert result["latent"] == [4, 4] and result["text_tokens"] == 4
    assert result["training_flops_per_step"] > 0


def test_main_prints_a_table_and_mfu_with_a_given_peak(capsys):
    result = train_step.main([*TINY_ARGS, "--dtype", "bf16", "--warmup", "0", "--steps", "1",
                              "--peak-tflops", "0.5"])
    out = capsys.readouterr().out
    assert "ratio diffusers / ours:" in out and "diffusers" in out
    assert result["ours"]["mfu"] == pytest.approx(result["ours"]["achieved_tflops"] / 0.5)


def test_reference_holds_our_weights_and_computes_our_velocity():
    args = train_step.parse_args([*TINY_ARGS, "--qk-norm", "rms", "--depth", "2", "--dual-attention-layers", "0"])
    config = train_step.model_config(args)
    ours = perturb(train_step.MMDiT.from_config(config).eval(), std=0.05)
    reference = train_step.build_reference(config, ours).eval()
    batch = train_step.make_batch(config, args, torch.device("cpu"))
    velocities = train_step.velocity_functions(ours, reference)
    with torch.no_grad():
        out = velocities["ours"](batch["latents"], batch["t"], batch["context"], batch["pooled"])
        expected = velocities["diffusers"](batch["latents"], batch["t"], batch["context"], batch["pooled"])
    assert expected.abs().mean() > 0.01
    assert relative_error(out, expected) < 1e-5


def test_timing_rounds_alternate_which_model_goes_first():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    seconds = train_step.time_interleaved(steps, warmup=1, timed=5, round_steps=2, synchronize=lambda: None)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "b"]
    assert [len(seconds["a"]), len(seconds["b"])] == [5, 5]


def test_command_line_overrides_reach_the_model_config():
    args = train_step.parse_args(["--model", "sd35_medium", "--depth", "4", "--qk-norm", "none",
                                  "--dual-attention-layers", "1", "--activation-checkpointing"])
    config = train_step.model_config(args)
    assert (config.depth, config.qk_norm, config.dual_attention_layers) == (4, None, [1])
    assert config.activation_checkpointing and config.pos_embed_max_size == 384


def test_unknown_model_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="no nope.yaml in conf/model.*tiny"):
        train_step.model_config(train_step.parse_args(["--model", "nope"]))


@pytest.mark.parametrize("text,expected", [("512", (512, 512)), ("256x768", (256, 768))])
def test_resolution_is_one_side_or_height_by_width(text, expected):
    assert train_step.parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["500", "512x", "0", "a"])
def test_resolution_not_a_multiple_of_eight_is_refused(text):
    with pytest.raises(ValueError, match="--resolution"):
        train_step.parse_resolution(text)


def test_missing_diffusers_says_to_install_the_test_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        train_step.main([*TINY_ARGS, "--steps", "1"])
    assert exit_info.value.code == 2
    assert "pip install -e '.[test]'" in capsys.readouterr().err
