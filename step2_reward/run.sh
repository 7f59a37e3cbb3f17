#!/usr/bin/env bash
# Step 2 (reward model) through the shared launcher. Settings come from the environment (MODEL_SIZE, NGPUS,
# MODEL = the step-1 output, DATA = preference file(s), OUTPUT_DIR, ZERO_STAGE, OFFLOAD, HOSTFILE, DRY_RUN;
# see launch/run.sh); flags pass through and win.
#   MODEL=out/sft DATA=data/preference.jsonl OUTPUT_DIR=out/reward bash step2_reward/run.sh --num_train_epochs 1
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch/run.sh" reward "$@"
