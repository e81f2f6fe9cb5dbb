"""Bad configs fail at composition, before any model is built, naming every problem at once."""

from __future__ import annotations

import pytest

from sd3train.config.typed import ConfigError
from tests.support.config import compose_config

BAD = [
    (["model.depth=abc"], ["model.depth: expected int, got str 'abc'"]),
    (["diffusion.sampler.drop_encoders=[t5,t6]"], ["diffusion.sampler.drop_encoders: unknown encoder(s) ['t6']"]),
    (["eval.without_encoders=[clip]"], ["eval.without_encoders: unknown encoder(s) ['clip']"]),
    (["+trainer.max_step=10"], ["trainer.max_step: unknown key"]),
    (["trainer.global_batch_size=100", "data.batch_size=8", "trainer.devices=2", "trainer.accumulate_grad_batches=3"],
     ["trainer.global_batch_size: 100 != data.batch_size 8 x trainer.accumulate_grad_batches 3 x trainer.devices 2 x "
      "trainer.num_nodes 1 = 48"]),
    (["model.weights=/nowhere/sd35"], ["model.weights: /nowhere/sd35 does not exist"]),
    (["strategy=ddp", "strategy.offload_optimizer=true"], ["strategy.offload_optimizer: needs a ZeRO strategy"]),
    (["strategy=zero2", "strategy.offload_parameters=true"], ["strategy.offload_parameters: only ZeRO stage 3"]),
    (["strategy=zero3", "trainer.precision=16-mixed"], ["trainer.precision: 16-mixed is refused by DeepSpeed on CPU"]),
    (["strategy=fsdp_hybrid"], ["strategy.hybrid: replicates across nodes and needs trainer.num_nodes >= 2, got 1"]),
    (["strategy=fsdp", "strategy.cpu_offload=true", "trainer.accelerator=cpu"],
     ["strategy.cpu_offload: moves GPU memory to the CPU"]),
    (["strategy=fsdp", "strategy.offload_optimizer=true"],
     ["strategy.offload_optimizer: needs a ZeRO strategy (FSDP2 offloads with strategy.cpu_offload=true)"]),
    (["strategy=ddp", "strategy.hybrid=true"], ["strategy.hybrid: an FSDP2 option; it needs strategy.name=fsdp"]),
    (["data.class_images=/tmp/classes", "data.num_class_images=0"],
     ["data.class_images: prior preservation mixes class images into an image folder's; set data.path",
      "data.class_images: needs data.class_prompt", "data.num_class_images: must be >= 1, got 0"]),
    (["data=folder", "data.path=data", "data.repeats=0", "data.masked_loss=true", "data.cached=true"],
     ["data.repeats: must be >= 1, got 0", "data.path: an image folder is read as images",
      "data.masked_loss: the precompute cache holds no masks"]),
    (["data=folder", "data.path=/nowhere/photos"], ["data.path: /nowhere/photos is not a folder"]),
    (["adapter=lora"], ["adapter: adapters finetune a base model; set model.weights"]),
    (["adapter=lora", "adapter.rank=0", "adapter.alpha=0", "adapter.targets=[]"],
     ["adapter.rank: must be >= 1, got 0", "adapter.alpha: must be > 0, got 0.0", "adapter.targets: name at least one"]),
    (["model.adapter_weights=README.md"], ["model.adapter_weights: loads a LoRA into an adapter; set adapter=lora"]),
    (["adapter=loha", "model.weights=README.md", "model.adapter_weights=README.md"],
     ["model.adapter_weights: a LoRA file loads into adapter=lora, not loha"]),
    (["adapter=loha", "adapter.init=pissa"], ["adapter.init: 'pissa' is not one of default for loha"]),
    (["adapter.kind=qlora"], ["adapter.kind: 'qlora' is not one of none, lora, dora, loha, lokr"]),
    (["adapter=lora", "adapter.blocks=[0,7]"], ["adapter.blocks: 7 is not a joint block of a depth-4 model"]),
    (["adapter=lora", "strategy=zero2"], ["adapter: runs under strategy ddp or fsdp (strategy.name is deepspeed)"]),
    (["model.float8=e5m2"], ["model.float8: 'e5m2' is not one of none, tensorwise, rowwise"]),
    (["strategy=zero2", "model.float8=tensorwise"], ["model.float8: float8 training needs strategy ddp or fsdp"]),
    (["data.resolution=100"], ["data.resolution=100 is not a multiple of 16"]),
    (["trainer.keep_checkpoints=1"], ["trainer.keep_checkpoints: must be >= 2"]),
    (["data.p_synthetic=1.5"], ["data.p_synthetic: 1.5 is outside [0.0, 1.0]"]),
    (["data.aspect_buckets=true", "data.bucket_step=8"], ["data.bucket_step=8 is not a multiple of 16"]),
    (["data.random_flip=true", "data.cache_latents=true"], ["data.cache_latents: a cached posterior would freeze"]),
    (["trainer.max_nonfinite_steps=0"], ["trainer.max_nonfinite_steps: must be >= 1, got 0"]),
    (["data.blocklist=/nowhere/blocklist.txt"], ["data.blocklist: /nowhere/blocklist.txt does not exist"]),
    (["trainer.callbacks=[no_such_package.Callback]"],
     ["trainer.callbacks[0]: cannot import 'no_such_package' for 'no_such_package.Callback'"]),
    (["trainer.callbacks=[tests.support.faults.NoSuchFault,SlowSteps]"],
     ["trainer.callbacks[0]: module 'tests.support.faults' has no 'NoSuchFault'",
      "trainer.callbacks[1]: 'SlowSteps' is not a dotted path (package.module.Name)"]),
    (["eval.suite=[fid]", "eval.inception_weights=/nowhere/pt_inception.pth", "eval.reference_stats=/nowhere/ref.pt"],
     ["eval.inception_weights: /nowhere/pt_inception.pth does not exist", "eval.reference_stats: /nowhere/ref.pt does not exist"]),
    (["eval.suite=[kid]"], ["eval.inception_weights: fid and kid need the FID Inception-v3 weights file",
                            "eval.reference_shards / eval.reference_stats: fid and kid need exactly one reference"]),
    (["eval.suite=[clip_score,lpips,clip_score]", "eval.clip_model=data"],
     ["eval.suite: ['lpips'] are not metrics", "eval.suite: ['clip_score', 'lpips', 'clip_score'] names a metric twice",
      "eval.clip_model: data is not an OpenCLIP model folder (no open_clip_config.json in it)"]),
    (["eval.every_n_steps=100"], ["eval.every_n_steps: 100 but eval.suite is empty"]),
    (["eval.suite=[compositional]", "eval.prompts_per_category=0"], ["eval.prompts_per_category: must be >= 1, got 0"]),
    (["eval.suite=[fid]", "eval.reference_shards='/nowhere/ref-{0..1}.tar'"],
     ["eval.reference_shards: 2 shard(s) do not exist, e.g. /nowhere/ref-0.tar"]),
    (["trainer.callbacks=[tests.support.faults.time]"],
     ["trainer.callbacks[0]: 'tests.support.faults.time' is a module, not a class or function"]),
]


def _load(*overrides: str):
    return compose_config("experiment=tiny_cpu", "trainer.accelerator=cpu", *overrides)


@pytest.mark.parametrize("overrides, expected", BAD, ids=[" ".join(overrides) for overrides, _ in BAD])
def test_each_bad_config_fails_naming_its_problem(overrides, expected):
    with pytest.raises(ConfigError) as caught:
        _load(*overrides)
    for line in expected:
        assert line in str(caught.value), str(caught.value)


def test_all_problems_of_one_config_are_listed_together():
    overrides = ["trainer.keep_checkpoints=1", "data.p_synthetic=1.5", "trainer.max_nonfinite_steps=0",
                 "data.resolution=100", "strategy=zero2", "strategy.offload_parameters=true"]
    with pytest.raises(ConfigError) as caught:
        _load(*overrides)
    assert len(caught.value.problems) >= 5, caught.value.problems
