"""Train the tiny T5 sentencepiece tokenizer the repo ships for tests and the embedded default.

    python -m sd3train.tools.make_t5_tokenizer --out data/tokenizers/t5_tiny

The corpus is a pure function of the code: every caption of the shapes grammar plus a few hundred
generic English sentences built from the word lists below, so the output is the same on every
machine (single-threaded training, fixed seed, no file paths stored in the model). Ids follow
T5's layout: <pad> = 0, </s> = 1, <unk> = 2; no <extra_id_*> sentinels (an encoder-only
conditioner never uses them). Real runs point `text.t5_tokenizer` at the T5 v1.1 folder instead.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import string
from pathlib import Path

from sd3train.data.shapes import all_specs

DEFAULT_VOCAB_SIZE = 384
DEFAULT_SEED = 0
NUM_GENERIC_SENTENCES = 400

_DETERMINERS = ["a", "the", "one", "this", "that", "every", "some", "my", "our", "their"]
_ADJECTIVES = [
    "small", "large", "bright", "dark", "old", "new", "quiet", "loud", "happy", "tired", "shiny", "wooden",
    "tall", "short", "soft", "heavy", "warm", "cold", "round", "striped", "golden", "silver", "pink", "brown",
    "grey", "cyan", "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
]
_NOUNS = [
    "cat", "dog", "bird", "horse", "house", "tree", "river", "mountain", "city", "street", "car", "boat",
    "train", "flower", "garden", "window", "door", "book", "table", "chair", "lamp", "painting", "robot",
    "castle", "forest", "beach", "cloud", "star", "moon", "sun", "child", "woman", "man", "teacher", "chef",
    "cup", "apple", "bottle", "bicycle", "bridge", "circle", "square", "triangle", "shape", "picture",
]
_VERBS = [
    "sits on", "stands near", "looks at", "walks past", "jumps over", "rests under", "floats above",
    "leans against", "hides behind", "waits beside", "points at", "runs toward", "is painted on",
    "is drawn next to", "glows above",
]
_PLACES = [
    "in the park", "at night", "in the morning", "on a sunny day", "during the rain", "in a small room",
    "by the sea", "in the snow", "under a blue sky", "on a white background", "on a black background",
    "in a photograph", "in an oil painting", "in a watercolor sketch", "at sunset",
]
_TEMPLATES = [
    "{det} {adj} {noun} {verb} {det2} {adj2} {noun2} {place}.",
    "{Det} {adj} {noun} {verb} {det2} {noun2}.",
    "A photo of {det} {adj} {noun} {place}.",
    "An illustration of {det} {noun} and {det2} {adj2} {noun2}.",
    "There are {number} {adj} {noun}s {place}.",
    "{Det} {noun} {verb} {det2} {adj2} {noun2}, {place}!",
    "Is {det} {noun} {adj}? Yes, it is {adj2}.",
    "{number} {adj} {noun}s and {number2} {adj2} {noun2}s {place}.",
]


def generic_sentences(count: int, seed: int) -> list[str]:
    """`count` deterministic English sentences from the word lists above."""
    rng = random.Random(f"t5-tiny-corpus-{seed}")
    sentences = []
    for _ in range(count):
        det, det2 = rng.choice(_DETERMINERS), rng.choice(_DETERMINERS)
        sentence = rng.choice(_TEMPLATES).format(
            det=det, Det=det.capitalize(), det2=det2,
            adj=rng.choice(_ADJECTIVES), adj2=rng.choice(_ADJECTIVES),
            noun=rng.choice(_NOUNS), noun2=rng.choice(_NOUNS),
            verb=rng.choice(_VERBS), place=rng.choice(_PLACES),
            number=rng.randint(2, 99), number2=rng.randint(2, 99),
        )
        sentences.append(sentence[0].upper() + sentence[1:])
    return sentences


def corpus(seed: int = DEFAULT_SEED) -> list[str]:
    """Shapes captions (several times, so their words become whole pieces), generic sentences,
    and every printable ASCII character, so no ASCII prompt maps to <unk>."""
    captions = [spec.caption for spec in all_specs()]
    coverage = [" ".join(string.ascii_letters), " ".join(string.digits), " ".join(string.punctuation)]
    return captions * 5 + generic_sentences(NUM_GENERIC_SENTENCES, seed) + coverage


def train_sentencepiece(sentences: list[str], vocab_size: int, seed: int) -> bytes:
    """A serialized unigram sentencepiece model with T5's special ids."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may support fewer pieces than asked for
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer(out: Path, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = DEFAULT_SEED) -> Path:
    """Write spiece.model and tokenizer_config.json into `out`; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(train_sentencepiece(corpus(seed), vocab_size, seed))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "additional_special_tokens": [],
        "model_max_length": 512,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/tokenizers/t5_tiny")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="upper bound on the pieces")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    out = write_tokenizer(args.out, args.vocab_size, args.seed)

    from sd3train.checkpoint.tokenizer_files import load_t5_tokenizer

    tokenizer = load_t5_tokenizer(out)
    print(f"wrote {out}: {len(tokenizer)} tokens, {(out / 'spiece.model').stat().st_size} bytes")


if __name__ == "__main__":
    main()
