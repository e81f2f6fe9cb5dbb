"""SSCD copy-detection descriptor (Pizzi et al., CVPR 2022): ResNet-50 trunk, GeM pooling, 512-d, L2-normalised.

    model = SSCD()                                  # random weights (tests, benchmarks)
    model = load_sscd("sscd_disc_mixup.torchvision.pt")    # a state dict in the authors' layout
    model = load_sscd("sscd_disc_mixup.torchscript.pt")    # or their TorchScript file
    descriptors = model(torch.from_numpy(np.stack([preprocess(image, "small288")])))   # (B, 512), unit norm

A plain nn.Module, no Lightning. Weights come from a local file only:
- the released TorchScript files (`*.torchscript.pt`, loaded with torch.jit.load as they are);
- state dicts in the authors' torchvision layout (`*.torchvision.pt`): their `Model("TV_RESNET50",
  512, 3.0)` is a torchvision resnet50 as `backbone` whose `avgpool` is GeM pooling (no parameter:
  p is a plain float) and whose `fc` is the 2048 -> 512 projection, then a parameter-free L2Norm. So
  the keys are `backbone.conv1.weight`, `backbone.layer1.0.conv1.weight`, ..., `backbone.fc.weight`
  (512, 2048), `backbone.fc.bias`. Here the projection is its own module: `backbone.fc.*` <->
  `projection.*` (`from_authors_layout` / `to_authors_layout`). A missing, unexpected or
  wrongly-shaped key is an `SSCDWeightsError` naming the key and the file (BatchNorm's
  `num_batches_tracked` counters alone may be absent: inference never reads them), and so is a
  TorchScript archive torch.jit.load cannot read. The Classy Vision files (`*.classy.pt`) have
  another trunk layout and are not read (their error says so); use the torchvision or TorchScript
  file of the same model.

Preprocessing is the authors' recommendation for inference (their README): `small288` resizes the
short side to 288 (torchvision `Resize(288)` sizes, bilinear), `skew320` resizes to 320x320
ignoring the aspect ratio (batches better on a GPU); then ToTensor and ImageNet mean/std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = {"small288": 288, "skew320": 320}  # name -> size (short side, or the square's side)
TRUNK_CHANNELS = 2048
DIMS = 512
POOL_PARAM = 3.0  # SSCD's GeM p
GEM_EPS = 1e-6  # the authors' clamp before the power
_AUTHORS_PROJECTION = "backbone.fc."
_PROJECTION = "projection."


class SSCDWeightsError(ValueError):
    """A weights file that does not hold an SSCD model of the expected layout."""


class GeMPool(nn.Module):
    """Generalised-mean pooling over H and W: mean(x.clamp(min=eps) ** p) ** (1 / p); p is fixed, as in SSCD."""

    def __init__(self, p: float = POOL_PARAM, eps: float = GEM_EPS):
        super().__init__()
        self.p = float(p)
        self.eps = float(eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C)
        return features.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class SSCD(nn.Module):
    """ResNet-50 trunk -> GeM -> Linear(2048, dims) -> L2 normalisation."""

    def __init__(self, dims: int = DIMS, pool_param: float = POOL_PARAM):
        super().__init__()
        from torchvision.models import resnet50

        backbone = resnet50(weights=None)
        # Only the convolutional stages are used (see features); Identity keeps the module scriptable.
        backbone.avgpool = nn.Identity()
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.pool = GeMPool(pool_param)
        self.projection = nn.Linear(TRUNK_CHANNELS, dims)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 2048, H/32, W/32) trunk features."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.features(images))  # (B, 2048)
        return F.normalize(self.projection(pooled), dim=1)  # (B, dims)


# ------------------------------------------------------------------ weights


def _our_key(key: str) -> str:
    return _PROJECTION + key[len(_AUTHORS_PROJECTION):] if key.startswith(_AUTHORS_PROJECTION) else key


def _authors_key(key: str) -> str:
    return _AUTHORS_PROJECTION + key[len(_PROJECTION):] if key.startswith(_PROJECTION) else key


def from_authors_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SSCD authors' torchvision-layout keys -> this module's keys."""
    return {_our_key(key): value for key, value in state.items()}


def to_authors_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This module's keys -> the SSCD authors' torchvision layout (what `*.torchvision.pt` holds)."""
    return {_authors_key(key): value for key, value in state.items()}


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a `constants.pkl` member; torch.save files do not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_state_dict_checked(model: SSCD, state: dict, path: Path) -> None:
    """Load `state` (authors' layout) into `model`; SSCDWeightsError naming the first bad key and the file."""
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise SSCDWeightsError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    ours = from_authors_layout(state)
    expected = model.state_dict()
    problems = [f"missing key {_authors_key(key)!r}" for key in expected
                if key not in ours and not key.endswith("num_batches_tracked")]
    problems += [f"unexpected key {_authors_key(key)!r}" for key in ours if key not in expected]
    problems += [f"key {_authors_key(key)!r} has shape {tuple(ours[key].shape)}, the model needs "
                 f"{tuple(expected[key].shape)}"
                 for key in expected if key in ours and ours[key].shape != expected[key].shape]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        # Model("CV_RESNET50") keeps the projection in `embeddings.1` and the trunk in `backbone.trunk`.
        classy = any(key.startswith(("embeddings.", "backbone.trunk.")) for key in state)
        hint = ("; this looks like a Classy Vision file (*.classy.pt), which is not read: use the "
                "*.torchvision.pt or *.torchscript.pt file of the same model") if classy else ""
        raise SSCDWeightsError(f"{path}: not an SSCD ResNet-50 state dict in the authors' torchvision layout "
                               f"(backbone.*, backbone.fc.*): {shown}{hint}")
    full = {**expected, **{key: ours[key] for key in expected if key in ours}}
    model.load_state_dict(full, strict=True)


def load_sscd(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """An SSCD model in eval mode on `device`, from a TorchScript file or an authors'-layout state dict."""
    path = Path(path)
    if not path.is_file():
        raise SSCDWeightsError(f"{path}: no such file (SSCD weights are read from a local file)")
    if _is_torchscript(path):
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # noqa: BLE001  (a cut-short or foreign archive: RuntimeError, pickle errors)
            raise SSCDWeightsError(f"{path}: a TorchScript archive torch.jit.load cannot read "
                                   f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
                                   ) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  (pickle, zip and torch errors alike)
            raise SSCDWeightsError(f"{path}: not a TorchScript file or a state dict ({type(error).__name__}: "
                                   f"{error})") from None
        if isinstance(state, dict) and set(state) == {"state_dict"}:
            state = state["state_dict"]
        model = SSCD()
        load_state_dict_checked(model, state, path)
    for parameter in model.parameters():  # ScriptModules have no requires_grad_()
        parameter.requires_grad_(False)
    return model.eval().to(device)


# ------------------------------------------------------------ preprocessing


def resized_size(width: int, height: int, preprocessing: str) -> tuple[int, int]:
    """(width, height) after the preprocessing's resize (torchvision Resize's rounding for `small288`)."""
    size = PREPROCESSING[preprocessing]
    if preprocessing == "skew320":
        return size, size
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess(image: Image.Image, preprocessing: str = "small288") -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W), resized and ImageNet-normalised."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    size = resized_size(*image.size, preprocessing)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    pixels = (pixels - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, H, W)
