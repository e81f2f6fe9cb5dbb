"""Peak dense matmul throughput of known GPUs, the denominator of model FLOP utilisation.

Figures are NVIDIA's datasheet numbers without structured sparsity (the datasheets print the
sparse figure, twice these): H100/H200 (nvidia.com/en-us/data-center/h100/ and /h200/, SXM
columns; H100 PCIe and NVL columns), A100 (nvidia.com/en-us/data-center/a100/), L40S and L4
(their product pages). "fp32" is the plain FP32 rate torch gets with
`torch.backends.cuda.matmul.allow_tf32 = False` (its default); "tf32" the tensor-core rate.
"""

from __future__ import annotations

import re
from typing import Optional

# Matched in order, as whole words, against torch.cuda.get_device_name(): more specific names first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
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
