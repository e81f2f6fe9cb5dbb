"""Typed schemas for every Hydra config group, and the one place their defaults live.

Fields without a default are required: a config that leaves them out fails validation.
`sd3train.config.compose` registers these defaults as the base every composed config starts from,
so the YAML files under conf/ hold only what differs from them. The defaults are the SD3 recipe.
`sd3train.config.validate` checks a composed config against these classes, listing every
problem (unknown key, wrong type, missing value, impossible combination) in one error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sd3train.config.adapter_schema import AdapterConfig
from sd3train.config.eval_schema import EvalConfig


# model.float8: no float8, or torchao's recipes (sd3train/model/float8.py).
FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")


@dataclass
class ModelConfig:
    """MM-DiT. Width defaults to 64 * depth and heads to depth, as in SD3."""

    depth: int
    hidden_size: Optional[int] = None  # None: 64 * depth
    num_heads: Optional[int] = None  # None: depth
    patch_size: int = 2
    in_channels: int = 16
    out_channels: Optional[int] = None  # None: in_channels
    mlp_ratio: float = 4.0
    context_dim: int = 4096  # width of the text context (T5 width)
    pooled_dim: int = 2048  # CLIP-L pooled + bigG pooled
    pos_embed_max_size: int = 192
    sample_size: int = 128  # latent side of the base resolution; sets the sin-cos grid scale
    qk_norm: Optional[str] = None  # None or "rms"
    dual_attention_layers: list[int] = field(default_factory=list)  # MMDiT-X extra image self-attention
    qkv_bias: bool = True
    # "mmdit" (SD3's joint attention), or "crossattn_dit": the cross-attention DiT baseline of the
    # architecture study (sd3train/model/crossattn_dit.py), for training from scratch only.
    architecture: str = "mmdit"
    # What each joint block recomputes in the backward pass instead of keeping (torch.utils.checkpoint):
    # none; full (the whole block: about a third more compute, one block's activations instead of
    # `depth`); selective (keeps matmul and attention outputs, recomputes the cheap elementwise ops,
    # as torchtitan's per-op policy); every_k (full on one block in activation_checkpointing_every).
    # Older configs' true/false read as full/none.
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 2
    # Compile each joint block (sd3train.model.compile_blocks, fullgraph). None: on for CUDA runs
    # (off on CPU and with DeepSpeed, which refuses true).
    compile: Optional[bool] = None
    # SDPA kernel: auto (torch's choice; on Hopper cuDNN attention first), flash, cudnn, efficient, math.
    attention_backend: str = "auto"
    # Float8 matmuls in the joint blocks' linear layers (torchao, sd3train/model/float8.py): none,
    # tensorwise or rowwise scaling; emulated (same casts, higher-precision matmul) without float8 hardware.
    float8: str = "none"  # one of FLOAT8_RECIPES
    # SD3.5-Medium's training augmentation: each sample adds a randomly placed crop of the position
    # table instead of the centre crop, so positions off the centre are trained too. Inference and
    # validation always use the centre crop.
    pos_embed_random_crop: bool = False
    # Side of the centred window the random crops stay in (SD3.5-Medium's example: 64x64 crops from
    # a 192x192 window); None: the whole pos_embed_max_size table.
    pos_embed_crop_region: Optional[int] = None
    # Weights to start from: a Stability single file, a diffusers pipeline or transformer folder, or
    # an sd3train .ckpt (its EMA weights); they must be the architecture above. None: SD3's random init.
    weights: Optional[str] = None
    # A LoRA to start the adapter from (adapter=lora): a .safetensors in the diffusers or kohya layout
    # (what sd3train-export writes), to continue training it or to sample with it.
    adapter_weights: Optional[str] = None


@dataclass
class VAEConfig:
    """SD3 AutoencoderKL. `weights` is a local safetensors file or folder; None keeps random weights."""

    latent_channels: int = 16
    in_channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    shift_factor: float = 0.0609
    scaling_factor: float = 1.5305
    # 1x1 convs around the latent (SD1/SDXL autoencoders); SD3's VAE has none.
    use_quant_conv: bool = False
    weights: Optional[str] = None


@dataclass
class CLIPEncoderConfig:
    """A CLIP text tower (transformers CLIPTextModelWithProjection)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    projection_dim: int
    hidden_act: str = "quick_gelu"
    max_length: int = 77
    # SD3 pads CLIP-L with the end token and bigG with "!" (id 0).
    pad_with_end: bool = True


