"""LoRA on the CLIP-L and bigG text encoders too (`adapter.text_encoders=[clip_l,clip_g]`): only the
adapters train, are optimised, averaged and checkpointed (the text bases, from weight files, are not);
a resume continues bit for bit; the exports hold the text adapters, load back as the adapter to start
from, and merge into the exported encoders."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd3train.checkpoint.components import text_conditioner_from_config
from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.files import read_lightning_checkpoint
from sd3train.checkpoint.training import read_training_checkpoint
from sd3train.export import export
from sd3train.model.adapters import adapter_state_dict, base_state_dict
from sd3train.paths import resolve_repo_path
from sd3train.train import fit, run_dir_of
from tests.support.checkpoints import write_training_checkpoint
from tests.support.config import adapter_run_config
from tests.support.reference_models import relative_error, text_config

ADAPTER = ["adapter=lora", "adapter.rank=4", "adapter.alpha=8", "adapter.targets=[attention]",
           "adapter.text_encoders=[clip_l,clip_g]"]
PROMPTS = ["a red circle on a white background", "two blue squares"]
# tiny text encoders: 2 layers each, q, k, v and out adapted, A and B.
TEXT_ADAPTER_TENSORS = 2 * 4 * 2


def text_adapter_config(shapes: Path, root: Path, *overrides: str):
    return adapter_run_config(shapes, root, root / "base.ckpt", [f"text.weights={root / 'text'}", *ADAPTER],
                              "optim.warmup_steps=0", *overrides)


@pytest.fixture(scope="module")
def run(small_shapes, tmp_path_factory):
    """(root, config) of a 4-step run on a base MM-DiT checkpoint and text encoders from a folder."""
    root = tmp_path_factory.mktemp("text_lora")
    (root / "base").mkdir()
    write_training_checkpoint(root / "base").rename(root / "base.ckpt")
    text = text_conditioner_from_config(text_config("tiny"))  # what the tiny config's seed gives
    for encoder, subfolder in ((text.clip_l, "text_encoder"), (text.clip_g, "text_encoder_2"), (text.t5, "text_encoder_3")):
        encoder.save_pretrained(root / "text" / subfolder)
    cfg = text_adapter_config(small_shapes, root, "trainer.max_steps=4")
    fit(cfg)
    return root, cfg


def last_checkpoint(cfg) -> dict:
    return read_lightning_checkpoint(run_dir_of(cfg) / "checkpoints" / "last")


def test_only_the_text_adapters_train_are_optimised_averaged_and_saved(run):
    root, cfg = run
    checkpoint = last_checkpoint(cfg)
    state = checkpoint["state_dict"]
    for prefix in ("text.", "text_ema.shadow."):  # the bases came from text.weights: not saved
        saved = [key for key in state if key.startswith(prefix)]
        assert all(".lora_A." in key or ".lora_B." in key for key in saved), prefix
        for name in ("clip_l", "clip_g"):
            b = [state[key] for key in saved if key.startswith(f"{prefix}{name}.") and ".lora_B." in key]
            assert len(b) == TEXT_ADAPTER_TENSORS // 2 and all(tensor.abs().max() > 0 for tensor in b), (prefix, name)
    optimizer = checkpoint["optimizer_states"][0]
    mmdit_adapter = len([key for key in state if key.startswith("mmdit.")])
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == mmdit_adapter + 2 * TEXT_ADAPTER_TENSORS
    record = checkpoint["sd3train_adapter_base"]["text_encoders"]
    assert record["clip_l"]["weights"] == str(root / "text") and record["clip_g"]["digest"]


def test_the_text_bases_are_what_the_files_gave(run):
    _, cfg = run
    from sd3train.lit.restore import restore_module

    module = restore_module(read_training_checkpoint(run_dir_of(cfg) / "checkpoints" / "last"))
    loaded = text_conditioner_from_config(cfg.text)
    for name in ("clip_l", "clip_g"):
        got, expected = base_state_dict(getattr(module.text, name)), getattr(loaded, name).state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key].float(), expected[key]) for key in expected), name
    assert all(torch.equal(a, b) for a, b in zip(module.text.t5.parameters(), loaded.t5.parameters()))
    # Sampling encodes with the EMA adapters, which differ from the trained ones and from none.
    ema, trained, base = module.sampling_text.encode(PROMPTS)[0], module.text.encode(PROMPTS)[0], loaded.encode(PROMPTS)[0]
    assert relative_error(ema, trained) > 1e-4 and relative_error(ema, base) > 1e-4


def test_a_resume_continues_bit_for_bit(run, small_shapes):
    root, cfg = run
    middle = run_dir_of(cfg) / "checkpoints" / "step-0000002"
    resumed = text_adapter_config(small_shapes, root, "trainer.max_steps=4", "run_name=resumed",
                                  f"trainer.resume={middle}")
    fit(resumed)
    straight, again = last_checkpoint(cfg), last_checkpoint(resumed)
    trained = [key for key in straight["state_dict"] if ".lora_" in key]
    assert trained and all(torch.equal(again["state_dict"][key], straight["state_dict"][key]) for key in trained)
    moments = straight["optimizer_states"][0]["state"]
    assert all(torch.equal(again["optimizer_states"][0]["state"][index]["exp_avg"], moments[index]["exp_avg"])
               for index in moments)
    with open(run_dir_of(resumed) / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert steps == [2, 3]


@pytest.mark.parametrize("layout", ["lora_kohya", "lora_diffusers"])
def test_the_exports_hold_the_text_adapters_and_load_back(run, small_shapes, tmp_path, layout):
    root, cfg = run
    from sd3train.lit.module import SD3LitModule
    from sd3train.lit.restore import restore_module

    last = run_dir_of(cfg) / "checkpoints" / "last"
    out = export({"checkpoint": str(last), "format": layout, "out": str(tmp_path / "lora.safetensors")})
    tensors = load_file(out)
    if layout == "lora_kohya":
        assert float(tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 8.0
        assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in tensors
    else:
        assert {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
                "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight"} <= set(tensors)
    # Per adapted module: down, up and alpha (kohya) or A and B (diffusers).
    text_keys = [key for key in tensors if key.startswith(("lora_te", "text_encoder"))]
    assert len(text_keys) == (3 if layout == "lora_kohya" else 2) * TEXT_ADAPTER_TENSORS
    # model.adapter_weights=<export>: the run starts from the EMA adapters, text encoders included.
    module = SD3LitModule(text_adapter_config(small_shapes, root, f"model.adapter_weights={out}"))
    expected = restore_module(read_training_checkpoint(last)).text_ema.shadow
    for name in ("clip_l", "clip_g"):
        got, want = adapter_state_dict(getattr(module.text, name)), adapter_state_dict(expected[name])
        assert got.keys() == want.keys()
        for key in want:  # kohya: the same tensors; diffusers: alpha / rank folded into B and out again
            torch.testing.assert_close(got[key], want[key], rtol=1e-6 if layout == "lora_diffusers" else 0, atol=0)


def test_a_merged_export_merges_the_text_adapters(run, tmp_path):
    _, cfg = run
    from sd3train.checkpoint import load_text_conditioner
    from sd3train.lit.restore import restore_module

    last = run_dir_of(cfg) / "checkpoints" / "last"
    args = {"checkpoint": str(last), "format": "single_file", "out": str(tmp_path / "merged.safetensors"), "merge": True}
    with pytest.raises(CheckpointError, match="text_encoders=true"):
        export(args)
    merged = export({**args, "text_encoders": True})
    assert not any("lora" in key for key in load_file(merged))
    text = load_text_conditioner(merged, t5_tokenizer=resolve_repo_path(cfg.text.t5_tokenizer),
                                 t5_max_length=cfg.text.t5.max_length)
    expected = restore_module(read_training_checkpoint(last)).sampling_text.encode(PROMPTS)
    for got, want in zip(text.encode(PROMPTS), expected):
        assert relative_error(got, want) < 1e-5


@pytest.mark.slow  # about 35 s: two 2-process runs
def test_text_adapters_under_fsdp_train_as_under_ddp(run, small_shapes, tmp_path):
    from tests.support.processes import train_under_fsdp_and_ddp

    root, _ = run
    runs = train_under_fsdp_and_ddp(tmp_path, [
        "model.depth=2", f"model.weights={root / 'base.ckpt'}", f"text.weights={root / 'text'}", *ADAPTER,
        "trainer.precision=bf16-mixed", "data.batch_size=4", "data.num_workers=0", "data.val_shards=null",
        "eval.prompts=[]", "eval.samples_per_caption=0", "logger.wandb=false", "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1", "trainer.max_steps=4", "ema.every_n_steps=1", "optim.lr=1e-3",
        f"data.shards='{small_shapes}/train-{{000000..000003}}.tar'"])
    (fsdp_losses, fsdp), (ddp_losses, ddp) = runs["fsdp"], runs["ddp"]
    assert len(fsdp_losses) == 4 and fsdp_losses == pytest.approx(ddp_losses, rel=1e-3)
    text = [key for key in ddp if key.startswith(("text.", "text_ema.shadow."))]
    assert text and all(".lora_" in key for key in text) and set(text) <= set(fsdp)
    assert any(ddp[key].abs().max() > 0 for key in text if ".lora_B." in key)
    for key in text:
        torch.testing.assert_close(fsdp[key].float(), ddp[key].float(), rtol=1e-2, atol=1e-4)
