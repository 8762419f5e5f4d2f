#!/usr/bin/env bash
# Fig. 3 (synthetic) as one SLURM job array, then its table:
# 7 objectives x 4 deltas x 3 seeds = 84 jobs, one GPU and at most 60 minutes each, 32 at a time.
#   scripts/launch_slurm_example.sh <partition> [more Hydra overrides, e.g. trainer.max_epochs=100]
# Data-parallel jobs: add trainer=ddp trainer.devices=4 (the launcher then asks for 4 GPUs and
# 4 tasks per job). Keep this shell alive (tmux): it waits for the array, then aggregates; the jobs
# run on regardless, and `python -m kd.aggregate logs/fig3/slurm` can be run at any time.
set -euo pipefail
cd "$(dirname "$0")/.."
partition=${1:?usage: $0 <partition> [hydra overrides...]}
shift
sweep=logs/fig3/slurm  # a fixed folder: launching again resumes every job from its last checkpoint

.venv/bin/python -m kd.train -m hydra/launcher=slurm hydra.sweep.dir="$sweep" \
  hydra.launcher.partition="$partition" hydra.launcher.timeout_min=60 hydra.launcher.array_parallelism=32 \
  experiment=fig3_synthetic trainer=gpu logger=wandb logger.wandb.group=fig3-slurm \
  objective=ce,ls,kd_sim,kd_pt,kd_pt_sim,kd,kd_topk data.delta=0.5,1.0,2.0,4.0 seed=0,1,2 "$@" \
  || echo "[kd] some jobs failed; the table below lists them" >&2

.venv/bin/python -m kd.aggregate "$sweep" --by objective,data.delta --out results/fig3/slurm.csv
