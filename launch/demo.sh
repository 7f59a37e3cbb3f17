#!/usr/bin/env bash
# The CPU demo: the whole pipeline on shipped data with 2 DeepSpeed ranks, in a few minutes on 2 cores.
#   bash launch/demo.sh            (outputs in DEMO_DIR, default ./demo_out)
# 1. builds a tiny Llama-style model and tokenizer from text in data/ (no download),
# 2. runs launch/pipeline.sh: SFT -> reward model -> PPO, and DPO from the SFT model,
# 3. prints a before/after table on held-out prompts (reward score, rate of the preferred "warm"
#    adjective, EOS rate, well-formed rate, sample answers) and writes DEMO_DIR/report.png.
# A rerun skips the steps whose output is complete; delete DEMO_DIR to start over.
#
#   bash launch/demo.sh grpo       the verifiable-reward demo (outputs in DEMO_DIR/count): SFT on the shipped
# counting task (data/make_count_data.py, answers right 40% of the time), then GRPO with only rule-based
# rewards (exact match of the count + answer format; no critic, no reward model, no reference model), and
# the held-out exact match before and after.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
t_setup=$(date +%s)
bash launch/setup.sh
echo "[demo] setup (install check): $(( $(date +%s) - t_setup ))s"
PY="${PYTHON:-python3}"
DEMO_DIR="${DEMO_DIR:-demo_out}"
mkdir -p "$DEMO_DIR"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export MODEL_SIZE=tiny NGPUS="${NGPUS:-2}"
start=$(date +%s)
lap=$start
phase() {  # phase NAME: print the time since the previous phase
  local now; now=$(date +%s); echo "[demo] $1: $(( now - lap ))s"; lap=$now
}

if [ ! -f "$DEMO_DIR/base/config.json" ]; then
  "$PY" -m utils.tiny --family llama --output_dir "$DEMO_DIR/base" --seed 0 >/dev/null 2>&1
fi
phase "tiny base model"

if [ "${1:-}" = "grpo" ]; then
  RULES="utils.reward_funcs:exact_match utils.reward_funcs:answer_format"
  MODEL="$DEMO_DIR/base" SFT_DATA=data/count_sft.jsonl PROMPT_DATA=data/count_prompts.jsonl WORK_DIR="$DEMO_DIR/count" \
  STEPS="sft ppo" ALGO=grpo REWARD_FUNCS="$RULES" \
  SFT_ARGS="${SFT_ARGS:---learning_rate 3e-3 --num_train_epochs 15 --eval_interval 100 --log_interval 20}" \
  PPO_ARGS="${GRPO_ARGS:---max_answer_seq_len 10 --per_device_generation_batch_size 8 --per_device_training_batch_size 32 --kl_coef 0 --max_steps 30 --eval_data_path data/count_heldout.jsonl --eval_interval 10}" \
    bash launch/pipeline.sh
  echo
  echo "== held-out lists (never in training): before (SFT) and after GRPO with rule-based rewards only =="
  # shellcheck disable=SC2086
  "$PY" launch/compare.py --models sft="$DEMO_DIR/count/sft" grpo="$DEMO_DIR/count/grpo/actor" \
    --prompts data/count_heldout.jsonl --reward_funcs $RULES --max_new_tokens 10 --samples 4 \
    --json "$DEMO_DIR/count/results.json" 2>/dev/null
  "$PY" launch/report.py --runs sft="$DEMO_DIR/count/sft" grpo="$DEMO_DIR/count/grpo" --out "$DEMO_DIR/count/report.png"
  echo "demo finished in $(( $(date +%s) - start ))s; models in $DEMO_DIR/count/{sft,grpo/actor}"
  exit 0
fi

# Every step runs with its defaults (learning rates scaled to the model's size, utils/lr.py) and only
# the lengths below: SFT trains a random-init model (hidden 64, 2 layers), so it needs many epochs;
# PPO gets a number of steps. The rest is held-out evaluation data and logging.
MODEL="$DEMO_DIR/base" SFT_DATA=data/sft.jsonl PREF_DATA=data/preference.jsonl PROMPT_DATA=data/prompts.jsonl \
WORK_DIR="$DEMO_DIR" \
SFT_ARGS="${SFT_ARGS:---num_train_epochs 30 --eval_interval 200 --log_interval 50}" \
REWARD_ARGS="${REWARD_ARGS:---eval_data_path data/heldout_preference.jsonl --log_interval 6 --eval_interval 12}" \
PPO_ARGS="${PPO_ARGS:---max_steps 24 --eval_data_path data/heldout_prompts.jsonl}" \
DPO_ARGS="${DPO_ARGS:---eval_data_path data/heldout_preference.jsonl --log_interval 6 --eval_interval 18}" \
  bash launch/pipeline.sh
phase "pipeline (SFT, reward model, PPO, DPO)"

echo
echo "== held-out prompts (nouns never seen in training): before (SFT) and after (PPO, DPO) =="
"$PY" launch/compare.py --models sft="$DEMO_DIR/sft" ppo="$DEMO_DIR/ppo/actor" dpo="$DEMO_DIR/dpo" \
  --prompts data/heldout_prompts.jsonl --reward_model "$DEMO_DIR/reward" \
  --preferred great,wonderful,lovely,amazing,delightful,brilliant --form '^The \w+ is \w+\.$' \
  --max_new_tokens 16 --samples 4 --json "$DEMO_DIR/results.json" 2>/dev/null
phase "held-out comparison"
"$PY" launch/report.py --runs sft="$DEMO_DIR/sft" reward="$DEMO_DIR/reward" ppo="$DEMO_DIR/ppo" dpo="$DEMO_DIR/dpo" \
  --out "$DEMO_DIR/report.png"
phase "report"
echo "demo finished in $(( $(date +%s) - start ))s; models in $DEMO_DIR/{sft,reward,ppo/actor,dpo}, curves in $DEMO_DIR/report.png"
