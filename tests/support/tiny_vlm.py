"""A tiny randomly initialised LLaVA (CLIP vision tower + Llama), saved like a hub model, offline.

    path = save_tiny_vlm(tmp_path / "vlm")               # model + processor, loadable with Auto* classes
    path = save_tiny_vlm(tmp_path / "mute", mute=True)   # generates only special tokens: empty captions

Everything is built from arguments: a WordLevel `tokenizers` tokenizer wrapped in
PreTrainedTokenizerFast, a CLIPImageProcessor at 16x16 pixels, a chat template, and configs with
one layer of width 16 (about 20k parameters; building and saving takes milliseconds). The weights
are drawn from a fixed seed with a large init scale, so greedy captions differ between images.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
WORDS = tuple(
    "a an the photo picture image of with and on in at near under above red green blue yellow orange purple "
    "black white grey small large tiny huge square circle triangle shape shapes sky grass tree house dog cat "
    "describe this detail . , USER: ASSISTANT:".split()
)
IMAGE_SIZE, PATCH_SIZE = 16, 8
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} "
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_processor(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    # (16 / 8)^2 patches + the CLS token, which the "default" feature strategy drops again.
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )


def tiny_model(seed: int = 0, mute: bool = False):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab_size = len(SPECIAL_TOKENS) + len(WORDS)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=16)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=1.0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=SPECIAL_TOKENS.index("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=4)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Special tokens never generated (no early end), or, mute, nothing else: every caption is empty.
    model.generation_config.suppress_tokens = (
        list(range(len(SPECIAL_TOKENS), vocab_size)) if mute else list(range(len(SPECIAL_TOKENS)))
    )
    return model


def save_tiny_vlm(folder: Path, seed: int = 0, mute: bool = False, chat_template: bool = True) -> Path:
    folder = Path(folder)
    tiny_model(seed, mute).save_pretrained(folder)
    tiny_processor(chat_template).save_pretrained(folder)
    return folder
