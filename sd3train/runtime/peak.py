"""Peak dense matmul throughput of known GPUs, the denominator of model FLOP utilisation (MFU).

Figures are NVIDIA's datasheet numbers without structured sparsity (the datasheets print the
sparse figure, twice these): H100/H200 (nvidia.com/en-us/data-center/h100/ and /h200/, SXM
columns; H100 PCIe and NVL columns), A100 (nvidia.com/en-us/data-center/a100/), B200 (the HGX
B200 column of nvidia.com/en-us/data-center/hgx/: 36 PFLOPS FP16/BF16, 18 PFLOPS TF32 with
sparsity and 600 TFLOPS FP32 for 8 GPUs), L40S and L4 (their product pages). fp16 runs at the
bf16 rate on all of them. "fp32" is the plain FP32 rate torch gets with
`torch.backends.cuda.matmul.allow_tf32 = False` (its default); "tf32" the tensor-core rate.

    from sd3train.runtime.peak import matmul_precision, peak_tflops
    peak = peak_tflops(torch.cuda.get_device_name(), matmul_precision("bf16-mixed"))   # 989.4 on an H100
"""

from __future__ import annotations

import re
from typing import Optional

import torch

# Matched in order, as whole words, against torch.cuda.get_device_name(): more specific names first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    # HGX B200 (1000 W). GB200's B200 runs at 1200 W and faster; it is not "B200" as a whole word.
    ("B200", {"bf16": 2250.0, "tf32": 1125.0, "fp32": 75.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
)


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak TFLOP/s of `device_name` at `precision` ("bf16", "tf32" or "fp32"); None if unknown."""
    for fragment, peaks in PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(fragment)}\b", device_name, flags=re.IGNORECASE):
            return peaks[precision]
    return None


def matmul_precision(trainer_precision: str) -> str:
    """The table column a Lightning precision ("bf16-mixed", "32-true", ...) runs its matmuls at:
    bf16 and fp16 alike at "bf16"; fp32 at "tf32" when torch lets matmuls use TF32
    (`torch.set_float32_matmul_precision("high")`), else "fp32"."""
    if trainer_precision.startswith(("bf16", "16")):
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
