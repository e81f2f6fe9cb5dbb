"""The tokenizer files of SD3's text encoders, read offline: CLIP derived from open_clip, T5 from a folder.

CLIP-L and OpenCLIP bigG share OpenAI's byte-level BPE vocabulary. No hub is needed: the vocabulary
ships inside open_clip (`bpe_simple_vocab_16e6.txt.gz`), and `clip_tokenizer_folder()` derives the
`vocab.json`/`merges.txt` pair that transformers' `CLIPTokenizer` loads (cached, see `cache_dir()`).
T5 uses a sentencepiece model: the real T5 v1.1 folder for real runs, or the tiny model the repo
ships in `data/tokenizers/t5_tiny` (made by `python -m sd3train.tools.make_t5_tokenizer`).

    from sd3train.checkpoint.tokenizer_files import config_tokenizers, load_clip_tokenizer, load_t5_tokenizer
    clip = load_clip_tokenizer()                       # derived from open_clip's BPE file
    t5 = load_t5_tokenizer("data/tokenizers/t5_tiny")
    clip, t5 = config_tokenizers(text_cfg)             # the folders a TextConfig names
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

from sd3train.config.schema import TextConfig
from sd3train.durable import fsync_tree, temporary_dir
from sd3train.model.tokenizers import CLIP_BOS_ID, CLIP_BOS_TOKEN, CLIP_EOS_ID, CLIP_EOS_TOKEN, CLIP_VOCAB_SIZE
from sd3train.paths import REPO_ROOT

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
    staging = temporary_dir(folder.parent, _CLIP_CACHE_NAME)
    try:
        write_clip_tokenizer_files(staging)
        fsync_tree(staging)
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


def config_tokenizers(cfg: TextConfig, repo_root: Path | None = None) -> tuple[CLIPTokenizer, T5Tokenizer]:
    """(CLIP, T5) tokenizers from the folders `cfg` names, relative paths from `repo_root` (default
    the repository root); CLIP derived from open_clip when `cfg.clip_tokenizer` is unset."""
    clip_folder = resolve_config_path(cfg.clip_tokenizer, repo_root) if cfg.clip_tokenizer else None
    return load_clip_tokenizer(clip_folder), load_t5_tokenizer(resolve_config_path(cfg.t5_tokenizer, repo_root))


def resolve_config_path(path: str | Path, repo_root: Path | None = None) -> Path:
    """`path` when absolute, else relative to `repo_root` (default the repository root)."""
    root = Path(repo_root) if repo_root is not None else REPO_ROOT
    return Path(path) if Path(path).is_absolute() else root / path
