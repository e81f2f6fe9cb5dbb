"""Offline tokenizers for SD3's three text encoders.

CLIP-L and OpenCLIP bigG share OpenAI's byte-level BPE vocabulary (49,408 ids). No hub is needed:
the vocabulary ships inside open_clip (`bpe_simple_vocab_16e6.txt.gz`), and
`clip_tokenizer_folder()` derives the `vocab.json`/`merges.txt` pair that transformers'
`CLIPTokenizer` loads (cached, see `cache_dir()`). SD3 pads CLIP-L with the end token and bigG
with "!" (id 0): `PromptTokenizer` applies that padding.

T5 uses a sentencepiece model: the real T5 v1.1 folder for real runs, or the tiny model the repo
ships in `data/tokenizers/t5_tiny` (made by `python -m sd3train.tools.make_t5_tokenizer`).

    from sd3train.model.tokenizers import PromptTokenizer, load_clip_tokenizer
    clip_g = PromptTokenizer.clip(load_clip_tokenizer(), max_length=77, pad_with_end=False)
    ids = clip_g(["a red circle on a white background"])  # (1, 77), "!" (0) after the end token
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerBase, T5Tokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_BOS_TOKEN = "<|startoftext|>"
CLIP_EOS_TOKEN = "<|endoftext|>"
# bigG's pad token in SD3 ("!" is id 0, the first byte symbol).
CLIP_BANG_TOKEN = "!"
# Number of merges open_clip reads from its BPE file: 49408 = 2 * 256 byte symbols + merges + 2 specials.
_CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
# Bump when the derived files change so stale caches are not reused.
_CLIP_CACHE_NAME = "clip_bpe_16e6_v1"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from bytes to printable unicode symbols (the 256 base symbols)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codepoints)))


def open_clip_bpe_path() -> Path:
    """The gzipped BPE merge list open_clip ships (the same one OpenAI's CLIP uses)."""
    # find_spec locates the package without importing it (importing open_clip takes seconds).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip_torch is needed to derive the CLIP tokenizer (or set text.clip_tokenizer)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing: {path}")
    return path


def derive_clip_vocab(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) in transformers' layout, built the way open_clip builds its encoder.

    Ids: 256 byte symbols, the same 256 with the end-of-word suffix, one id per merge in rank
    order, then <|startoftext|> = 49406 and <|endoftext|> = 49407.
    """
    lines = gzip.open(bpe_path or open_clip_bpe_path()).read().decode("utf-8").split("\n")
    # Line 0 is a version header; open_clip keeps exactly this many merges after it.
    merges = lines[1 : _CLIP_NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [CLIP_BOS_TOKEN, CLIP_EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"derived CLIP vocabulary has {len(vocab)} entries, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer_files(folder: Path, bpe_path: Path | None = None) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json for `CLIPTokenizer.from_pretrained`."""
    vocab, merges = derive_clip_vocab(bpe_path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": CLIP_BOS_TOKEN,
        "eos_token": CLIP_EOS_TOKEN,
        "unk_token": CLIP_EOS_TOKEN,
        "pad_token": CLIP_EOS_TOKEN,
        "model_max_length": 77,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def cache_dir() -> Path:
    """$SD3TRAIN_CACHE, else $XDG_CACHE_HOME/sd3train, else ~/.cache/sd3train."""
    if os.environ.get("SD3TRAIN_CACHE"):
        return Path(os.environ["SD3TRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sd3train"


def clip_tokenizer_folder(root: Path | None = None) -> Path:
    """The derived CLIP tokenizer folder under `root` (default `cache_dir()`), created on first use.

    Written into a temporary sibling and renamed into place, so concurrent processes (data-loader
    workers, ranks) never see a half-written folder; a process that loses the race keeps the winner's.
    """
    folder = (root or cache_dir()) / _CLIP_CACHE_NAME
    if (folder / "tokenizer_config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{_CLIP_CACHE_NAME}-", dir=folder.parent))
    try:
        write_clip_tokenizer_files(staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_clip_tokenizer(folder: str | Path | None = None) -> CLIPTokenizer:
    """CLIP tokenizer from `folder` (vocab.json/merges.txt), or derived from open_clip's BPE file."""
    folder = Path(folder) if folder is not None else clip_tokenizer_folder()
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP tokenizer folder not found: {folder}")
    # The pad token is fixed to <|endoftext|> here: making "!" a special token would also split every
    # "!" inside a prompt off as a special token ("!!" is one BPE token). bigG's "!" padding is
    # applied by `PromptTokenizer` instead, as in SD3's reference code and open_clip.
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), pad_token=CLIP_EOS_TOKEN, local_files_only=True)
    if tokenizer.bos_token_id != CLIP_BOS_ID or tokenizer.eos_token_id != CLIP_EOS_ID:
        raise ValueError(
            f"CLIP tokenizer in {folder} has bos/eos ids {tokenizer.bos_token_id}/{tokenizer.eos_token_id}, "
            f"expected {CLIP_BOS_ID}/{CLIP_EOS_ID}"
        )
    return tokenizer


def load_t5_tokenizer(folder: str | Path) -> T5Tokenizer:
    """T5 tokenizer from a folder holding `spiece.model` (or a saved `tokenizer.json`); pad id 0, eos appended."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"T5 tokenizer folder not found: {folder} (make the tiny one with "
            "`python -m sd3train.tools.make_t5_tokenizer --out data/tokenizers/t5_tiny`)"
        )
    tokenizer = T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id != 0 or tokenizer.eos_token_id is None:
        raise ValueError(
            f"T5 tokenizer in {folder} has pad/eos ids {tokenizer.pad_token_id}/{tokenizer.eos_token_id}, "
            "expected pad 0 and an eos token"
        )
    return tokenizer


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