@dataclass
class T5EncoderConfig:
    """A T5 v1.1 encoder (transformers T5EncoderModel)."""

    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    feed_forward_proj: str = "gated-gelu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    max_length: int = 77


@dataclass
class TextConfig:
    """The three text encoders, their tokenizers and SD3's per-encoder zero-dropout."""

    clip_l: CLIPEncoderConfig
    clip_g: CLIPEncoderConfig
    t5: T5EncoderConfig
    # Folder with the T5 sentencepiece model (spiece.model); relative paths are from the repo root.
    # Real runs name the T5 v1.1 folder (e.g. <sd3 pipeline>/tokenizer_3); text=tiny the shipped one.
    t5_tokenizer: str
    # Folder with vocab.json/merges.txt; None derives them from the BPE vocabulary open_clip ships.
    clip_tokenizer: Optional[str] = None
    dropout_clip_l: float = 0.464
    dropout_clip_g: float = 0.464
    dropout_t5: float = 0.464
    # Random initialisation seed when no weights are given (tiny configs): the same seed gives the
    # same frozen encoders in training and sampling.
    init_seed: int = 0
    # A diffusers pipeline folder (text_encoder{,_2,_3}/) or a single file with text_encoders.*;
    # each encoder's own file or folder (ComfyUI's clip_l.safetensors, LAION's OpenCLIP bigG
    # open_clip_model.safetensors, a T5 folder) overrides it for that encoder.
    weights: Optional[str] = None
    clip_l_weights: Optional[str] = None
    clip_g_weights: Optional[str] = None
    t5_weights: Optional[str] = None


# The three text encoders, in the order of the text conditioner's keep masks (model.text_encoders).
TEXT_ENCODER_NAMES = ("clip_l", "clip_g", "t5")


@dataclass
class SamplerConfig:
    num_steps: int = 28
    guidance_scale: float = 7.0
    shift: float = 3.0
    # Unconditional branch of CFG: "zeros" (what dropout trains) or "empty_prompt" (diffusers).
    uncond: str = "zeros"
    # Skip-layer guidance (SD3.5-Medium: layers [7, 8, 9], scale 2.5): while the step index is inside
    # (num_steps * start, num_steps * stop), v += scale * (v_cond - v_cond with these joint blocks
    # skipped). Scale 0 turns it off.
    skip_layers: list[int] = field(default_factory=list)
    skip_layer_scale: float = 0.0
    skip_layer_start: float = 0.01
    skip_layer_stop: float = 0.2
    # Text encoders removed at sampling (some of clip_l, clip_g, t5): their context and pooled parts
    # zeros, what the per-encoder dropout trains for; [t5] is SD3's T5-free inference.
    drop_encoders: list[str] = field(default_factory=list)


@dataclass
class DiffusionConfig:
    """Rectified-flow training: timestep density, shift, and the sampler used for previews."""

    density: str = "logit_normal"  # logit_normal | mode | cosmap | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0  # static shift applied to training timesteps
    # If set, the shift is sqrt(pixels / base_pixels) for this training resolution (SD3's rule).
    resolution_dependent_shift: bool = False
    base_resolution: int = 256
    num_loss_bins: int = 10
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class ShardSourceConfig:
    """One shard set of a weighted mix (`data.sources`)."""

    shards: str  # like data.shards: brace ranges, '::'-separated lists, pipe: urls
    weight: float = 1.0


