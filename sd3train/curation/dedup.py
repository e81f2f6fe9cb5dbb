"""sd3train-dedup: find near-duplicate images (SSCD descriptors + faiss) and write a blocklist for training.

    sd3train-dedup all --out /data/dedup --shards '/data/src/{00000..00999}.tar' --weights sscd_disc_mixup.torchscript.pt
    sd3train-dedup embed --out DIR --shards SPEC [--descriptor sscd|thumbnail] [--weights PATH]
                         [--preprocessing small288|skew320] [--batch-size 64] [--device auto|cpu|cuda]
                         [--threads N] [--task-index I] [--num-tasks N]
    sd3train-dedup cluster --out DIR --shards SPEC [--clusters 16000] [--train-samples 1000000] [--seed 0]
    sd3train-dedup search --out DIR --shards SPEC [--threshold T] [--probe 1] [--examples 8]
    python -m sd3train.curation.dedup ...   # the same
    sd3train-train ... data.blocklist=DIR/blocklist.txt   # then train without the near-duplicates

Stages (SD3's recipe against memorisation: SSCD embeddings, 16,000 k-means clusters, duplicates
within a cluster above a similarity of 0.5):
1. `embed`, one task per Slurm array element: `DIR/embeddings/<shard>.npz` per input shard,
   the descriptor of every usable sample (keys in shard order; layout in dedup_files.py). Shards
   go round-robin to tasks, shard i to task `i % num_tasks`; `--task-index` / `--num-tasks` default to
   the Slurm array variables (sd3train.curation.tasks), so `sbatch --array=0-63` needs no flags.
   Restartable: an embeddings file exists only once complete (hidden temporary, fsync, rename) and
   is skipped by a rerun, which also deletes what a killed task left. Samples without an image or
   whose image does not decode are skipped and counted; a shard that cannot be read, or is cut
   short, gets no file (exit status 1; the rerun retries it). Same inputs and settings on the same
   software give byte-identical files whatever the task split.
2. `cluster`, one process: spherical k-means (faiss, seeded) on a sample of the descriptors, then
   every descriptor's nearest centroid -> `DIR/clusters.npz` (dedup_cluster.py).
3. `search`, one process: within each cluster, every pair of similarity above `--threshold`
   (exact, faiss range search on inner products) -> connected groups; each group keeps its
   smallest key, the rest go to `DIR/blocklist.txt` (sorted, one per line), with `DIR/groups.txt`
   (every group), `DIR/report.json` (counts, group-size histogram, settings) and
   `DIR/examples/group-NNN.png` (dedup_search.py, dedup_report.py). Pairs split across two
   clusters are missed unless `--probe N` also searches each descriptor's next N-1 clusters.
`all` runs the three on one machine (as task 0 of 1).

Descriptors (descriptors.py): `sscd` (default) needs the authors' weights as a local file, their
TorchScript export or their torchvision-layout state dict (sscd.py); `thumbnail` needs nothing
(a 16x16 per-channel-standardised thumbnail: exact and lightly edited copies only). `--threshold`
defaults to 0.5 for sscd and 0.85 for thumbnail.

`--shards` takes training's data.shards syntax: brace ranges, `::`-separated lists, `file:` and
`pipe:` urls; relative paths are from the repo root, as in training, while `--out` is from the
current directory. Give the same `--shards` to every stage.

Exit status: 0 done; 1 some shards could not be read (the others are done; rerun to retry them); 2
usage error (the message names the option or file).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sd3train.curation.tasks import UsageError, resolve_task

PROG = "sd3train-dedup"
USAGE_EXIT_CODE = 2
STAGES = ("embed", "cluster", "search", "all")
DEFAULT_CLUSTERS = 16_000  # SD3's
DEFAULT_TRAIN_SAMPLES = 1_000_000


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--shards", required=True, help="input shards, as training's data.shards "
                        "(brace ranges, '::' lists, file:, pipe:)")


def _embed_options(parser: argparse.ArgumentParser, tasks: bool) -> None:
    parser.add_argument("--descriptor", choices=("sscd", "thumbnail"), default="sscd",
                        help="sscd (needs --weights) or thumbnail (no weights; light edits only)")
    parser.add_argument("--weights", default=None, help="SSCD weights: TorchScript file or authors' state dict")
    parser.add_argument("--preprocessing", choices=("small288", "skew320"), default="small288",
                        help="SSCD input: short side to 288 (default) or a 320x320 square")
    parser.add_argument("--batch-size", type=int, default=64, help="images per descriptor batch (default 64)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where SSCD runs (auto: cuda when available)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="image decoding threads (default: cores, at most 8)")
    if tasks:
        parser.add_argument("--task-index", type=int, default=None,
                            help="this task's index (default: from SLURM_ARRAY_TASK_ID, else 0)")
        parser.add_argument("--num-tasks", type=int, default=None,
                            help="tasks sharing the shards (default: SLURM_ARRAY_TASK_COUNT, else 1)")


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS,
                        help=f"k-means clusters (default {DEFAULT_CLUSTERS}, SD3's; capped at samples/39)")
    parser.add_argument("--train-samples", type=int, default=DEFAULT_TRAIN_SAMPLES,
                        help=f"descriptors k-means trains on (default {DEFAULT_TRAIN_SAMPLES:,}, or all)")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")


def _search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, default=None,
                        help="similarity above which two images are duplicates, between 0 and 1 "
                        "(default 0.5 sscd, 0.85 thumbnail)")
    parser.add_argument("--probe", type=int, default=1,
                        help="clusters searched per descriptor (default 1: its own)")
    parser.add_argument("--examples", type=int, default=8, help="example group grids to draw (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Near-duplicate removal: SSCD descriptors, k-means, per-cluster "
                     "range search -> blocklist.txt for data.blocklist.",
                     epilog=f"example: {PROG} all --out /data/dedup --shards '/data/src/{{00000..00999}}.tar' "
                     "--weights sscd_disc_mixup.torchscript.pt")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(STAGES) + "}")
    embed = stages.add_parser("embed", help="descriptors per shard (one Slurm array task each)")
    cluster = stages.add_parser("cluster", help="k-means over all descriptors")
    search = stages.add_parser("search", help="pairs within clusters -> blocklist.txt, report.json")
    every = stages.add_parser("all", help="embed, cluster and search on this machine")
    for sub in (embed, cluster, search, every):
        _common(sub)
    _embed_options(embed, tasks=True)
    _embed_options(every, tasks=False)
    for sub in (cluster, every):
        _cluster_options(sub)
    for sub in (search, every):
        _search_options(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    from sd3train.curation import dedup_stages as stages

    out = Path(args.out)
    # Every stage's options are checked before the first runs: `all` must not embed for hours first.
    if args.stage in ("cluster", "all"):
        stages.check_cluster_options(args.clusters, args.train_samples)
    if args.stage in ("search", "all"):
        stages.check_search_options(args.threshold, args.probe, args.examples)
    if args.stage in ("embed", "all"):
        task_index, num_tasks = resolve_task(args.task_index, args.num_tasks) if args.stage == "embed" else (0, 1)
        settings = stages.DescriptorSettings(args.descriptor, args.weights, args.preprocessing, args.device)
        code = stages.embed_stage(args.shards, out, settings, args.batch_size, args.threads, task_index, num_tasks)
        if code != 0 or args.stage == "embed":
            return code
    if args.stage in ("cluster", "all"):
        stages.cluster_stage(args.shards, out, args.clusters, args.train_samples, args.seed)
    if args.stage in ("search", "all"):
        stages.search_stage(args.shards, out, args.threshold, args.probe, args.examples)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        return USAGE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
