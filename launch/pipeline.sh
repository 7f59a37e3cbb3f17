#!/usr/bin/env bash
# The whole pipeline: step 1 (SFT) -> step 2 (reward model) -> step 3 (PPO, or a critic-free ALGO), and DPO
# from the SFT model.
# Each step's output feeds the next; a step whose output is already complete is skipped, so a rerun
# after a failure continues where it stopped. Stops with a clear message when a step fails.
#
# Environment:
#   MODEL         base causal LM (hub name or directory)                      required
#   SFT_DATA      step-1 data (space-separated files)                         required
#   PREF_DATA     preference pairs for step 2 and DPO                         required by those steps
#   PROMPT_DATA   prompts for step 3                                          default: PREF_DATA
#   WORK_DIR      outputs: WORK_DIR/{sft,reward,ppo,dpo}, logs in WORK_DIR/logs   default: out
#   STEPS         which steps to run, in order                                default: "sft reward ppo dpo"
#   ALGO          step 3: ppo, or grpo dr_grpo rloo reinforce_pp reinforce_pp_baseline (no critic; output in
#                 WORK_DIR/ALGO)                                              default: ppo
#   REWARD_FUNCS, REWARD_WEIGHTS   rule-based rewards for step 3 (launch/run.sh). With a critic-free ALGO
#                 and REWARD_FUNCS no reward model is needed and step 2 is skipped
#   USE_REWARD_MODEL=1   also score step 3's answers with step 2's model when REWARD_FUNCS are given
#   SFT_ARGS, REWARD_ARGS, PPO_ARGS, DPO_ARGS   extra flags per step (word-split)
#   MODEL_SIZE, NGPUS, HOSTFILE, ZERO_STAGE, OFFLOAD, DRY_RUN   as in launch/run.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${MODEL:?set MODEL to the base model}" "${SFT_DATA:?set SFT_DATA}"
WORK_DIR="${WORK_DIR:-out}"
STEPS="${STEPS:-sft reward ppo dpo}"
ALGO="${ALGO:-ppo}"
# With reward functions a reward model scores too only when asked; PPO trains step 2 anyway (its critic).
USE_REWARD_MODEL="${USE_REWARD_MODEL:-$([ -n "${REWARD_FUNCS:-}" ] && echo 0 || echo 1)}"
skip_reward() { [ "$ALGO" != "ppo" ] && [ "$USE_REWARD_MODEL" = "0" ]; }
for step in $STEPS; do  # preference pairs are needed only by the steps that read them
  if [ "$step" = dpo ] || { [ "$step" = reward ] && ! skip_reward; }; then
    : "${PREF_DATA:?set PREF_DATA (step $step reads preference pairs)}"
  fi
done
PROMPT_DATA="${PROMPT_DATA:-${PREF_DATA:-}}"
STEP3_DIR="$WORK_DIR/$([ "$ALGO" = ppo ] && echo ppo || echo "$ALGO")"
export ALGO
mkdir -p "$WORK_DIR/logs"

complete() {  # a saved Hugging Face model directory with its args.json
  [ -f "$1/config.json" ] && [ -f "$1/args.json" ] && compgen -G "$1/*.safetensors" >/dev/null
}

run_step() {  # run_step NAME OUTPUT_CHECK_DIR STEP_KIND EXTRA_ARGS; environment set by the caller
  local name="$1" check="$2" kind="$3" extra="$4" log="$WORK_DIR/logs/$1.log" rc=0
  if [ "${DRY_RUN:-0}" != "1" ] && complete "$check"; then
    echo "[pipeline] $name: $check is complete, skipping"
    return 0
  fi
  echo "[pipeline] $name: running (log: $log)"
  # shellcheck disable=SC2086
  bash "$HERE/run.sh" "$kind" $extra >"$log" 2>&1 || rc=$?
  if [ "${DRY_RUN:-0}" = "1" ]; then
    cat "$log"
    return 0
  fi
  if [ "$rc" -ne 0 ] || ! complete "$check"; then
    echo "[pipeline] error: step '$name' failed (exit $rc); last lines of $log:" >&2
    tail -n 15 "$log" >&2
    exit 1
  fi
  echo "[pipeline] $name: done -> $check"
}

for step in $STEPS; do
  case "$step" in
    sft)    MODEL="$MODEL" DATA="$SFT_DATA" OUTPUT_DIR="$WORK_DIR/sft" \
              run_step sft "$WORK_DIR/sft" sft "${SFT_ARGS:-}" ;;
    reward) if skip_reward; then
              echo "[pipeline] reward: skipped (ALGO=$ALGO scores answers with REWARD_FUNCS only)"
              continue
            fi
            MODEL="$WORK_DIR/sft" DATA="$PREF_DATA" OUTPUT_DIR="$WORK_DIR/reward" \
              run_step reward "$WORK_DIR/reward" reward "${REWARD_ARGS:-}" ;;
    ppo)    critic="" rm_dir=""  # PPO: the critic starts from step 2, whose model is also the default reward model
            [ "$ALGO" = "ppo" ] && critic="$WORK_DIR/reward"
            { [ "$ALGO" != "ppo" ] || [ -n "${REWARD_FUNCS:-}" ]; } && [ "$USE_REWARD_MODEL" = "1" ] \
              && rm_dir="$WORK_DIR/reward"
            ACTOR="$WORK_DIR/sft" CRITIC="$critic" REWARD="$rm_dir" DATA="$PROMPT_DATA" OUTPUT_DIR="$STEP3_DIR" \
              run_step "$ALGO" "$STEP3_DIR/actor" ppo "${PPO_ARGS:-}" ;;
    dpo)    MODEL="$WORK_DIR/sft" DATA="$PREF_DATA" OUTPUT_DIR="$WORK_DIR/dpo" \
              run_step dpo "$WORK_DIR/dpo" dpo "${DPO_ARGS:-}" ;;
    *) echo "[pipeline] error: unknown step '$step' in STEPS (sft reward ppo dpo)" >&2; exit 2 ;;
  esac
done
echo "[pipeline] all steps complete in $WORK_DIR"
