"""The memory accounting: activation bytes counted on fake tensors against a hand count and against
what autograd saves, linear in the batch, per checkpointing mode; the resident components; the CLI."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sd3train.bench import memory
from sd3train.bench.activations import activation_profile, live_bytes
from sd3train.bench.zero_memory import parameter_count
from sd3train.config.schema import ModelConfig
from sd3train.diffusion.flow import interpolate, per_sample_mse, velocity_target
from sd3train.model.mmdit import MMDiT

# 8x8 latents -> 4x4 patches: N = 16 image tokens of width D = 64; T = 5 text tokens of width 32.
TINY = ModelConfig(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=32, pooled_dim=16,
                   pos_embed_max_size=16, sample_size=16)
LATENT, TEXT_TOKENS = 8, 5


def profile(mode: str, autocast_bf16: bool = False, config: ModelConfig = TINY):
    return activation_profile(memory.with_checkpointing(config, mode), LATENT, LATENT, TEXT_TOKENS, autocast_bf16)


def test_full_checkpointing_keeps_what_a_hand_count_of_the_fp32_step_finds():
    """Per sample, in fp32 elements: the step's inputs (latents, noise, t, context, pooled), the noisy
    latents the patch conv keeps, the embedders' saved inputs (the timestep frequencies, each SiLU's
    input and output), cond, the embedded context, each block's outputs (the checkpoints keep only
    block inputs), the final layer's LayerNorm input statistics, normed and modulated tokens, the
    (1 + scale) factor and its SiLU output, and the loss's difference; plus the 4-byte loss."""
    channels, depth, hidden, patches = 4, 2, 64, (LATENT // 2) ** 2
    latent = channels * LATENT * LATENT
    inputs = 2 * latent + 1 + TEXT_TOKENS * 32 + 16
    embedders = latent + 256 + 2 * hidden + 2 * hidden + hidden + TEXT_TOKENS * hidden + patches * hidden
    blocks = (depth - 1) * TEXT_TOKENS * hidden + depth * patches * hidden  # the last block has no text output
    final = hidden + 2 * patches + 2 * patches * hidden + hidden + latent
    measured = profile("full")
    assert measured.backward.per_sample == 4 * (inputs + embedders + blocks + final)
    assert measured.backward.fixed == 4


def _saved_by_autograd(config: ModelConfig, batch: int, autocast_bf16: bool) -> tuple[int, int]:
    """(bytes of the storages autograd saves in one training forward and loss, bytes of the step's
    own tensors alive but not saved: latents, noise, t, the loss, and under autocast the text
    inputs, whose bf16 copies are saved instead), counted with hooks."""
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with FakeTensorMode():
        model = MMDiT.from_config(config).train()
        parameters = {p.untyped_storage()._cdata for p in [*model.parameters(), *model.buffers()]}
        latents = torch.randn(batch, config.in_channels, LATENT, LATENT)
        noise, t = torch.randn_like(latents), torch.rand(batch)
        context, pooled = torch.randn(batch, TEXT_TOKENS, config.context_dim), torch.randn(batch, config.pooled_dim)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
            prediction = model(interpolate(latents, noise, t), t, context, pooled)
            loss = per_sample_mse(prediction.float(), velocity_target(latents, noise)).mean()
        unsaved = sum(tensor.untyped_storage().nbytes() for tensor in (latents, noise, t, context, pooled, loss)
                      if tensor.untyped_storage()._cdata not in saved)
    return sum(saved.values()), unsaved


@pytest.mark.parametrize("autocast_bf16", [False, True])
def test_without_checkpointing_what_stays_alive_is_what_autograd_saves(autocast_bf16):
    with FakeTensorMode():
        model = MMDiT.from_config(TINY).train()
        _, after = live_bytes(model, 3, LATENT, LATENT, TEXT_TOKENS, autocast_bf16)
    saved, unsaved = _saved_by_autograd(TINY, 3, autocast_bf16)
    assert sum(after.values()) == saved + unsaved


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_bytes_are_linear_in_the_batch(mode):
    measured = profile(mode, autocast_bf16=True)
    with FakeTensorMode():
        model = MMDiT.from_config(memory.with_checkpointing(TINY, mode)).train()
        inside, after = live_bytes(model, 5, LATENT, LATENT, TEXT_TOKENS, autocast_bf16=True)
    assert sum(after.values()) == measured.backward.at(5)
    assert sum(inside.values()) == measured.forward.at(5)
    assert [after.get(f"block {index}", 0) for index in range(2)] == [measured.backward.block_at(i, 5) for i in range(2)]


def test_modes_order_and_every_k_checkpoints_one_block_in_k():
    none, full, selective, every_2 = (profile(mode, autocast_bf16=True) for mode in ("none", "full", "selective", "every_k"))
    assert full.backward.per_sample < selective.backward.per_sample < none.backward.per_sample
    # k = 2 over 2 blocks: block 0 keeps everything, block 1 (the k-th) only its inputs.
    assert every_2.backward.block_per_sample == [none.backward.block_per_sample[0], full.backward.block_per_sample[1]]
    # bf16 weight copies: autograd keeps them without checkpointing; autocast's cache holds them all
    # until the forward ends, whatever the mode.
    assert none.backward.fixed > full.backward.fixed and none.forward.fixed == full.forward.fixed
    assert none.recompute(8, none) == 0 < full.recompute(8, none)
    assert full.peak(8, none) < selective.peak(8, none) < none.peak(8, none)


def test_resident_components_per_parameter():
    encoders = {"t5": 10, "vae_decoder": 3}
    online = memory.resident_components(100, 7, encoders, "bf16-mixed", cached=False)
    assert online == {"mmdit_weights": 428, "gradients": 400, "adamw_moments": 800, "ema_copy": 428, "frozen_encoders": 26}
    assert memory.resident_components(100, 7, encoders, "bf16-mixed", cached=True)["frozen_encoders"] == 6
    assert memory.resident_components(100, 7, encoders, "32-true", cached=False)["frozen_encoders"] == 52


def test_real_model_and_encoder_sizes():
    config = memory.model_config("sd3_medium")
    assert memory.mmdit_counts(config)[0] == parameter_count("sd3_medium")
    assert memory.encoder_parameters() == {"clip_l": 123_650_304, "clip_g": 694_659_840, "t5": 4_762_310_656,
                                           "vae_encoder": 34_274_208, "vae_decoder": 49_545_475}


def test_sd3_medium_at_512_fits_a_batch_of_16_with_selective_checkpointing_on_80_gb_from_the_cache():
    """The issue's target: depth 24, 512^2, bf16-mixed, DDP, data=cached."""
    config = memory.model_config("sd3_medium")
    assert config.depth == 24
    result = memory.account("sd3_medium", (512, 512), "bf16-mixed", 80.0, 4.0, encoders=memory.encoder_parameters(),
                            config=config, modes=("selective",))
    selective, none = result["activations"]["selective"], result["activations"]["none"]
    assert selective["largest_batch_cached"] >= selective["largest_batch_online"] >= 16
    assert none["largest_batch_online"] < 16  # the control: without checkpointing it does not fit


def test_cli_prints_json_and_the_largest_batch_is_the_last_that_fits(capsys, monkeypatch):
    monkeypatch.setattr(memory, "encoder_parameters", lambda: {"t5": 1_000, "vae_decoder": 100})
    assert memory.main(["--model", "tiny", "--resolution", "64", "--gpu-gb", "0.2", "--reserve-gb", "0.1",
                        "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["parameters"] == memory.mmdit_counts(memory.model_config("tiny"))[0]
    config = memory.model_config("tiny")
    assert list(result["activations"]) == ["none", "full", "selective", "every_k"]
    profiles = {mode: activation_profile(memory.with_checkpointing(config, mode), 8, 8, 154, True)
                for mode in ("none", "full")}
    budget = int((0.2 - 0.1) * 1e9) - sum(result["components"]["cached"].values())
    for mode in profiles:
        batch = result["activations"][mode]["largest_batch_cached"]
        assert batch > 0
        assert profiles[mode].peak(batch, profiles["none"]) <= budget < profiles[mode].peak(batch + 1, profiles["none"])


def test_unknown_model_exits_2_naming_the_shipped_ones(capsys):
    assert memory.main(["--model", "nope"]) == 2
    assert "no nope.yaml in conf/model" in capsys.readouterr().err
