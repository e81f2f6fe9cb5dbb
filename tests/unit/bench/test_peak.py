"""GPU peak lookup for MFU: names as torch.cuda.get_device_name() prints them."""

import pytest
import torch

from sd3train.runtime.peak import matmul_precision, peak_tflops


@pytest.mark.parametrize("device_name,precision,expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA GH200 480GB", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H100 NVL", "bf16", 835.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
    ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
    ("NVIDIA L40S", "bf16", 362.1),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA B200", "bf16", 2250.0),
    ("NVIDIA B200", "tf32", 1125.0),
])
def test_known_gpus_have_their_dense_peak(device_name, precision, expected):
    assert peak_tflops(device_name, precision) == expected


@pytest.mark.parametrize("device_name", ["NVIDIA L40", "NVIDIA GeForce RTX 4090", "Tesla T4", "NVIDIA GB200"])
def test_unknown_gpus_have_no_peak_rather_than_a_neighbours(device_name):
    assert peak_tflops(device_name, "bf16") is None


@pytest.fixture
def float32_matmul_precision():
    """Tests set torch's process-wide matmul precision; later tests get theirs back."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("trainer_precision", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_half_precisions_use_the_bf16_peak(trainer_precision):
    assert matmul_precision(trainer_precision) == "bf16"


def test_fp32_training_uses_the_tf32_peak_only_when_torch_allows_tf32(float32_matmul_precision):
    float32_matmul_precision("highest")
    assert matmul_precision("32-true") == "fp32"
    float32_matmul_precision("high")
    assert matmul_precision("32-true") == "tf32"
