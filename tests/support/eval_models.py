"""Random stand-ins for the evaluation networks, written to disk like the real ones, offline.

    weights = write_random_inception(tmp_path / "inception.pth")    # FID Inception layout (566 tensors)
    folder = write_tiny_openclip(tmp_path / "clip")                 # loadable as f"local-dir:{folder}"

The Inception is torchvision's in the layout pytorch-fid and torch-fidelity load strictly
(1008 classes, no auxiliary head). The tiny OpenCLIP model keeps the full 49408-token vocabulary
because the BPE tokenizer open_clip ships emits those ids; the rest is two layers of width 64.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A ViT at 32x32 pixels, text context 77 (what SimpleTokenizer pads to): about 3.4 M parameters.
TINY_OPENCLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_random_inception(path: Path, seed: int = 0) -> Path:
    """A randomly initialised FID Inception state_dict saved to `path`."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                                init_weights=False)
        # PyTorch's default init leaves the 2048 features near 5e-8 (degenerate) and torchvision's
        # init_weights near 4e10; Kaiming keeps them of order 1 through all the layers.
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_tiny_openclip(folder: Path, seed: int = 0) -> Path:
    """A tiny random OpenCLIP model in an OpenCLIP hub snapshot's layout: open_clip_config.json
    ({"model_cfg", "preprocess_cfg"}) and open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_OPENCLIP)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              folder / "open_clip_model.safetensors")
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPENCLIP,
                                                              "preprocess_cfg": preprocess}, indent=2))
    return folder
