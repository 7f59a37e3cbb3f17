#!/usr/bin/env bash
# The whole pipeline: step 1 (SFT) -> step 2 (reward model) -> step 3 (PPO, or a critic-free ALGO), and DPO
# from the SFT model. Each step's output feeds the next. A step whose output directory holds a finished run
# of the same inputs (its done.json: models, data files, flags) is skipped; one made from other inputs is
# refused with a line naming the input, or run again with FORCE=1; an unfinished one continues from its
# last checkpoint (--resume). So a rerun after a failure or a stop continues where it stopped.
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
#   FORCE=1       rerun steps whose inputs changed (replacing their finished output)
#   MODEL_SIZE, NGPUS, HOSTFILE, NUM_NODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, ZERO_STAGE, OFFLOAD,
#   DRY_RUN       as in launch/run.sh
# SIGTERM, SIGINT or SIGUSR1 stops the running step (launch/run.sh: checkpoint, then exit) and the
# pipeline, which exits 143; the same command continues it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
need() {  # need NAME MESSAGE: a missing setting is one `error:` line and exit 2 (bash's ${VAR:?} exited 1)
  [ -n "${!1:-}" ] || { echo "error: $2" >&2; exit 2; }
}
need MODEL "set MODEL to the base model"
need SFT_DATA "set SFT_DATA"
WORK_DIR="${WORK_DIR:-out}"
STEPS="${STEPS:-sft reward ppo dpo}"
ALGO="${ALGO:-ppo}"
# With reward functions a reward model scores too only when asked; PPO trains step 2 anyway (its critic).
USE_REWARD_MODEL="${USE_REWARD_MODEL:-$([ -n "${REWARD_FUNCS:-}" ] && echo 0 || echo 1)}"
skip_reward() { [ "$ALGO" != "ppo" ] && [ "$USE_REWARD_MODEL" = "0" ]; }
for step in $STEPS; do  # preference pairs are needed only by the steps that read them
  if [ "$step" = dpo ] || { [ "$step" = reward ] && ! skip_reward; }; then
    need PREF_DATA "set PREF_DATA (step $step reads preference pairs)"
  fi
done
PROMPT_DATA="${PROMPT_DATA:-${PREF_DATA:-}}"
STEP3_DIR="$WORK_DIR/$([ "$ALGO" = ppo ] && echo ppo || echo "$ALGO")"
export ALGO
mkdir -p "$WORK_DIR/logs"
export RLHF_WATCH_PIDS="${RLHF_WATCH_PIDS:+$RLHF_WATCH_PIDS }$(hostname):$$"

STEP_PID=""
STOPPED=""
stop() {
  STOPPED="$1"
  # SIGTERM whatever arrived: a background run.sh ignores SIGINT (bash without job control). It stops
  # the job and waits for it.
  [ -n "$STEP_PID" ] && kill -TERM "$STEP_PID" 2>/dev/null || true
}
trap 'stop TERM' TERM
trap 'stop INT' INT
trap 'stop USR1' USR1

