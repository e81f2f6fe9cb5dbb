"""MM-DiT behaviour on tiny CPU configs: shapes, zero init, conditioning, positions, checkpointing."""

import copy

import pytest
import torch

from sd3train.config.schema import ModelConfig
from sd3train.model.embeddings import sincos_2d_table
from sd3train.model.mmdit import MMDiT
from tests.support.reference_models import perturb

TINY = dict(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=96, pooled_dim=48,
            pos_embed_max_size=16, sample_size=16)


def tiny_model(**overrides) -> MMDiT:
    torch.manual_seed(0)
    return MMDiT(**{**TINY, **overrides})


def inputs(batch=2, height=16, width=16, channels=4, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, channels, height, width, generator=generator),
        torch.rand(batch, generator=generator),
        torch.randn(batch, 7, 96, generator=generator),
        torch.randn(batch, 48, generator=generator),
    )


@pytest.mark.parametrize("height,width", [(16, 16), (12, 20), (2, 32)])
def test_output_shape_matches_latents_for_square_and_non_square(height, width):
    latents, t, context, pooled = inputs(height=height, width=width)
    out = tiny_model(out_channels=6)(latents, t, context, pooled)
    assert out.shape == (2, 6, height, width)


def test_fresh_model_outputs_exactly_zero():
    model = tiny_model(qk_norm="rms", dual_attention_layers=[0])
    out = model(*inputs(height=12, width=20))
    assert torch.count_nonzero(out) == 0


def test_perturbed_output_is_nonzero_and_depends_on_t_context_and_pooled():
    model = perturb(tiny_model(qk_norm="rms", dual_attention_layers=[0])).eval()
    latents, t, context, pooled = inputs()
    with torch.no_grad():
        base = model(latents, t, context, pooled)
        changed = {
            "t": model(latents, t * 0.5, context, pooled),
            "context": model(latents, t, context + 1.0, pooled),
            "pooled": model(latents, t, context, pooled + 1.0),
        }
    assert base.abs().mean() > 0.1
    for name, out in changed.items():
        assert (out - base).abs().mean() > 1e-3 * base.abs().mean(), name


def test_hidden_and_heads_default_to_64_depth_and_depth():
    model = MMDiT(depth=3, in_channels=4, context_dim=8, pooled_dim=8, pos_embed_max_size=4, sample_size=8)
    assert model.hidden_size == 192 and model.num_heads == 3
    assert model.joint_blocks[0].x_block.attn.head_dim == 64
    assert model.pos_embed.shape == (1, 16, 192)


def test_from_config_builds_the_configured_architecture():
    cfg = ModelConfig(depth=3, hidden_size=64, num_heads=2, in_channels=4, context_dim=96, pooled_dim=48,
                      pos_embed_max_size=16, sample_size=16, qk_norm="rms", dual_attention_layers=[0, 1])
    model = MMDiT.from_config(cfg)
    keys = model.state_dict().keys()
    assert model.out_channels == 4
    assert "joint_blocks.1.x_block.attn2.ln_q.weight" in keys
    assert "joint_blocks.2.x_block.attn2.qkv.weight" not in keys
    assert model.final_layer.linear.out_features == 2 * 2 * 4


