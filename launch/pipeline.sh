#!/usr/bin/env bash
# The whole pipeline: step 1 (SFT) -> step 2 (reward model) -> step 3 (PPO), and DPO from the SFT model.
# Each step's output feeds the next; a step whose output is already complete is skipped, so a rerun
# after a failure continues where it stopped. Stops with a clear message when a step fails.
#
# Environment:
#   MODEL         base causal LM (hub name or directory)                      required
#   SFT_DATA      step-1 data (space-separated files)                         required
#   PREF_DATA     preference pairs for step 2 and DPO                         required
#   PROMPT_DATA   prompts for PPO                                             default: PREF_DATA
#   WORK_DIR      outputs: WORK_DIR/{sft,reward,ppo,dpo}, logs in WORK_DIR/logs   default: out
#   STEPS         which steps to run, in order                                default: "sft reward ppo dpo"
#   SFT_ARGS, REWARD_ARGS, PPO_ARGS, DPO_ARGS   extra flags per step (word-split)
#   MODEL_SIZE, NGPUS, HOSTFILE, ZERO_STAGE, OFFLOAD, DRY_RUN   as in launch/run.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${MODEL:?set MODEL to the base model}" "${SFT_DATA:?set SFT_DATA}" "${PREF_DATA:?set PREF_DATA}"
PROMPT_DATA="${PROMPT_DATA:-$PREF_DATA}"
WORK_DIR="${WORK_DIR:-out}"
STEPS="${STEPS:-sft reward ppo dpo}"
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
  local t0; t0=$(date +%s)
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
  echo "[pipeline] $name: done -> $check ($(( $(date +%s) - t0 ))s)"
}

for step in $STEPS; do
  case "$step" in
    sft)    MODEL="$MODEL" DATA="$SFT_DATA" OUTPUT_DIR="$WORK_DIR/sft" \
              run_step sft "$WORK_DIR/sft" sft "${SFT_ARGS:-}" ;;
    reward) MODEL="$WORK_DIR/sft" DATA="$PREF_DATA" OUTPUT_DIR="$WORK_DIR/reward" \
              run_step reward "$WORK_DIR/reward" reward "${REWARD_ARGS:-}" ;;
    ppo)    ACTOR="$WORK_DIR/sft" CRITIC="$WORK_DIR/reward" DATA="$PROMPT_DATA" OUTPUT_DIR="$WORK_DIR/ppo" \
              run_step ppo "$WORK_DIR/ppo/actor" ppo "${PPO_ARGS:-}" ;;
    dpo)    MODEL="$WORK_DIR/sft" DATA="$PREF_DATA" OUTPUT_DIR="$WORK_DIR/dpo" \
              run_step dpo "$WORK_DIR/dpo" dpo "${DPO_ARGS:-}" ;;
    *) echo "[pipeline] error: unknown step '$step' in STEPS (sft reward ppo dpo)" >&2; exit 2 ;;
  esac
done
echo "[pipeline] all steps complete in $WORK_DIR"
