"""SD3 text conditioning: layout, per-encoder dropout, seeded init, frozen encoders, configs."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd3train.checkpoint.components import text_conditioner_from_config
from sd3train.model.text_encoders import TextConditioner, sample_keep_mask
from tests.support.reference_models import reference_sd3_layout, text_config

REPO_ROOT = Path(__file__).resolve().parents[3]
PROMPTS = ["a red circle on a white background", "A photo of 3 dogs!", ""]
# Tiny sizes (conf/text/tiny.yaml): CLIP-L 32 wide, bigG 64, T5 128; 16 tokens each.
LC, LT, DL, DG, DT, PL, PG = 16, 16, 32, 64, 128, 32, 64


@pytest.fixture(scope="module")
def conditioner() -> TextConditioner:
    return text_conditioner_from_config(text_config("tiny"))


@pytest.fixture(scope="module")
def outputs(conditioner):
    return conditioner.encode_per_encoder(PROMPTS)


def test_context_and_pooled_shapes(conditioner, outputs):
    assert {key: tuple(value.shape) for key, value in outputs.items()} == {
        "clip_l_hidden": (3, LC, DL), "clip_l_pooled": (3, PL),
        "clip_g_hidden": (3, LC, DG), "clip_g_pooled": (3, PG),
        "t5_hidden": (3, LT, DT),
    }
    context, pooled = conditioner.encode(PROMPTS)
    assert context.shape == (3, LC + LT, DT) and pooled.shape == (3, PL + PG)
    assert (conditioner.context_length, conditioner.context_dim, conditioner.pooled_dim) == (LC + LT, DT, PL + PG)


def test_context_matches_reference_layout(conditioner):
    context, pooled = conditioner.encode(PROMPTS)
    reference_context, reference_pooled = reference_sd3_layout(
        conditioner.clip_l, conditioner.clip_g, conditioner.t5, conditioner.tokenize(PROMPTS))
    assert torch.equal(context, reference_context)
    assert torch.equal(pooled, reference_pooled)
    assert torch.all(context[:, :LC, DL + DG :] == 0)  # CLIP part zero-padded up to the T5 width
    assert context[:, :LC, : DL + DG].abs().min() > 0


def test_clip_hidden_is_penultimate_layer_and_pooled_is_projected_end_token(conditioner, outputs):
    ids = conditioner.tokenize(PROMPTS)
    for name in ("clip_l", "clip_g"):
        model = getattr(conditioner, name)
        with torch.no_grad():
            full = model(ids[name], output_hidden_states=True)
            text = model.text_model
            assert len(full.hidden_states) == 2 + 1  # embeddings + 2 layers
            assert torch.equal(text.final_layer_norm(full.hidden_states[-1]), full.last_hidden_state)
            end = (ids[name] == 49407).int().argmax(dim=-1)  # first end token, whatever the padding
            pooled = model.text_projection(full.last_hidden_state[torch.arange(3), end])
        assert torch.equal(outputs[f"{name}_hidden"], full.hidden_states[1])  # after layer 1 of 2
        torch.testing.assert_close(outputs[f"{name}_pooled"], pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dropped", ["clip_l", "clip_g", "t5", "all"])
def test_dropout_zeroes_exactly_the_dropped_encoder(outputs, dropped):
    keep = torch.ones(3, 3, dtype=torch.bool)
    column = {"clip_l": [0], "clip_g": [1], "t5": [2], "all": [0, 1, 2]}[dropped]
    keep[1, column] = False  # drop for sample 1 only
    full_context, full_pooled = TextConditioner.assemble(outputs)
    context, pooled = TextConditioner.assemble(outputs, keep)
    slices = {  # (context slice, pooled slice) of each encoder
        "clip_l": ((slice(0, LC), slice(0, DL)), slice(0, PL)),
        "clip_g": ((slice(0, LC), slice(DL, DL + DG)), slice(PL, PL + PG)),
        "t5": ((slice(LC, LC + LT), slice(0, DT)), slice(0, 0)),
    }
    expected_context, expected_pooled = full_context.clone(), full_pooled.clone()
    for name in (["clip_l", "clip_g", "t5"] if dropped == "all" else [dropped]):
        (rows, channels), pooled_slice = slices[name]
        assert full_context[1, rows, channels].abs().sum() > 0  # there was something to drop
        expected_context[1, rows, channels] = 0
        expected_pooled[1, pooled_slice] = 0
    assert torch.equal(context, expected_context)  # bit-identical everywhere else
    assert torch.equal(pooled, expected_pooled)
    if dropped == "all":
        assert torch.all(context[1] == 0) and torch.all(pooled[1] == 0)


def test_dropout_mask_frequency():
    keep = sample_keep_mask(200_000, (0.464, 0.464, 0.464), torch.Generator().manual_seed(0))
    dropped = ~keep
    assert dropped.shape == (200_000, 3) and dropped.dtype == torch.bool
    for rate in dropped.float().mean(dim=0).tolist():
        assert abs(rate - 0.464) < 0.005
    # independent draws: about 10% of samples lose every encoder (0.464 ** 3 = 0.0999)
    assert abs(dropped.all(dim=1).float().mean().item() - 0.464**3) < 0.003


def test_dropout_uses_each_encoders_own_probability(conditioner):
    keep = sample_keep_mask(100_000, (0.0, 1.0, 0.25), torch.Generator().manual_seed(1))
    assert keep[:, 0].all() and not keep[:, 1].any()
    assert abs(keep[:, 2].float().mean().item() - 0.75) < 0.01


def test_dropout_is_deterministic_for_a_generator_seed(conditioner):
    masks = [conditioner.dropout_keep_mask(64, torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    global_state = torch.random.get_rng_state()
    first = conditioner(PROMPTS, generator=torch.Generator().manual_seed(7))
    second = conditioner(PROMPTS, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(torch.random.get_rng_state(), global_state)  # only the given generator is used


def test_forward_without_generator_is_encode(conditioner):
    context, pooled = conditioner(PROMPTS)
    expected_context, expected_pooled = conditioner.encode(PROMPTS)
    assert torch.equal(context, expected_context) and torch.equal(pooled, expected_pooled)


def test_assemble_rejects_clip_wider_than_t5(outputs):
    narrow = dict(outputs, t5_hidden=outputs["t5_hidden"][..., :64])  # 32 + 64 > 64
    with pytest.raises(ValueError, match="96 exceeds the T5 width 64"):
        TextConditioner.assemble(narrow)


def test_same_init_seed_gives_identical_weights(conditioner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative tokenizer paths resolve against the repo root, not the cwd
    global_state = torch.random.get_rng_state()
    again = text_conditioner_from_config(text_config("tiny"))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    reference = conditioner.state_dict()
    assert reference.keys() == again.state_dict().keys()
    assert all(torch.equal(reference[key], value) for key, value in again.state_dict().items())
    other = text_conditioner_from_config(text_config("tiny", init_seed=1)).state_dict()
    key = "clip_l.text_model.embeddings.token_embedding.weight"
    assert not torch.equal(reference[key], other[key])


def test_encoders_are_frozen_and_stay_in_eval(conditioner):
    assert not any(parameter.requires_grad for parameter in conditioner.parameters())
    parent = torch.nn.ModuleDict({"text": conditioner})
    parent.train()
    assert conditioner.training
    assert not any(encoder.training for encoder in conditioner.encoders())
    assert not any(module.training for module in conditioner.t5.modules())
    context, pooled = conditioner.encode(PROMPTS[:1])
    assert not context.requires_grad and not pooled.requires_grad
    parent.eval()


def test_weights_folder_in_diffusers_layout(conditioner, tmp_path):
    for model, subfolder in ((conditioner.clip_l, "text_encoder"), (conditioner.clip_g, "text_encoder_2"),
                             (conditioner.t5, "text_encoder_3")):
        model.save_pretrained(tmp_path / subfolder)
    loaded = text_conditioner_from_config(text_config("tiny", weights=str(tmp_path), init_seed=3))
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(PROMPTS), conditioner.encode(PROMPTS)))
    wider = dataclasses.replace(text_config("tiny").clip_l, hidden_size=48)
    with pytest.raises(ValueError, match="clip_l.hidden_size: config 48"):
        text_conditioner_from_config(text_config("tiny", weights=str(tmp_path), clip_l=wider))


def test_missing_paths_are_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder_3/config.json"):
        text_conditioner_from_config(text_config("tiny", weights=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data/tokenizers/t5_tiny")):
        text_conditioner_from_config(text_config("tiny"), repo_root=tmp_path)


def test_clip_lengths_must_match():
    config = text_config("tiny")
    config.clip_g = dataclasses.replace(config.clip_g, max_length=8)
    with pytest.raises(ValueError, match="max_length differ"):
        text_conditioner_from_config(config)


def test_shipped_text_configs_match_the_schema():
    tiny, sd3 = text_config("tiny"), text_config("sd3")
    assert (tiny.clip_l.hidden_size, tiny.clip_g.hidden_size, tiny.t5.d_model) == (DL, DG, DT)
    assert (sd3.clip_l.hidden_size, sd3.clip_l.num_layers, sd3.clip_l.projection_dim) == (768, 12, 768)
    assert (sd3.clip_g.hidden_size, sd3.clip_g.num_layers, sd3.clip_g.num_heads, sd3.clip_g.hidden_act) == (
        1280, 32, 20, "gelu")
    assert sd3.clip_l.pad_with_end and not sd3.clip_g.pad_with_end
    assert (sd3.t5.d_model, sd3.t5.num_layers, sd3.t5.num_heads, sd3.t5.d_ff) == (4096, 24, 64, 10240)
    assert sd3.t5_tokenizer == "???"  # the user must point at the real T5 tokenizer


@pytest.mark.slow
def test_matches_diffusers_encode_prompt(conditioner):
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    from sd3train.checkpoint.tokenizer_files import clip_tokenizer_folder, load_t5_tokenizer

    folder = str(clip_tokenizer_folder())
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=conditioner.clip_l, tokenizer=CLIPTokenizer.from_pretrained(folder, model_max_length=LC),
        text_encoder_2=conditioner.clip_g,
        tokenizer_2=CLIPTokenizer.from_pretrained(folder, model_max_length=LC, pad_token="!"),
        text_encoder_3=conditioner.t5, tokenizer_3=load_t5_tokenizer(REPO_ROOT / "data/tokenizers/t5_tiny"),
    )
    prompts = ["a red circle on a white background", "a very long caption that certainly runs past sixteen tokens"]
    context, _, pooled, _ = pipe.encode_prompt(
        prompts, prompts, prompts, device=torch.device("cpu"), do_classifier_free_guidance=False,
        max_sequence_length=LT,
    )
    expected_context, expected_pooled = conditioner.encode(prompts)
    assert torch.equal(context, expected_context) and torch.equal(pooled, expected_pooled)


@pytest.mark.slow
def test_init_is_bit_identical_in_another_process(conditioner):
    script = (
        "import hashlib, yaml, dataclasses, sys\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(REPO_ROOT / 'tests')!r}]\n"
        "from test_text_encoders import text_config\n"
        "from sd3train.checkpoint.components import text_conditioner_from_config\n"
        "state = text_conditioner_from_config(text_config('tiny')).state_dict()\n"
        "digest = hashlib.sha256(b''.join(state[k].numpy().tobytes() for k in sorted(state)))\n"
        "print(digest.hexdigest())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    import hashlib

    state = conditioner.state_dict()
    digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state)))
    assert result.stdout.strip().splitlines()[-1] == digest.hexdigest()


def test_encode_without_t5_zeroes_exactly_the_t5_context(conditioner):
    # SD3's T5-free inference (diffusion.sampler.drop_encoders=[t5]): the T5 tokens zeros, CLIP as is.
    full_context, full_pooled = conditioner.encode(PROMPTS)
    context, pooled = conditioner.encode(PROMPTS, without=("t5",))
    assert torch.equal(context[:, :LC], full_context[:, :LC]) and torch.equal(pooled, full_pooled)
    assert torch.all(context[:, LC:] == 0) and full_context[:, LC:].abs().max() > 0
    context, pooled = conditioner.encode(PROMPTS, without=("clip_l", "t5"))
    assert torch.all(context[:, :LC, :DL] == 0) and torch.equal(context[:, :LC, DL:], full_context[:, :LC, DL:])
    assert torch.all(pooled[:, :PL] == 0) and torch.equal(pooled[:, PL:], full_pooled[:, PL:])
    with pytest.raises(ValueError, match="unknown text encoder"):
        conditioner.encode(PROMPTS, without=("t6",))
