"""load_text_encoder: OpenCLIP files against open_clip's own forward; transformers-named files and folders
against the models they were saved from; errors that name the file and what it holds."""

import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd3train.checkpoint.encoder_files import load_text_encoder
from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.formats import TEXT_PREFIXES
from sd3train.model.tokenizers import CLIP_BOS_ID, CLIP_EOS_ID
from tests.support.reference_models import perturb, relative_error

open_clip = pytest.importorskip("open_clip")

PROMPTS = ["a red circle on a white background", "a photo of a cat", ""]
CLIP_IDS = torch.tensor([  # (3, 16) as SD3 tokenizes bigG: end token, then "!" (0) padding
    [CLIP_BOS_ID, 320, 736, 7117, 525, 320, 1579, 5994, CLIP_EOS_ID] + [0] * 7,
    [CLIP_BOS_ID, 320, 1125, 539, 320, 2368, CLIP_EOS_ID] + [0] * 9,
    [CLIP_BOS_ID, CLIP_EOS_ID] + [0] * 14,
])
T5_IDS = torch.tensor([[5, 17, 3, 99, 1, 0, 0, 0], [8, 1, 0, 0, 0, 0, 0, 0]])  # (2, 8)


def tiny_openclip(quick_gelu: bool = False, seed: int = 0):
    """A random open_clip CLIP (text width 128 = 2 heads x 64, 3 layers) with layer norms away from 1/0."""
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=16),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=3),
        quick_gelu=quick_gelu,
    )
    perturb(model, seed=seed, std=0.1)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, module in sorted(model.named_modules()):
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def openclip_model():
    return tiny_openclip()


@pytest.fixture(scope="module")
def openclip_file(openclip_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("openclip") / "open_clip_model.safetensors"
    save_file({key: value.contiguous() for key, value in openclip_model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def openclip_reference(openclip_model):
    """open_clip's penultimate residual stream, final-norm output and encode_text on bigG tokens."""
    model = openclip_model
    tokens = open_clip.get_tokenizer("ViT-bigG-14")(PROMPTS)  # (3, 77), 0-padded as SD3 pads bigG
    assert model.transformer.batch_first  # (B, L, D) throughout, no transposes
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding  # (B, L, D)
        for block in model.transformer.resblocks[:-1]:
            x = block(x, attn_mask=model.attn_mask)
        penultimate = x
        last = model.ln_final(model.transformer.resblocks[-1](x, attn_mask=model.attn_mask))
        pooled = model.encode_text(tokens)  # (B, 16)
    return tokens, penultimate, last, pooled


def encode(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True)


def test_openclip_safetensors_matches_open_clip(openclip_file, openclip_reference):
    tokens, penultimate, last, pooled = openclip_reference
    model = load_text_encoder(openclip_file, "clip_g")
    assert isinstance(model, CLIPTextModelWithProjection) and not model.training
    assert (model.config.num_attention_heads, model.config.hidden_act) == (2, "gelu")
    out = encode(model, tokens)
    assert relative_error(out.hidden_states[-2], penultimate) < 1e-5  # measured 0 (bit-identical)
    assert relative_error(out.last_hidden_state, last) < 1e-5  # measured 0
    assert relative_error(out.text_embeds, pooled) < 1e-5  # measured 1.5e-7 (nn.Linear vs x @ P)


def test_openclip_bin_and_text_prefix_load_the_same_weights(openclip_model, openclip_file, tmp_path):
    expected = load_text_encoder(openclip_file, "clip_g").state_dict()
    state = openclip_model.state_dict()
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    custom = {key if key.startswith(("visual.", "logit_")) else "text." + key: value.contiguous()
              for key, value in state.items()}  # CustomTextCLIP's layout
    save_file(custom, str(tmp_path / "custom_text.safetensors"))
    for path in (tmp_path / "open_clip_pytorch_model.bin", tmp_path / "custom_text.safetensors"):
        loaded = load_text_encoder(path, "clip_g").state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[key], expected[key]) for key in expected), path.name


def test_openclip_loaded_as_clip_l_uses_quick_gelu(tmp_path):
    reference = tiny_openclip(quick_gelu=True, seed=3)
    path = tmp_path / "vit_l_openai.safetensors"
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, str(path))
    model = load_text_encoder(path, "clip_l")
    assert model.config.hidden_act == "quick_gelu"
    tokens = open_clip.get_tokenizer("ViT-bigG-14")(PROMPTS)
    with torch.no_grad():
        # measured 1.8e-7; with exact gelu instead it is 1e-2
        assert relative_error(model(input_ids=tokens).text_embeds, reference.encode_text(tokens)) < 1e-5


def tiny_clip(hidden_act: str = "gelu", seed: int = 0) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, projection_dim=32,
                            num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=16,
                            hidden_act=hidden_act, bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID)
    return perturb(CLIPTextModelWithProjection(config), seed=seed).eval()


def tiny_t5(seed: int = 0) -> T5EncoderModel:
    config = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)
    return perturb(T5EncoderModel(config), seed=seed).eval()


def save_state(state, path, prefix=""):
    save_file({prefix + key: value.clone() for key, value in state.items()}, str(path))  # clone: untie T5
    return path


