"""SD3's prompt padding for its three text encoders, over tokenizer objects loaded elsewhere.

CLIP-L and OpenCLIP bigG share OpenAI's byte-level BPE vocabulary (49,408 ids; the ids below).
SD3 pads CLIP-L with the end token and bigG with "!" (id 0), T5 with its pad id: `PromptTokenizer`
applies that padding. The tokenizers themselves are read from files by
`sd3train.checkpoint.tokenizer_files` (CLIP derived offline from open_clip's BPE file, T5 from a
sentencepiece folder).

    from sd3train.checkpoint.tokenizer_files import load_clip_tokenizer
    from sd3train.model.tokenizers import PromptTokenizer
    clip_g = PromptTokenizer.clip(load_clip_tokenizer(), max_length=77, pad_with_end=False)
    ids = clip_g(["a red circle on a white background"])  # (1, 77), "!" (0) after the end token
"""

from __future__ import annotations

import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerBase, T5Tokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_BOS_TOKEN = "<|startoftext|>"
CLIP_EOS_TOKEN = "<|endoftext|>"
# bigG's pad token in SD3 ("!" is id 0, the first byte symbol).
CLIP_BANG_TOKEN = "!"


class PromptTokenizer:
    """Prompts -> token ids (B, max_length) for one encoder, padded the way SD3 pads it.

    Sequences are truncated to `max_length` keeping the special tokens (CLIP's end token, T5's
    </s>), then right-padded with `pad_id`. No attention mask: SD3 runs every encoder on the
    padded sequence.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, pad_id: int):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (start/end tokens), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = pad_id

    @classmethod
    def clip(cls, tokenizer: CLIPTokenizer, max_length: int, pad_with_end: bool) -> "PromptTokenizer":
        """CLIP-L pads with <|endoftext|> (pad_with_end=True), bigG with "!" (id 0)."""
        pad_id = CLIP_EOS_ID if pad_with_end else tokenizer.convert_tokens_to_ids(CLIP_BANG_TOKEN)
        return cls(tokenizer, max_length, pad_id)

    @classmethod
    def t5(cls, tokenizer: T5Tokenizer, max_length: int) -> "PromptTokenizer":
        return cls(tokenizer, max_length, tokenizer.pad_token_id)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        encoded = self.tokenizer(
            list(prompts), truncation=True, max_length=self.max_length, add_special_tokens=True, padding=False
        )
        ids = torch.full((len(encoded.input_ids), self.max_length), self.pad_id, dtype=torch.long)
        for row, sequence in enumerate(encoded.input_ids):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        return ids  # (B, max_length)