run_step() {  # run_step NAME STEP_KIND EXTRA_ARGS; environment set by the caller
  local name="$1" kind="$2" extra="$3" log="$WORK_DIR/logs/$1.log" rc=0 status flags=()
  if [ "${DRY_RUN:-0}" = "1" ]; then
    # shellcheck disable=SC2086
    bash "$HERE/run.sh" "$kind" $extra
    return 0
  fi
  # shellcheck disable=SC2086
  status=$(STATUS=1 bash "$HERE/run.sh" "$kind" $extra 2>&1) || rc=$?
  case "$rc" in
    0) echo "[pipeline] $name: $status; skipping"
       return 0 ;;
    1) flags=(--resume)  # continues an unfinished run; starts fresh (saying so) when there is none
       echo "[pipeline] $name: running ($status; log: $log)" ;;
    3) if [ "${FORCE:-0}" != "1" ]; then
         echo "[pipeline] error: $name: $status; set FORCE=1 to run it again" >&2
         exit 2
       fi
       flags=(--overwrite_output_dir)
       echo "[pipeline] $name: $status; FORCE=1: running it again (log: $log)" ;;
    4) if [ "${FORCE:-0}" != "1" ]; then  # a stopped FORCE=1 rerun: continue it, not start over
         echo "[pipeline] error: $name: $status; set FORCE=1 to continue it" >&2
         exit 2
       fi
       flags=(--resume --overwrite_output_dir)
       echo "[pipeline] $name: $status; FORCE=1: continuing it (log: $log)" ;;
    *) echo "[pipeline] error: $name: $status" >&2
       exit 2 ;;
  esac
  if [ -n "$STOPPED" ]; then  # the signal came while the status check ran: bash ran the trap only after it
    echo "[pipeline] stopped by SIG$STOPPED before step '$name' started" >&2
    echo "[pipeline] run the same command again to continue" >&2
    exit 143
  fi
  rc=0
  local t0; t0=$(date +%s)
  # shellcheck disable=SC2086
  echo "[pipeline] $(date '+%Y-%m-%d %H:%M:%S') $name: run.sh $kind ${flags[*]}" >>"$log"
  bash "$HERE/run.sh" "$kind" $extra "${flags[@]}" >>"$log" 2>&1 &  # appended: a rerun keeps the earlier attempt
  STEP_PID=$!
  if [ -n "$STOPPED" ]; then kill -TERM "$STEP_PID" 2>/dev/null || true; fi  # a signal between `&` and here
  while kill -0 "$STEP_PID" 2>/dev/null; do
    wait "$STEP_PID" && rc=0 || rc=$?  # a trapped signal ends `wait` early: wait again
  done
  STEP_PID=""
  if [ -n "$STOPPED" ] && [ "$rc" -eq 0 ]; then
    echo "[pipeline] $name: done -> $WORK_DIR/$name (it had finished when SIG$STOPPED reached it)"
    echo "[pipeline] stopped by SIG$STOPPED before the next step; run the same command again to continue" >&2
    exit 143
  fi
  if [ -n "$STOPPED" ]; then
    echo "[pipeline] stopped by SIG$STOPPED during step '$name' (exit $rc); last lines of $log:" >&2
    tail -n 3 "$log" >&2
    echo "[pipeline] run the same command again to continue" >&2
    exit 143
  fi
  if [ "$rc" -ne 0 ]; then
    echo "[pipeline] error: step '$name' failed (exit $rc); last lines of $log:" >&2
    tail -n 15 "$log" >&2
    exit 1
  fi
  echo "[pipeline] $name: done -> $WORK_DIR/$name ($(( $(date +%s) - t0 ))s)"
}

for step in $STEPS; do
  [ -n "$STOPPED" ] && exit 143
  case "$step" in
    sft)    MODEL="$MODEL" DATA="$SFT_DATA" OUTPUT_DIR="$WORK_DIR/sft" run_step sft sft "${SFT_ARGS:-}" ;;
    reward) if skip_reward; then
              echo "[pipeline] reward: skipped (ALGO=$ALGO scores answers with REWARD_FUNCS only)"
              continue
            fi
            MODEL="$WORK_DIR/sft" DATA="$PREF_DATA" OUTPUT_DIR="$WORK_DIR/reward" \
              run_step reward reward "${REWARD_ARGS:-}" ;;
    ppo)    critic="" rm_dir=""  # PPO: the critic starts from step 2, whose model is also the default reward model
            [ "$ALGO" = "ppo" ] && critic="$WORK_DIR/reward"
            { [ "$ALGO" != "ppo" ] || [ -n "${REWARD_FUNCS:-}" ]; } && [ "$USE_REWARD_MODEL" = "1" ] \
              && rm_dir="$WORK_DIR/reward"
            ACTOR="$WORK_DIR/sft" CRITIC="$critic" REWARD="$rm_dir" DATA="$PROMPT_DATA" OUTPUT_DIR="$STEP3_DIR" \
              run_step "$ALGO" ppo "${PPO_ARGS:-}" ;;
    dpo)    MODEL="$WORK_DIR/sft" DATA="$PREF_DATA" OUTPUT_DIR="$WORK_DIR/dpo" run_step dpo dpo "${DPO_ARGS:-}" ;;
    *) echo "[pipeline] error: unknown step '$step' in STEPS (sft reward ppo dpo)" >&2; exit 2 ;;
  esac
done
echo "[pipeline] all steps complete in $WORK_DIR"
