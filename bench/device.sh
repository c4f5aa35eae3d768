#!/usr/bin/env bash
# The rollout table on a lent GPU machine, in bf16, for the untrained tiny and small Mllamas (under 8 minutes), then
# two sharded (FSDP2) PPO updates of the tiny Mllama on the GPU (under 5 minutes):
#     bash bench/device.sh            # on the GPU machine, from the repository root
#     bash bench/device.sh --device cpu --dtype float32 --episodes 4 --num-envs 2   # smoke test, here
# Extra arguments go to bench/rollout.py. Output: the printed table, and $OUT/rollout_<device>.txt when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
for ((i = 1; i <= $#; i++)); do
    if [[ "${!i}" == "--device" ]]; then j=$((i + 1)); device="${!j}"; fi
done
if [[ "$device" == cuda ]]; then
    # What the issue pins; the machine has no network beyond its package mirror, so a failed install stops here.
    pip install -q torch==2.13.0
    pip install -q -e .
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
python - "$device" <<'PY'
import sys, torch
device = sys.argv[1]
print(f"torch {torch.__version__}, device {device}", "available" if device == "cpu" or torch.cuda.is_available() else "MISSING")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
PY
log="${OUT:-/tmp}/rollout_${device}.txt"
# 0 threads: torch's own choice (the machine's cores are not shared there); each model well under 4 minutes.
timeout 420 python -m bench.rollout --models tiny,small --device "$device" --dtype bfloat16 --threads 0 "$@" \
    2>&1 | tee "$log"
if [[ "$device" == cuda ]]; then
    # The sharded path on the GPU: FSDP2 with bf16 mixed precision (configs/strategies/fsdp.yaml), two PPO updates of
    # the tiny Mllama with a checkpoint. One process: NCCL refuses two ranks on one GPU; the two-process path is
    # tests/test_sharded.py on CPU (gloo).
    run_dir="${OUT:-/tmp}/fsdp_gpu"
    timeout 300 lit-sftrl fit --config configs/gp_l_ppo.yaml --config configs/strategies/fsdp.yaml \
        --trainer.devices 1 --trainer.strategy.init_args.data_parallel_size 1 --trainer.max_epochs 2 \
        --data.init_args.num_envs 4 --data.init_args.rollout_steps 16 --model.init_args.ppo.minibatch_size 16 \
        --trainer.limit_val_batches 0 --trainer.num_sanity_val_steps 0 --trainer.default_root_dir "$run_dir" \
        --overwrite true 2>&1 | tail -n 5 | tee "${OUT:-/tmp}/fsdp_gpu.txt"
    ls "$run_dir/checkpoints/last.ckpt" | tee -a "${OUT:-/tmp}/fsdp_gpu.txt"
fi