def test_parameter_names_follow_the_official_layout():
    sd = tiny_model(depth=3, qk_norm="rms", dual_attention_layers=[0]).state_dict()
    hidden = 64
    assert sd["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (9 * hidden, hidden)
    assert sd["joint_blocks.1.x_block.adaLN_modulation.1.weight"].shape == (6 * hidden, hidden)
    assert sd["joint_blocks.2.context_block.adaLN_modulation.1.weight"].shape == (2 * hidden, hidden)
    assert sd["joint_blocks.2.context_block.attn.ln_k.weight"].shape == (32,)
    assert sd["x_embedder.proj.weight"].shape == (hidden, 4, 2, 2)
    assert sd["t_embedder.mlp.0.weight"].shape == (hidden, 256)
    assert sd["y_embedder.mlp.2.weight"].shape == (hidden, hidden)
    assert sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape == (4 * hidden, hidden)
    # The last text stream is pre-only: no output projection, no MLP.
    assert not any(k.startswith("joint_blocks.2.context_block.") and (".proj." in k or ".mlp." in k) for k in sd)
    no_norm = tiny_model(qkv_bias=False).state_dict()
    assert not any("ln_q" in k or "qkv.bias" in k for k in no_norm)


@pytest.mark.parametrize("kwargs", [dict(qk_norm="layer"), dict(dual_attention_layers=[2]), dict(num_heads=3)])
def test_invalid_architecture_raises(kwargs):
    with pytest.raises(ValueError):
        tiny_model(**kwargs)


def test_latent_size_not_divisible_by_patch_raises():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        tiny_model()(*inputs(height=16, width=15))


def test_pos_embed_for_a_full_grid_is_the_whole_table():
    model = tiny_model()
    assert torch.equal(model.cropped_pos_embed(16, 16), model.pos_embed)


def test_pos_embed_crop_is_centred():
    model = tiny_model()
    table = model.pos_embed.reshape(16, 16, 64)  # (rows, cols, D)
    crop = model.cropped_pos_embed(4, 10).reshape(4, 10, 64)
    assert torch.equal(crop, table[6:10, 3:13])  # top (16-4)//2 = 6, left (16-10)//2 = 3


def test_grid_larger_than_pos_embed_max_size_raises():
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        tiny_model()(*inputs(height=34, width=16))


def test_pos_embed_table_values():
    table = sincos_2d_table(8, 4, base_size=2)  # positions 0, 0.5, 1, 1.5; omegas 1, 0.01
    row, col = 3, 1  # token 3 * 4 + 1
    expected = torch.tensor([
        torch.sin(torch.tensor(0.5)), torch.sin(torch.tensor(0.005)), torch.cos(torch.tensor(0.5)), torch.cos(torch.tensor(0.005)),
        torch.sin(torch.tensor(1.5)), torch.sin(torch.tensor(0.015)), torch.cos(torch.tensor(1.5)), torch.cos(torch.tensor(0.015)),
    ])
    assert table.shape == (16, 8) and table.dtype == torch.float32
    torch.testing.assert_close(table[row * 4 + col], expected, rtol=0, atol=1e-7)


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    latents, t, context, pooled = inputs()
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    grads = []
    for checkpointing in (False, True):
        model = MMDiT.from_config(ModelConfig(**{**TINY, "depth": 3}, qk_norm="rms", dual_attention_layers=[1],
                                              activation_checkpointing=checkpointing))
        model = perturb(model).train()
        model(latents, t, context, pooled).square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    # One per joint block, only when the option is on; no RNG state to keep (no random op in a block).
    assert calls == [{"use_reentrant": False, "preserve_rng_state": False}] * 3
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-6, msg=name)
    assert grads[0]["joint_blocks.0.x_block.attn.qkv.weight"].abs().sum() > 0


def test_activation_checkpointing_is_off_in_eval_and_without_grad(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *args, **kwargs: calls.append(1))
    model = tiny_model(activation_checkpointing=True)
    with torch.no_grad():
        model.train()(*inputs())
    model.eval()(*inputs())
    assert calls == []


def test_skip_layers_leaves_the_stream_unchanged_by_that_block():
    model = perturb(tiny_model(depth=3)).eval()
    with torch.no_grad():
        full = model(*inputs())
        skipped = model(*inputs(), skip_layers=[1])
        # Skipping a block equals a model without it.
        del model.joint_blocks[1]
        removed = model(*inputs())
    assert (full - skipped).abs().max() > 1e-3
    torch.testing.assert_close(skipped, removed, rtol=0, atol=0)


def test_bf16_forward_is_close_to_fp32_on_the_same_rounded_weights_and_inputs():
    model = perturb(tiny_model(qk_norm="rms", dual_attention_layers=[0])).eval().to(torch.bfloat16)
    bf16_inputs = [x.bfloat16() for x in inputs()]
    with torch.no_grad():
        out = model(*bf16_inputs)
        reference = copy.deepcopy(model).float()(*[x.float() for x in bf16_inputs])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    relative = (out.float() - reference).norm() / reference.norm()
    assert relative < 2e-2  # measured 0.7%


def test_the_compiled_gelu_form_equals_torchs_tanh_gelu():
    from sd3train.model.mmdit import gelu_tanh

    x = torch.linspace(-8, 8, 4001, requires_grad=True)
    traced = torch.compile(gelu_tanh, backend="aot_eager", fullgraph=True)  # traces the sigmoid form
    ours, theirs = traced(x), torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=2e-6)  # far left tail: 1e-6 against 0
    assert torch.equal(gelu_tanh(x), theirs)  # eager: torch's own kernel
