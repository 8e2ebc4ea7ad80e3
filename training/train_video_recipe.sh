#!/usr/bin/env bash
# The clip-trained shapes model (avis_llamacpp/data/shapes-qwen-video/) in one command: six stages on one CPU
# thread from the bundled image model, then the bundle's policy and tau, its evaluation and its benchmark.
#
#     bash training/train_video_recipe.sh [WORK_DIR]        # about 9.3 hours on one thread of a 2-core machine
#
# Needs the dev extra (torch): .venv/bin/pip install -e '.[dev]'. The LR schedules anneal by wall clock
# (--max-minutes), so a faster machine takes more steps: the recipe is reproducible, the weights only on the same
# machine and load. The bundled model's own stage 1 was stopped by hand after 1300 steps of a 110-minute schedule
# (28 minutes); here it is a 28-minute run, whose schedule anneals fully.
set -euo pipefail
W=${1:-/tmp/avis-video-recipe}
PY=.venv/bin/python
mkdir -p "$W"
# stage 1: images and clips, from the bundled image weights (the patch conv split evenly over the two frames)
$PY -m training.train_video_qwen --seed 0 --max-minutes 28 --threads 1 --from avis_llamacpp/data/shapes-qwen \
    --work "$W/s1" --out "$W/s1/out"
# stage 2: traces that list the first and the last frame's shapes for appear / disappear / order, more clips
$PY -m training.train_video_qwen --seed 0 --max-minutes 80 --threads 1 --from "$W/s1/out" --scene-lists \
    --video-share 0.7 --lr 8e-4 --data-offset 20000 --work "$W/s2" --out "$W/s2/out"
# stage 3: half of those traces list the shapes in a random order (other routes for sampled rollouts), fresh items
$PY -m training.train_video_qwen --seed 0 --max-minutes 92 --threads 1 --from "$W/s2/out" --scene-lists \
    --shuffled-lists 0.5 --video-share 0.7 --lr 6e-4 --data-offset 60000 --work "$W/s3" --out "$W/s3/out"
# stage 4: three quarters of the clip batches pruned, mostly by joint KDV, keeping 15-60% of the tokens (the
# range the policy prunes to), at half stage 3's LR, fresh items
$PY -m training.train_video_qwen --seed 0 --max-minutes 95 --threads 1 --from "$W/s3/out" --scene-lists \
    --shuffled-lists 0.5 --video-share 0.7 --lr 3e-4 --prune-prob 0.75 --prune-keep 0.15 0.6 \
    --prune-selectors 0.7 0.15 0.15 --data-offset 100000 --work "$W/s4" --out "$W/s4/out"
# stage 5: the task with quiet stretches (half of the count / colour / direction / moving clips have their shapes off
# screen for whole frame pairs at the start or the end), stage 4's pruning mix and LR, fresh items
$PY -m training.train_video_qwen --seed 0 --max-minutes 110 --threads 1 --from "$W/s4/out" --scene-lists \
    --shuffled-lists 0.5 --video-share 0.7 --lr 3e-4 --prune-prob 0.75 --prune-keep 0.15 0.6 \
    --prune-selectors 0.7 0.15 0.15 --quiet-share 0.5 --no-crowd --data-offset 200000 --work "$W/s5" --out "$W/s5/out"
# stage 6: the task as it is now (a quiet count / colour clip has one busy pair, crowded with 5-6 shapes), stage 5's
# settings, fresh items
$PY -m training.train_video_qwen --seed 0 --max-minutes 125 --threads 1 --from "$W/s5/out" --scene-lists \
    --shuffled-lists 0.5 --video-share 0.7 --lr 3e-4 --prune-prob 0.75 --prune-keep 0.15 0.6 \
    --prune-selectors 0.7 0.15 0.15 --quiet-share 0.5 --data-offset 300000 --work "$W/s6" --out "$W/s6/out"
M="$W/s6/out"
# llama.cpp accuracy on 300 test clips and 300 test images, PyTorch parity on 50 clips (unpruned and rho 0.75)
$PY -m training.eval_video_vlm --model-dir "$M" --n 300 --images 300 --parity 50 --parity-ratio 0.75 \
    --out "$W/eval.json"
# the policy: tau (labelled search: the largest pruning not below unpruned greedy accuracy) and the K map of the
# accuracy - 0.002 x FLOPs objective, on 400 calibration clips (the bundled policy's settings)
$PY -m convert.video_task --split calibration --n 400 --out "$W/cal400"
$PY -m convert.video_task --split test --n 300 --out "$W/test300"
.venv/bin/avis calibrate -m "$M/model.gguf" --mmproj "$M/mmproj.gguf" --items "$W/cal400/items.jsonl" \
    --out "$W/calib" --max-tokens 96 --threads 1 --ray 2 --tolerance 0.0 --lambda 0.002
.venv/bin/avis bench -m "$M/model.gguf" --mmproj "$M/mmproj.gguf" --items "$W/test300/items.jsonl" \
    --policy "$W/calib/policy.gguf" --out "$W/bench" --max-tokens 96 --threads 1 --ray 2
echo "model: $M  policy: $W/calib/policy.gguf  table: $W/bench/table.md"
