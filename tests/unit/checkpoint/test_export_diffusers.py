"""sd3train-export format=diffusers: StableDiffusion3Pipeline.from_pretrained loads the folder and
samples the images our own sampler gives from the training checkpoint. (The CLI runs in-process;
tests/integration/test_export_cli.py runs the installed console script.)"""

import json
import os
import stat

import pytest
import torch

from sd3train.checkpoint import load_text_conditioner, load_transformer, load_vae
from sd3train.checkpoint.files import safetensors_header
from sd3train.config.schema import SamplerConfig
from sd3train.export import main as export_main
from sd3train.inference import generate_latents, initial_noise
from tests.support.reference_models import relative_error

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle on a white background", "a green square on a black background"]
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def exported(training_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-diffusers"
    export_main([f"checkpoint={training_checkpoint}", "format=diffusers", f"out={out}"])
    return out


def test_folder_layout(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                "tokenizer_2", "tokenizer_3", "scheduler"):
        assert (exported / sub).is_dir(), sub
    scheduler = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 2.5
    assert not list(exported.parent.glob(".tiny-diffusers*"))  # no staging folder left behind
    umask = os.umask(0)
    os.umask(umask)
    for path in (exported, exported / "transformer" / "diffusion_pytorch_model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~umask, path


def test_diffusers_pipeline_samples_what_our_sampler_samples(exported, training_checkpoint):
    pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(str(exported), local_files_only=True)
    assert pipeline.scheduler.config.shift == 2.5
    sampler = SamplerConfig(num_steps=3, guidance_scale=3.0, shift=2.5, uncond="empty_prompt")
    text = load_text_conditioner(training_checkpoint)
    latents = generate_latents(load_transformer(training_checkpoint), text, PROMPTS, SEEDS, (16, 8, 8), sampler)
    with torch.no_grad():
        images = load_vae(training_checkpoint).decode(latents)
        expected = pipeline(
            prompt=PROMPTS, num_inference_steps=3, guidance_scale=3.0, latents=initial_noise(SEEDS, (16, 8, 8)),
            height=64, width=64, max_sequence_length=text.tokenizers["t5"].max_length, output_type="pt",
        ).images  # decoded and mapped to [0, 1]
    ours = ((images / 2 + 0.5).clamp(0, 1))
    assert expected.shape == (2, 3, 64, 64) and expected.std() > 0.01
    assert relative_error(ours, expected) < 1e-4


def test_exported_folder_loads_back_with_the_training_tokenizers(exported, training_checkpoint):
    text, reference = load_text_conditioner(exported), load_text_conditioner(training_checkpoint)
    assert {name: t.max_length for name, t in text.tokenizers.items()} == {"clip_l": 16, "clip_g": 16, "t5": 16}
    assert [t.pad_id for t in text.tokenizers.values()] == [t.pad_id for t in reference.tokenizers.values()]
    assert all(torch.equal(a, b) for a, b in zip(text.encode(PROMPTS), reference.encode(PROMPTS)))
    for load in (load_transformer, load_vae):
        ours, theirs = load(exported).state_dict(), load(training_checkpoint).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_existing_output_is_not_replaced_without_overwrite(exported, training_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main([f"checkpoint={training_checkpoint}", "format=diffusers", f"out={exported}"])
    assert exit_info.value.code == 1
    assert "already exists" in capsys.readouterr().err


def test_single_file_format_with_dtype(training_checkpoint, tmp_path):
    out = tmp_path / "tiny.safetensors"
    export_main([f"checkpoint={training_checkpoint}", "format=single_file", f"out={out}", "dtype=bf16"])
    loaded, expected = load_transformer(out, dtype=torch.bfloat16), load_transformer(training_checkpoint, torch.bfloat16)
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), expected.state_dict().values()))
    vae = load_vae(out)
    assert vae.scaling_factor == pytest.approx(0.605499) and vae.encoder.conv_norm_out.num_groups == 8
    stored = json.loads(safetensors_header(out)[1]["sd3train"])
    assert stored["transformer"]["sample_size"] == 4 and stored["scheduler"]["shift"] == 2.5  # conf/model/tiny


@pytest.mark.parametrize("args, message", [
    (["format=diffusers", "out=x"], "checkpoint=... required"),
    (["checkpoint=a", "format=onnx", "out=x"], "format must be one of diffusers, single_file"),
    (["checkpoint=a", "format=diffusers", "out=x", "dtype=int8"], "dtype must be one of"),
    (["checkpoint=a", "format=diffusers", "out=x", "colour=red"], "unknown argument(s) colour"),
])
def test_usage_errors_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