@dataclass
class DataConfig:
    """Where training samples come from and how they become batches (sd3train/data/)."""

    # Local paths (relative ones from the repo root), brace ranges ('out/{00000..00009}.tar'),
    # '::'-separated lists, and webdataset 'pipe:' urls ('pipe:aws s3 cp s3://bucket/a.tar -').
    shards: str = "data/shapes/train-{000000..000007}.tar"
    # An image folder read in place instead of shards (data=folder; sd3train/data/folder.py): images
    # with sidecar captions (.txt), synthetic captions (.syn.txt) and masks (.mask.png, or PNG alpha).
    path: Optional[str] = None
    instance_prompt: Optional[str] = None  # the caption of every image without a .txt
    repeats: int = 1  # passes over the folder per epoch
    # Train with each sample's mask (its .mask.png or PNG alpha; none: the whole image) weighting
    # the loss, normalised by the masked area.
    masked_loss: bool = False
    # Prior preservation (with data.path): a folder of images of the class, captioned class_prompt,
    # mixed into the batches; when it holds fewer than num_class_images, the missing ones are
    # generated from the base model first (sd3train/lit/class_images.py). Their loss is
    # train/loss_prior, weighted by optim.prior_loss_weight.
    class_images: Optional[str] = None
    class_prompt: Optional[str] = None
    # Instead of one class_prompt: image i is drawn from (and captioned) class_prompts[i % count],
    # to preserve many prompts of the base at once (experiment=lora_tiny_cpu: the whole grammar).
    class_prompts: list[str] = field(default_factory=list)
    num_class_images: int = 100
    # A weighted mix of shard sets; when set it replaces `shards` and shards are drawn with
    # replacement by weight (every epoch is `shards_per_epoch` draws per worker).
    sources: list[ShardSourceConfig] = field(default_factory=list)
    val_shards: Optional[str] = "data/shapes/val-000000.tar"
    # Target side: square images of this side, or aspect buckets of about this side^2 pixels.
    resolution: int = 64
    aspect_buckets: bool = False
    bucket_step: int = 16  # bucket sides are multiples of this
    max_aspect_ratio: float = 2.0  # widest bucket: long side / short side
    random_crop: bool = False  # else the centre crop
    random_flip: bool = False
    min_size: int = 0  # images whose shorter side is below this many pixels are skipped
    batch_size: int = 32
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # Draw shards with replacement (an endless stream cut into epochs of `shards_per_epoch` shards
    # per worker) instead of exact passes over the shard list.
    resampled: bool = False
    shards_per_epoch: Optional[int] = None  # None: the worker's share of one pass
    # Each worker's last batch of a bucket in an epoch is smaller; drop it instead of training on it.
    drop_partial_batches: bool = False
    image_key: str = "jpg;jpeg;png;webp"
    caption_key: str = "txt"
    # Where the synthetic caption is: a sidecar extension ("syn.txt") or a JSON field ("json:syn_caption").
    # None: every sample uses its original caption.
    synthetic_caption_key: Optional[str] = None
    # A folder written by sd3train-caption (relative paths from the repo root): per shard a table
    # of synthetic captions by sample key, joined as the shard is read (sd3train/data/caption_tables.py).
    # It comes first; with synthetic_caption_key also set, a sample the table lacks uses its own
    # synthetic caption, else its original one. With data.cached it only turns the cache's
    # synthetic captions on (they were embedded at precompute).
    synthetic_captions: Optional[str] = None
    p_synthetic: float = 0.5  # chance of the synthetic caption, drawn from (seed, key, epoch)
    # The run stops when more than this fraction of the samples read is skipped as bad (blocklisted
    # keys do not count); checked once `skip_budget_min_samples` samples were read, and at each epoch end.
    skip_budget: float = 0.05
    skip_budget_min_samples: int = 1000
    # A text file of sample keys to leave out, one per line (written by the deduplication tool).
    blocklist: Optional[str] = None
    # Resuming with another world size or worker count: refuse (false), or start the next epoch
    # with the new split (true; exactness is lost, statistics are not).
    resume_resplit: bool = False
    val_batches: int = 2
    # The shards are precompute cache shards (sd3train-precompute): latents and text embeddings.
    cached: bool = False
    # Keep each sample's VAE posterior in memory after its first visit (small datasets, many epochs).
    cache_latents: bool = False
    latent_cache_max_samples: int = 100_000


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 1000
    grad_clip: Optional[float] = 1.0
    # After warmup: "constant" (SD3 pretraining), "cosine" or "linear" decay to min_lr_ratio * lr
    # at trainer.max_steps (sd3train/runtime/lr_schedule.py).
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    prior_loss_weight: float = 1.0  # the class images' loss under prior preservation (data.class_images)


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    start_step: int = 0
    # Update the average every k optimizer steps with decay^k: the same horizon for a k-th of the
    # memory traffic (the EMA reads and writes every weight). 10: at depth 4 on the CPU an update
    # cost 5.0 ms, 3% of a 155 ms step; every 10 steps it is 0.3% (README, Performance).
    every_n_steps: int = 10


