"""Offline tokenizers: CLIP derived from open_clip's BPE file, SD3 padding, the shipped tiny T5."""

from pathlib import Path

import pytest
import torch

from sd3train.checkpoint.tokenizer_files import (
    clip_tokenizer_folder,
    derive_clip_vocab,
    load_clip_tokenizer,
    load_t5_tokenizer,
)
from sd3train.data.shapes import all_specs
from sd3train.model.tokenizers import CLIP_BOS_ID, CLIP_EOS_ID, PromptTokenizer
from sd3train.tools.make_t5_tokenizer import DEFAULT_SEED, DEFAULT_VOCAB_SIZE, write_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[3]
T5_TINY = REPO_ROOT / "data" / "tokenizers" / "t5_tiny"
CAPTIONS = [
    "a red circle on a white background",
    "A photo of a cat's toy, 3 dogs & 12 birds!!",
    "  Hello   WORLD. it's 2024 -- what's up?",
    "",
    "word " * 100,  # longer than 77 tokens: truncated, end token kept
]


@pytest.fixture(scope="module")
def clip_tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def t5_tokenizer():
    return load_t5_tokenizer(T5_TINY)


def test_derived_clip_vocab_has_openai_layout():
    vocab, merges = derive_clip_vocab()
    assert len(vocab) == 49408
    assert len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0
    assert vocab["a</w>"] == 320  # "a" as a whole word, as in every CLIP prompt


def test_clip_ids_match_open_clip(clip_tokenizer):
    import open_clip

    reference_l = open_clip.get_tokenizer("ViT-L-14")(CAPTIONS)  # (B, 77), pads with 0
    reference_g = open_clip.get_tokenizer("ViT-bigG-14")(CAPTIONS)
    ids_l = PromptTokenizer.clip(clip_tokenizer, 77, pad_with_end=True)(CAPTIONS)
    ids_g = PromptTokenizer.clip(clip_tokenizer, 77, pad_with_end=False)(CAPTIONS)
    # bigG pads with "!" = 0, which is open_clip's padding: identical everywhere.
    assert torch.equal(ids_g, reference_g)
    # CLIP-L differs only in the padding (end token instead of 0).
    content = reference_l != 0
    assert torch.equal(ids_l[content], reference_l[content])
    assert torch.all(ids_l[~content] == CLIP_EOS_ID)
    assert ids_l[4, -1] == CLIP_EOS_ID  # truncated caption still ends with the end token


def test_clip_l_pads_with_end_token_and_bigg_with_bang(clip_tokenizer):
    caption = ["a red circle"]
    ids_l = PromptTokenizer.clip(clip_tokenizer, 8, pad_with_end=True)(caption)
    ids_g = PromptTokenizer.clip(clip_tokenizer, 8, pad_with_end=False)(caption)
    assert ids_l.tolist() == [[CLIP_BOS_ID, 320, 736, 7117, CLIP_EOS_ID, 49407, 49407, 49407]]
    assert ids_g.tolist() == [[CLIP_BOS_ID, 320, 736, 7117, CLIP_EOS_ID, 0, 0, 0]]


def test_bang_inside_a_prompt_is_an_ordinary_token_for_bigg(clip_tokenizer):
    # "!!" is one BPE token (748); making "!" a special pad token would split it into two 0s.
    ids_g = PromptTokenizer.clip(clip_tokenizer, 8, pad_with_end=False)(["birds!!"])
    assert ids_g.tolist() == [[CLIP_BOS_ID, 4337, 748, CLIP_EOS_ID, 0, 0, 0, 0]]


def test_clip_truncation_keeps_start_and_end_tokens(clip_tokenizer):
    ids = PromptTokenizer.clip(clip_tokenizer, 6, pad_with_end=False)(["one two three four five six seven"])
    assert ids.tolist() == [[CLIP_BOS_ID, 637, 1237, 2097, 2721, CLIP_EOS_ID]]


def test_clip_tokenizer_folder_is_created_once_and_loads(tmp_path):
    folder = clip_tokenizer_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no staging folder left
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    written = (folder / "vocab.json").stat().st_mtime_ns
    assert clip_tokenizer_folder(tmp_path) == folder
    assert (folder / "vocab.json").stat().st_mtime_ns == written  # reused, not rewritten
    assert load_clip_tokenizer(folder)("a red circle").input_ids == [CLIP_BOS_ID, 320, 736, 7117, CLIP_EOS_ID]


def test_t5_tiny_round_trips_captions_and_pads_with_zero(t5_tokenizer):
    captions = [spec.caption for spec in all_specs()]
    ids = PromptTokenizer.t5(t5_tokenizer, 16)(captions)  # (36, 16)
    for caption, row in zip(captions, ids.tolist()):
        end = row.index(1)  # </s>
        assert t5_tokenizer.decode(row[:end]) == caption
        assert t5_tokenizer.unk_token_id not in row
        assert all(token == 0 for token in row[end + 1 :])
    assert ids[0].tolist() == [3, 41, 23, 7, 3, 12, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # one piece per word


def test_t5_tiny_truncation_keeps_end_token(t5_tokenizer):
    ids = PromptTokenizer.t5(t5_tokenizer, 4)(["a red circle on a white background"])
    assert ids.tolist() == [[3, 41, 23, 1]]


def test_t5_tiny_vocabulary(t5_tokenizer):
    assert len(t5_tokenizer) == 281
    assert (t5_tokenizer.pad_token_id, t5_tokenizer.eos_token_id, t5_tokenizer.unk_token_id) == (0, 1, 2)
    assert sorted(t5_tokenizer.all_special_tokens) == ["</s>", "<pad>", "<unk>"]  # no <extra_id_*> sentinels


def test_make_t5_tokenizer_reproduces_the_shipped_model(tmp_path):
    write_tokenizer(tmp_path, DEFAULT_VOCAB_SIZE, DEFAULT_SEED)
    shipped = (T5_TINY / "spiece.model").read_bytes()
    assert (tmp_path / "spiece.model").read_bytes() == shipped
    assert sum(p.stat().st_size for p in T5_TINY.iterdir()) < 1_000_000
