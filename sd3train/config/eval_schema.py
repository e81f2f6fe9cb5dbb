"""The eval section of the training config: previews, the shapes world's end-of-run adherence
evaluation, and the metric suite (FID, KID, CLIP score, compositional) run in training and by
sd3train-eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# eval.suite: the metrics sd3train/eval/suite.py computes.
EVAL_SUITES = ("fid", "kid", "clip_score", "compositional")


@dataclass
class EvalConfig:
    """End-of-run evaluation and periodic sample grids."""

    prompts: list[str] = field(default_factory=list)
    # >0: at the end, sample every caption of the shapes grammar this many times and log
    # eval/colour_adherence and eval/shape_adherence (seeds from seed + 100000: not the previews').
    samples_per_caption: int = 0
    # Shapes outside the grammar a finetune teaches (data.shapes.NEW_SHAPES, e.g. [star]): their
    # captions are sampled too, and scored as eval/concept/<shape> (sd3train/eval/shapes_suite.py).
    new_shapes: list[str] = field(default_factory=list)
    seed: int = 1_000_000  # seeds from here on are never used by training
    # Text encoders (some of clip_l, clip_g, t5) to measure without as well: the end-of-run
    # adherence and the suite run again with them removed at sampling (diffusion.sampler.drop_encoders),
    # logged as eval/without_<names>/<metric> (e.g. eval/without_t5/shape_adherence).
    without_encoders: list[str] = field(default_factory=list)
    sample_every_n_steps: int = 0  # 0: only at the end
    num_sample_prompts: int = 8
    # Image-quality and prompt-following metrics (sd3train/eval/suite.py), every `every_n_steps` in
    # training (0: never) and from sd3train-eval: any of fid, kid, clip_score, compositional.
    suite: list[str] = field(default_factory=list)
    every_n_steps: int = 0
    # Images generated for fid, kid and clip_score, prompted with the reference set's captions.
    num_images: int = 256
    # Compositional benchmark (sd3train/eval/compose.py): prompts per category, one image each.
    prompts_per_category: int = 16
    # FID/KID reference: real images as shards, or statistics saved by
    # `sd3train-eval save_reference_stats=PATH` (relative paths from the repo root).
    reference_shards: Optional[str] = None
    reference_stats: Optional[str] = None
    # The FID Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or
    # torch-fidelity's weights-inception-2015-12-05-6726825d.pth): a local file, never downloaded.
    inception_weights: Optional[str] = None
    # An OpenCLIP model folder (open_clip_config.json and its weights, as the hub's OpenCLIP repos
    # lay them out) for clip_score.
    clip_model: Optional[str] = None
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    batch_size: int = 16  # prompts sampled together; the same on every rank count, so scores are too
