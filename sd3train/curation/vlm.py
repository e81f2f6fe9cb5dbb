"""A local vision-language model that writes one caption per image, deterministically.

    model = CaptionModel.load("/models/llava-1.5-7b-hf", device="cuda", dtype_name="bf16",
                              prompt="Describe this image in detail.", max_new_tokens=128)
    captions = model.caption([pil_image, ...])          # stripped strings, "" when nothing was generated

Any model that transformers' `AutoModelForImageTextToText` (else `AutoModelForVision2Seq` where
this transformers has it) loads, with its `AutoProcessor`, from a local folder only
(`local_files_only`: nothing is downloaded). The prompt goes through the processor's chat template
when it has one (one user turn: the image, then the text), else it is used as it is, after the
processor's image token when it has one and the prompt lacks it. Decoding is greedy
(`do_sample=False`, one beam; the model's other generation settings apply); only the generated
tokens are decoded, without special tokens, and stripped of surrounding whitespace.

Determinism: the same images in the same batches give the same captions on the same software and
hardware. A batch's prompts are padded to one length (on the left, for decoder-only models), so
another `--batch-size` can change a caption where padding changes the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_NAMES = ("bf16", "fp16", "fp32")
DEFAULT_PROMPT = "Describe this image in detail."
# Tried in order; the first that knows the model's config class loads it.
MODEL_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")


class ModelLoadError(Exception):
    """The folder does not hold a vision-language model and processor that transformers can load."""


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_model(path: Path, dtype) -> Any:
    import transformers

    errors = []
    for name in MODEL_CLASSES:
        auto_class = getattr(transformers, name, None)
        if auto_class is None:  # not in this transformers version
            continue
        try:
            return auto_class.from_pretrained(path, local_files_only=True, dtype=dtype)
        except ValueError as error:  # "Unrecognized configuration class ...": try the next auto class
            errors.append(f"{name}: {str(error).splitlines()[0]}")
    raise ModelLoadError(f"{path} is not an image-text-to-text model transformers can load ({'; '.join(errors)})")


def build_prompt(processor: Any, prompt: str) -> str:
    """The text beside each image: the chat template's user turn, else the plain prompt."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", None)
    if isinstance(image_token, str) and image_token and image_token not in prompt:
        return f"{image_token}\n{prompt}" if prompt else image_token
    return prompt


@dataclass
class CaptionModel:
    model: Any
    processor: Any
    prompt: str  # what the processor is given beside each image (see build_prompt)
    max_new_tokens: int
    device: Any
    dtype: Any

    @classmethod
    def load(cls, path: str | Path, device: str, dtype_name: str, prompt: str, max_new_tokens: int) -> "CaptionModel":
        import torch
        from transformers import AutoProcessor

        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"{path} is not a folder (a model saved with save_pretrained, or a hub snapshot)")
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"{path}: no processor transformers can load ({str(error).splitlines()[0]})") from None
        dtype = torch_dtype(dtype_name)
        try:
            model = load_model(path, dtype)
        except OSError as error:  # no weights, no config.json
            raise ModelLoadError(f"{path}: {str(error).splitlines()[0]}") from None
        model = model.eval().requires_grad_(False).to(device)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and not model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # generated tokens follow every prompt directly
        return cls(model, processor, build_prompt(processor, prompt), max_new_tokens, torch.device(device), dtype)

    def caption(self, images: list[Any]) -> list[str]:
        """One caption per RGB PIL image ("" when the model generated nothing but special tokens)."""
        import torch

        if not images:
            return []
        text = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=images, return_tensors="pt", padding=True, **text)
        inputs = inputs.to(self.device, dtype=self.dtype)  # only floating tensors (pixels) take the dtype
        with torch.inference_mode():
            output = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and output.shape[1] >= prompt_ids.shape[1] and torch.equal(
            output[:, : prompt_ids.shape[1]], prompt_ids.to(output.device)
        ):
            output = output[:, prompt_ids.shape[1]:]  # (B, new tokens): a decoder-only model echoes the prompt
        return [text.strip() for text in self.processor.batch_decode(output, skip_special_tokens=True)]
