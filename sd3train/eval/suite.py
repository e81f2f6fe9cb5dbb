"""The metric suite (`eval.suite`): what is sampled for it, and what is measured on the samples.
The in-training callback (sd3train/lit/evaluation.py) and sd3train-eval both run it, with the same
prompts, seeds and sampling batches, so they give the same numbers for the same weights.

    plan = suite_plan(cfg.eval)                       # prompts and seeds, the same on every rank
    images = generate_images(..., plan.prompts, plan.seeds, ...)
    metrics = MetricSuite(cfg.eval).measure(images, plan)
    # {"eval/fid": ..., "eval/kid": ..., "eval/kid_std": ..., "eval/clip_score": ...,
    #  "eval/compositional/<category>": ..., "eval/compositional/overall": ...}

- fid, kid: `eval.num_images` images prompted with the reference set's captions (cycled when there
  are fewer), against the reference's Inception statistics (sd3train/eval/fid.py).
- clip_score: the same images against their prompts (sd3train/eval/clip_score.py). Without a
  reference its prompts are `eval.prompts`, else the compositional grammar's.
- compositional: `eval.prompts_per_category` prompts of each category of the compositional grammar
  (sd3train/data/scenes.py), one image each, scored analytically (sd3train/eval/compose.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sd3train.config.eval_schema import EvalConfig
from sd3train.data.scenes import CATEGORIES, compositional_prompts
from sd3train.paths import resolve_repo_path

# Seeds start this far after eval.seed (the previews'); the adherence evaluation uses +100000 and
# prior preservation's class images +200000, tools/shape_cnn.py +300000.
QUALITY_SEED_OFFSET = 500_000
COMPOSITIONAL_SEED_OFFSET = 400_000
QUALITY_METRICS = ("fid", "kid", "clip_score")


@dataclass(frozen=True)
class SuitePlan:
    """Every prompt the suite samples, one seed each: first the compositional benchmark's
    (`compositional` of them), then the quality metrics'."""

    prompts: list[str]
    seeds: list[int]
    compositional: int


def quality_captions(eval_cfg: EvalConfig) -> list[str]:
    """The prompts of the fid / kid / clip_score images: `eval.num_images` captions of the reference
    set (its saved statistics keep them), cycled; without a reference, eval.prompts or the grammar's."""
    if not set(QUALITY_METRICS) & set(eval_cfg.suite):
        return []
    if eval_cfg.reference_stats is not None:
        from sd3train.eval.fid import ReferenceStats

        captions = list(ReferenceStats.load(resolve_repo_path(eval_cfg.reference_stats)).captions)
        source = f"eval.reference_stats {eval_cfg.reference_stats}"
    elif eval_cfg.reference_shards is not None:
        from sd3train.eval.reference import reference_captions

        captions = reference_captions(eval_cfg.reference_shards, eval_cfg.num_images)
        source = f"eval.reference_shards {eval_cfg.reference_shards}"
    else:
        captions = list(eval_cfg.prompts) or compositional_prompts(eval_cfg.prompts_per_category)
        source = "eval.prompts"
    if not captions:
        raise ValueError(f"{source}: no captions to prompt the fid/kid/clip_score images with")
    return [captions[index % len(captions)] for index in range(eval_cfg.num_images)]


def suite_plan(eval_cfg: EvalConfig) -> SuitePlan:
    compositional = (compositional_prompts(eval_cfg.prompts_per_category)
                     if "compositional" in eval_cfg.suite else [])
    quality = quality_captions(eval_cfg)
    seeds = ([eval_cfg.seed + COMPOSITIONAL_SEED_OFFSET + index for index in range(len(compositional))]
             + [eval_cfg.seed + QUALITY_SEED_OFFSET + index for index in range(len(quality))])
    return SuitePlan(compositional + quality, seeds, len(compositional))


class MetricSuite:
    """Measures `eval.suite` on sampled images. The Inception, the OpenCLIP model and the FID/KID
    reference load on first use and stay (an in-training callback measures many times); build it on
    the rank that measures only."""

    def __init__(self, eval_cfg: EvalConfig, device: str = "cpu"):
        self.cfg = eval_cfg
        self.device = device
        self._inception = None
        self._clip = None
        self._reference = None

    def inception(self):
        if self._inception is None:
            from sd3train.eval.fid import load_inception

            self._inception = load_inception(resolve_repo_path(self.cfg.inception_weights), self.device)
        return self._inception

    def reference(self):
        """The FID/KID reference: loaded from eval.reference_stats, or computed from eval.reference_shards."""
        if self._reference is None:
            from sd3train.eval.fid import ReferenceStats

            if self.cfg.reference_stats is not None:
                self._reference = ReferenceStats.load(resolve_repo_path(self.cfg.reference_stats))
            else:
                self._reference = reference_from_shards(self.cfg.reference_shards, self.inception(),
                                                        self.cfg.batch_size)
        return self._reference

    def measure(self, images: Sequence[np.ndarray], plan: SuitePlan) -> dict[str, float]:
        if len(images) != len(plan.prompts):
            raise ValueError(f"{len(images)} images for {len(plan.prompts)} prompts")
        metrics: dict[str, float] = {}
        suite = set(self.cfg.suite)
        if "compositional" in suite:
            from sd3train.eval.compose import compositional_scores

            metrics.update(compositional_scores(images[:plan.compositional], plan.prompts[:plan.compositional]))
        quality_images, quality_prompts = images[plan.compositional:], plan.prompts[plan.compositional:]
        if {"fid", "kid"} & suite:
            from sd3train.eval.fid import frechet_distance, inception_features, kernel_inception_distance

            features = inception_features(self.inception(), quality_images, self.cfg.batch_size)
            if "fid" in suite:
                metrics["eval/fid"] = frechet_distance(self.reference(), features)
            if "kid" in suite:
                mean, std = kernel_inception_distance(self.reference(), features, self.cfg.kid_subset_size,
                                                      self.cfg.kid_subsets, seed=self.cfg.seed)
                metrics["eval/kid"], metrics["eval/kid_std"] = mean, std
        if "clip_score" in suite:
            from sd3train.eval.clip_score import clip_score, load_clip

            if self._clip is None:
                self._clip = load_clip(resolve_repo_path(self.cfg.clip_model), self.device)
            metrics["eval/clip_score"] = clip_score(self._clip, quality_images, quality_prompts)
        return metrics


def reference_from_shards(spec: str, extractor, batch_size: int):
    """Inception statistics (and captions) of every good image of the shards `spec` names."""
    import torch

    from sd3train.eval.fid import ReferenceStats, inception_features
    from sd3train.eval.reference import ReferenceReport, reference_images

    report = ReferenceReport()
    features, captions, batch = [], [], []
    for image, caption in reference_images(spec, report):
        batch.append(image)
        captions.append(caption)
        if len(batch) == 256:  # bounded memory for large reference sets
            features.append(inception_features(extractor, batch, batch_size))
            batch = []
    if batch:
        features.append(inception_features(extractor, batch, batch_size))
    if report.read < 2:
        raise ValueError(f"eval.reference_shards {spec}: fewer than 2 images ({report.summary()})")
    print(f"FID/KID reference: {report.summary()}")
    return ReferenceStats.from_features(torch.cat(features), captions=captions,
                                        meta={"reference_shards": spec, "images": report.read})


def category_names() -> list[str]:
    """The compositional metrics' names, in the grammar's order, overall last."""
    return [f"eval/compositional/{category}" for category in CATEGORIES] + ["eval/compositional/overall"]
