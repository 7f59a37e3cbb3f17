#!/usr/bin/env bash
# Step 3 on this repository's tiny CPU setting: 2 DeepSpeed ranks (gloo), the shipped prompts, and the
# learning rates with which the tiny llama's reward rises within ~30 steps (tests/test_ppo_e2e.py).
#   ACTOR=out/sft CRITIC=out/reward bash step3_ppo/run_tiny_cpu.sh [--max_steps 60 ...]
# Environment (defaults): ACTOR (out/sft), CRITIC (out/reward), DATA (data/prompts.jsonl),
# EVAL_DATA (data/heldout_prompts.jsonl), OUTPUT_DIR (out/ppo), NGPUS (2), MAX_STEPS (30),
# ACTOR_LR (1e-3), CRITIC_LR (1e-3), MASTER_PORT (29500). Flags after the script win.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec deepspeed --num_gpus "${NGPUS:-2}" --master_port "${MASTER_PORT:-29500}" step3_ppo/main.py \
  --actor_model_name_or_path "${ACTOR:-out/sft}" --critic_model_name_or_path "${CRITIC:-out/reward}" \
  --data_path "${DATA:-data/prompts.jsonl}" --eval_data_path "${EVAL_DATA:-data/heldout_prompts.jsonl}" \
  --output_dir "${OUTPUT_DIR:-out/ppo}" --max_steps "${MAX_STEPS:-30}" \
  --actor_learning_rate "${ACTOR_LR:-1e-3}" --critic_learning_rate "${CRITIC_LR:-1e-3}" \
  --per_device_generation_batch_size 16 --per_device_training_batch_size 8 --max_answer_seq_len 16 "$@"
