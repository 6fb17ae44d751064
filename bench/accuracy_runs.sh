#!/usr/bin/env bash
# Benchmark 4 (accuracy per time): the CPU preset and the usual recipe, launched side by side at
# the same time on the same machine, each with two intra-op threads (passive OpenMP waits), under the same wall-clock budget
# (trainer.max_time). Every epoch's checkpoint is kept; bench/accuracy_vs_time.py then tests each
# on the official test set and prints test accuracy against wall-clock minutes.
#   bash bench/accuracy_runs.sh OUT_DIR BUDGET_MIN PRESET_EPOCHS
set -euo pipefail
out=${1:-/work/runs/issue3}
budget=${2:-40}
epochs=${3:-1}
max_time=$(printf "00:%02d:%02d:00" $((budget / 60)) $((budget % 60)))
# Passive waiting: with spinning OpenMP threads, 2 threads ran ~4x slower than 1 on the busy shared machine.
export PYTHONPATH=src OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE
# Every epoch's checkpoint plus one every 100 steps (for the accuracy-vs-minutes curve).
common=(trainer.max_time="$max_time" callbacks.model_checkpoint.save_top_k=-1 callbacks.progress_bar.refresh_rate=50
  +callbacks.every_100_steps._target_=pytorch_lightning.callbacks.ModelCheckpoint
  +callbacks.every_100_steps.every_n_train_steps=100 +callbacks.every_100_steps.save_top_k=-1
  '+callbacks.every_100_steps.filename="step{step:05d}"' +callbacks.every_100_steps.auto_insert_metric_name=false)

# The CPU preset (tensor data path, ResNet-20, cosine, label smoothing).
nohup python train.py experiment=resnet20_cpu trainer.max_epochs="$epochs" "${common[@]}" \
  hydra.run.dir="$out/resnet20_cpu" +callbacks.every_100_steps.dirpath="$out/resnet20_cpu/step_checkpoints" >"$out/resnet20_cpu.out" 2>&1 &
# The usual recipe: torchvision ResNet-18 at 32x32, per-sample transforms in 2 DataLoader workers,
# SGD lr 0.001, momentum 0.9, batch 128, no schedule, no weight decay.
nohup python train.py model=resnet18 stage=scratch data.loader=torchvision data.num_workers=2 data.batch_size=128 \
  optimizer.lr=0.001 optimizer.nesterov=false optimizer.weight_decay=0 scheduler=none trainer=cpu \
  trainer.max_epochs=1000 "${common[@]}" hydra.run.dir="$out/usual_resnet18" \
  +callbacks.every_100_steps.dirpath="$out/usual_resnet18/step_checkpoints" >"$out/usual_resnet18.out" 2>&1 &
wait
