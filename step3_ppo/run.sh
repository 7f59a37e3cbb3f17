#!/usr/bin/env bash
# Step 3 (PPO) through the shared launcher. Settings come from the environment (MODEL_SIZE, NGPUS, ACTOR,
# CRITIC, DATA, OUTPUT_DIR, ZERO_STAGE, OFFLOAD, HOSTFILE, DRY_RUN; see launch/run.sh); flags pass through.
#   ACTOR=out/sft CRITIC=out/reward DATA=data/prompts.jsonl OUTPUT_DIR=out/ppo bash step3_ppo/run.sh --max_steps 200
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch/run.sh" ppo "$@"