def assert_same_clip_outputs(model, reference):
    ours, expected = encode(model, CLIP_IDS), encode(reference, CLIP_IDS)
    assert torch.equal(ours.hidden_states[-2], expected.hidden_states[-2])
    assert torch.equal(ours.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(ours.text_embeds, expected.text_embeds)


@pytest.fixture(scope="module")
def clip_g():
    return tiny_clip()


@pytest.mark.parametrize("prefix", ["", TEXT_PREFIXES["clip_g"]])
def test_transformers_clip_file_gives_identical_outputs(clip_g, tmp_path, prefix):
    path = save_state(clip_g.state_dict(), tmp_path / "clip_g.safetensors", prefix)
    model = load_text_encoder(path, "clip_g")
    assert model.config.hidden_act == "gelu"
    assert_same_clip_outputs(model, clip_g)


def test_clip_l_file_without_projection_pools_the_unprojected_end_token(tmp_path):
    reference = tiny_clip("quick_gelu", seed=2)
    state = {key: value for key, value in reference.state_dict().items() if key != "text_projection.weight"}
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]  # older transformers saved it
    model = load_text_encoder(save_state(state, tmp_path / "clip_l.safetensors"), "clip_l")
    expected = encode(reference.text_model, CLIP_IDS)
    assert torch.equal(encode(model, CLIP_IDS).text_embeds, expected.pooler_output)


@pytest.mark.parametrize("kept", ["shared.weight", "encoder.embed_tokens.weight", "both"])
def test_t5_file_with_either_embedding_name_gives_identical_outputs(tmp_path, kept):
    reference = tiny_t5()
    dropped = {"shared.weight": "encoder.embed_tokens.weight", "encoder.embed_tokens.weight": "shared.weight"}
    state = {key: value for key, value in reference.state_dict().items() if key != dropped.get(kept)}
    model = load_text_encoder(save_state(state, tmp_path / "t5xxl_fp16.safetensors"), "t5")
    assert isinstance(model, T5EncoderModel) and model.encoder.embed_tokens.weight is model.shared.weight
    with torch.no_grad():
        assert torch.equal(model(input_ids=T5_IDS).last_hidden_state, reference(input_ids=T5_IDS).last_hidden_state)


def test_transformers_folders_load_with_their_config(clip_g, tmp_path):
    clip_g.save_pretrained(str(tmp_path / "clip_g"))
    assert_same_clip_outputs(load_text_encoder(tmp_path / "clip_g", "clip_g"), clip_g)
    t5 = tiny_t5(seed=1)
    t5.save_pretrained(str(tmp_path / "t5"))
    model = load_text_encoder(tmp_path / "t5", "t5", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        ours = model.float()(input_ids=T5_IDS).last_hidden_state
        assert relative_error(ours, t5(input_ids=T5_IDS).last_hidden_state) < 2e-2  # bf16 weights


def test_missing_key_is_named_with_the_file(clip_g, tmp_path):
    prefix = TEXT_PREFIXES["clip_g"]
    state = {k: v for k, v in clip_g.state_dict().items() if k != "text_model.encoder.layers.1.mlp.fc2.bias"}
    path = save_state(state, tmp_path / "clip_g.safetensors", prefix)
    message = re.escape(str(path)) + f".*missing key.*'{re.escape(prefix)}text_model.encoder.layers.1.mlp.fc2.bias'"
    with pytest.raises(CheckpointError, match=message):
        load_text_encoder(path, "clip_g")


def test_t5_file_loaded_as_clip_g_says_it_holds_t5(tmp_path):
    path = save_state(tiny_t5().state_dict(), tmp_path / "t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + " holds a T5 encoder.*load it as t5"):
        load_text_encoder(path, "clip_g")
    tiny_t5().save_pretrained(str(tmp_path / "t5"))
    with pytest.raises(CheckpointError, match="holds a T5 model .*model_type 't5'"):
        load_text_encoder(tmp_path / "t5", "clip_l")


def test_openclip_file_loaded_as_t5_says_it_holds_clip(openclip_file):
    message = "holds an OpenCLIP CLIP text tower, not 't5' .*load it as clip_l or clip_g"
    with pytest.raises(CheckpointError, match=message):
        load_text_encoder(openclip_file, "t5")


def test_file_under_another_encoders_prefix_names_it(clip_g, tmp_path):
    path = save_state(clip_g.state_dict(), tmp_path / "clip_l.safetensors", TEXT_PREFIXES["clip_l"])
    message = r"holds clip_l \(under 'text_encoders.clip_l.transformer.'\), not clip_g"
    with pytest.raises(CheckpointError, match=message):
        load_text_encoder(path, "clip_g")


def test_clip_l_shaped_files_are_refused_as_clip_g(tmp_path):
    without_projection = {k: v for k, v in tiny_clip().state_dict().items() if k != "text_projection.weight"}
    path = save_state(without_projection, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="without text_projection.weight.*load it as 'clip_l'"):
        load_text_encoder(path, "clip_g")
    config = CLIPTextConfig(vocab_size=8, hidden_size=768, intermediate_size=8, projection_dim=8,
                            num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=4)
    path = save_state(CLIPTextModelWithProjection(config).state_dict(), tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="768-wide CLIP text encoder, the width of clip_l"):
        load_text_encoder(path, "clip_g")


def test_truncated_files_name_themselves(clip_g, openclip_model, tmp_path):
    safetensors_path = save_state(clip_g.state_dict(), tmp_path / "clip_g.safetensors")
    bin_path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(openclip_model.state_dict(), bin_path)
    for path, reader in ((safetensors_path, "safetensors file"), (bin_path, "weight file")):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=f"cannot read {reader} " + re.escape(str(path))):
            load_text_encoder(path, "clip_g")


def test_unknown_weights_and_names_are_refused(clip_g, tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2)}, str(path))
    message = re.escape(str(path)) + " holds no text encoder.*'encoder.conv_in.weight'"
    with pytest.raises(CheckpointError, match=message):
        load_text_encoder(path, "t5")
    with pytest.raises(ValueError, match="name must be one of clip_l, clip_g, t5"):
        load_text_encoder(path, "clip_h")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_text_encoder(tmp_path / "nowhere.safetensors", "t5")