@dataclass
class StrategyConfig:
    """How training is spread over devices (`strategy=ddp|fsdp|fsdp_hybrid|zero1|zero2|zero3|zero3_offload`)."""

    name: str = "ddp"  # ddp, fsdp (PyTorch FSDP2) or deepspeed (ZeRO)
    zero_stage: int = 0  # 1: optimizer states sharded, 2: + gradients, 3: + parameters
    offload_optimizer: bool = False  # ZeRO optimizer states (and step) in CPU memory
    offload_parameters: bool = False  # ZeRO-3 parameters in CPU memory
    # ZeRO communication: bucket sizes in elements, and overlapping reduction with backward.
    reduce_bucket_size: int = 200_000_000
    allgather_bucket_size: int = 200_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    # Process group backend; None: nccl on GPUs, gloo on CPUs.
    process_group_backend: Optional[str] = None
    # FSDP2 (strategy=fsdp): free each block's gathered parameters after its forward and gather them
    # again for backward (ZeRO-3's memory); false keeps them until backward (ZeRO-2's, less traffic).
    reshard_after_forward: bool = True
    # FSDP2: shard within a node and replicate across nodes (HSDP; strategy=fsdp_hybrid), so the
    # parameter all-gathers stay on the node's fast links.
    hybrid: bool = False
    # FSDP2: parameters, gradients and optimizer states in CPU memory (the optimizer steps on the CPU).
    cpu_offload: bool = False


@dataclass
class TrainerConfig:
    max_steps: int = 100_000
    # "auto": continue from the newest checkpoint in the run directory; "never"; or a checkpoint path.
    resume: str = "auto"
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "bf16-mixed"
    log_every_n_steps: int = 10
    val_every_n_steps: int = 1000
    checkpoint_every_n_steps: int = 1000
    seed: int = 0
    progress_bar: bool = True
    accumulate_grad_batches: int = 1
    # When set, must equal data.batch_size x accumulate_grad_batches x devices x num_nodes.
    global_batch_size: Optional[int] = None
    num_nodes: int = 1
    keep_checkpoints: int = 2  # the newest N complete checkpoints are kept (at least 2)
    # Steps whose loss or gradient norm is not finite are skipped; this many in a row stop the run.
    max_nonfinite_steps: int = 3
    # The frozen VAE and text encoders' dtype: "auto" (bf16 under bf16 precisions, fp16 under 16-mixed,
    # else fp32), "fp32", "bf16" or "fp16". They only run forward, so half precision halves their memory.
    frozen_dtype: str = "auto"
    # Your own Lightning callbacks, added after the built-in ones: dotted paths of a Callback class or
    # of a function returning one, called without arguments ('my_project.callbacks.LogGpuTemperature').
    callbacks: list[str] = field(default_factory=list)
    # Peak TFLOP/s of one device for train/mfu; None: NVIDIA's dense figure for the GPU's name and
    # the training precision (sd3train/runtime/peak.py), and no train/mfu on devices it does not know.
    peak_tflops: Optional[float] = None


@dataclass
class LoggerConfig:
    wandb: bool = True
    # "offline" writes locally (sync later with `wandb sync`); "online" needs an API key.
    wandb_mode: str = "offline"
    project: str = "sd3train"
    entity: Optional[str] = None
    group: Optional[str] = None  # the W&B group of the run (sd3train-study: studies/<study>)
    csv: bool = True


@dataclass
class PathsConfig:
    runs_dir: str = "runs"
    # In a multirun (-m), append the job number and a digest of its overrides to run_name
    # (sd3train/paths.py: sweep_run_name); false where run_name is already one per job, as the
    # runs of sd3train-study are (run_name='<arm>-seed${trainer.seed}').
    sweep_suffix: bool = True
    # Released weights to start from (a Stability single file or a diffusers pipeline folder);
    # an experiment that finetunes sets it to '???', which makes it a required value.
    pretrained: Optional[str] = None


@dataclass
class TrainConfig:
    """The whole composed config (`conf/config.yaml`)."""

    # In the order conf/config.yaml composes them, which is the order problems are listed in.
    model: ModelConfig
    vae: VAEConfig
    text: TextConfig
    diffusion: DiffusionConfig
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig
    strategy: StrategyConfig
    logger: LoggerConfig
    experiment_name: str  # names the run directory, with run_name
    run_name: str
    ema: EMAConfig
    eval: EvalConfig
    paths: PathsConfig
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
