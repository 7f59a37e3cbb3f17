#!/usr/bin/env bash
# DPO through the shared launcher. Settings come from the environment (MODEL_SIZE, NGPUS, MODEL = the
# step-1 output, DATA = preference file(s), OUTPUT_DIR, ZERO_STAGE, OFFLOAD, HOSTFILE, DRY_RUN; see
# launch/run.sh); flags pass through and win (e.g. --beta, --loss_type, --rpo_alpha, --precompute_ref_logprobs).
#   MODEL=out/sft DATA=data/preference.jsonl OUTPUT_DIR=out/dpo bash dpo/run.sh --beta 0.2
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch/run.sh" dpo "$@"
