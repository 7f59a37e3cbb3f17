#!/usr/bin/env bash
# Step 1 (SFT) through the shared launcher. Settings come from the environment (MODEL_SIZE, NGPUS,
# MODEL, DATA, OUTPUT_DIR, ZERO_STAGE, OFFLOAD, HOSTFILE, DRY_RUN; see launch/run.sh); flags pass through.
#   MODEL=facebook/opt-1.3b DATA=data/sft.jsonl OUTPUT_DIR=out/sft bash step1_sft/run.sh --num_train_epochs 2
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch/run.sh" sft "$@"
