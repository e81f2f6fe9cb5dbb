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


def test_new_model_options_reach_the_model_config():
    args = train_step.parse_args([*TINY_ARGS, "--activation-checkpointing", "selective", "--attention-backend", "math",
                                  "--compile"])
    config = train_step.model_config(args)
    assert (config.activation_checkpointing, config.attention_backend, config.compile) == ("selective", "math", True)
    plain = train_step.model_config(train_step.parse_args(TINY_ARGS))
    assert (plain.activation_checkpointing, plain.attention_backend, plain.compile) == ("none", "auto", False)


def test_variants_report_their_ratio_to_diffusers_and_peak_memory(monkeypatch, capsys, tmp_path):
    """Subprocess results made up: diffusers 30 ms/step, bare 20, step 24, and an error."""
    made_up = {"diffusers": [0.030, 0.031, 0.029], "bare": [0.020, 0.021, 0.019], "step": [0.024, 0.025, 0.023]}

    def fake_subprocess(name, args):
        if name == "interleaved":
            return {"error": "exit status 1: boom"}
        return {"seconds": made_up[name], "peak_memory_bytes": 2e9, "peak_memory_kind": "process max RSS"}

    monkeypatch.setattr(train_step, "run_in_subprocess", fake_subprocess)
    out = tmp_path / "result.json"
    result = train_step.main([*TINY_ARGS, "--variants", "interleaved", "diffusers", "bare", "step", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert "each in its own process" in capsys.readouterr().out  # the table, with the JSON in OUT
    variants = result["variants"]
    assert variants["bare"]["median_ms"] == pytest.approx(20.0)
    assert variants["bare"]["ratio_to_diffusers"] == pytest.approx(1.5)
    assert variants["step"]["ratio_to_diffusers"] == pytest.approx(1.25)
    assert variants["diffusers"]["ratio_to_diffusers"] == pytest.approx(1.0)
    assert variants["step"]["achieved_tflops"] == pytest.approx(result["training_flops_per_step"] / 0.024 / 1e12)
    assert variants["step"]["peak_memory_bytes"] == 2e9
    assert "ours" not in result and "interleaved subprocess failed" in result["interleaved_error"]
    train_step.main([*TINY_ARGS, "--variants", "diffusers", "bare", "step"])
    table = capsys.readouterr().out
    assert "1.500" in table and "1.250" in table


def test_subprocess_arguments_drop_the_parents_own_options():
    argv = ["--model", "tiny", "--variants", "bare", "step", "--json", "out.json", "--activation-checkpointing",
            "--batch", "2"]
    assert train_step._without_options(argv, ("--variants", "--json")) == [
        "--model", "tiny", "--activation-checkpointing", "--batch", "2"]


def test_bare_variant_runs_in_its_own_process():
    result = train_step.main([*TINY_ARGS, "--warmup", "0", "--steps", "2", "--variants", "bare"])
    row = result["variants"]["bare"]
    assert row["median_ms"] > 0 and row["peak_memory_bytes"] > 0 and row["ratio_to_diffusers"] is None
    assert row["peak_memory_kind"] == "process max RSS"


@pytest.mark.parametrize("worker", ["bare", "diffusers", "step"])
def test_each_worker_times_its_steps_after_the_warm_up(worker):
    args = train_step.parse_args([*TINY_ARGS, "--warmup", "1", "--steps", "3", "--variants", worker,
                                  "--worker", worker, "--activation-checkpointing", "full"])
    outcome = train_step.run_worker(args)
    assert len(outcome["seconds"]) == 3 and all(seconds > 0 for seconds in outcome["seconds"])
    assert outcome["peak_memory_bytes"] > 0


def test_step_variant_config_is_our_model_on_cache_batches_of_the_benchmarks_shapes(tmp_path):
    from sd3train.bench import step_variant
    from sd3train.data.cache_format import TEXT_OUTPUTS
    from sd3train.model.text_encoders import TextConditioner

    args = train_step.parse_args([*TINY_ARGS, "--activation-checkpointing", "selective", "--variants", "step",
                                  "--warmup", "2", "--steps", "5", "--peak-tflops", "3"])
    config = train_step.model_config(args)
    cfg = step_variant.step_config(config, args, tmp_path)
    assert cfg.model == config
    assert cfg.data.cached and (cfg.data.batch_size, cfg.trainer.max_steps, cfg.trainer.peak_tflops) == (2, 7, 3.0)
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.logger.wandb) == ("cpu", "32-true", False)
    batch = step_variant.cached_batch(cfg, args)
    assert batch["latent_mean"].shape == batch["latent_std"].shape == (2, config.in_channels, 4, 4)
    context, pooled = TextConditioner.assemble({name: batch[name].float() for name in TEXT_OUTPUTS})
    assert context.shape == (2, 4, config.context_dim) and pooled.shape == (2, config.pooled_dim)
