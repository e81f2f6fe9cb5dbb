"""load_text_conditioner: from a diffusers pipeline folder and our .ckpt, against SD3's reference layout."""

import torch

from sd3train.checkpoint import load_text_conditioner
from sd3train.model.text_encoders import TextConditioner
from tests.support.reference_models import reference_sd3_layout

PROMPTS = ["a red circle on a white background", "a very long caption that certainly runs past sixteen tokens", ""]


def test_pipeline_folder_matches_the_reference_layout_on_the_same_tokens(tiny_pipeline, tiny_pipeline_folder):
    pipeline, t5_length = tiny_pipeline
    text = load_text_conditioner(tiny_pipeline_folder, t5_max_length=t5_length)
    tokens = text.tokenize(PROMPTS)
    # The pipeline's own tokenizers give the same ids (bigG padded with "!", id 0).
    expected_tokens = {
        "clip_l": pipeline.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True).input_ids,
        "clip_g": pipeline.tokenizer_2(PROMPTS, padding="max_length", max_length=16, truncation=True).input_ids,
        "t5": pipeline.tokenizer_3(PROMPTS, padding="max_length", max_length=t5_length, truncation=True).input_ids,
    }
    for name, ids in expected_tokens.items():
        assert tokens[name].tolist() == ids, name
    context, pooled = text.encode(PROMPTS)
    expected_context, expected_pooled = reference_sd3_layout(
        pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3, tokens
    )
    assert context.shape == (3, 16 + t5_length, 128) and pooled.shape == (3, 32 + 64)
    torch.testing.assert_close(context, expected_context, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-6)  # measured: bit-identical


def test_pipeline_folder_conditioner_is_frozen_without_dropout(tiny_pipeline_folder):
    text = load_text_conditioner(tiny_pipeline_folder, dtype=torch.bfloat16)
    assert text.dropout == (0.0, 0.0, 0.0)
    assert not any(p.requires_grad for p in text.parameters())
    assert {p.dtype for p in text.parameters()} == {torch.bfloat16}
    first = text(PROMPTS[:1], generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(first, text.encode(PROMPTS[:1])))  # no encoder dropped
    assert text.tokenizers["t5"].max_length == 256  # the pipeline's default (its tokenizer_3 says 512)


def test_training_checkpoint_restores_the_saved_encoders(training_checkpoint):
    checkpoint = torch.load(training_checkpoint, map_location="cpu", weights_only=False)
    text = load_text_conditioner(training_checkpoint)
    assert isinstance(text, TextConditioner) and text.dropout == (0.0, 0.0, 0.0)
    saved = {k[len("text."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("text.")}
    assert saved.keys() == text.state_dict().keys()
    assert all(torch.equal(text.state_dict()[key], value) for key, value in saved.items())
    assert text.t5.encoder.embed_tokens.weight is text.t5.shared.weight  # tied again
    context, pooled = text.encode(PROMPTS)
    expected_context, expected_pooled = reference_sd3_layout(text.clip_l, text.clip_g, text.t5, text.tokenize(PROMPTS))
    assert torch.equal(context, expected_context) and torch.equal(pooled, expected_pooled)
