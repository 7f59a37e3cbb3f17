#!/usr/bin/env bash
# The one launcher behind every step's run.sh.
#
#   bash launch/run.sh STEP [extra flags...]        STEP: sft | reward | ppo | dpo
#
# Environment (all optional):
#   MODEL_SIZE   preset row of launch/presets.sh (125m 350m 1.3b 7b 13b 70b tiny); default 1.3b
#   NGPUS        GPUs per node; detected with nvidia-smi when unset (2 CPU ranks without a GPU)
#   HOSTFILE     DeepSpeed hostfile for several nodes ("host slots=8" per line), started from this node
#                over ssh (pdsh); NNODES is read from it
#   NUM_NODES, NODE_RANK, MASTER_ADDR   several nodes without ssh: run this script on every node with the
#                same NUM_NODES, MASTER_ADDR (node 0's address) and MASTER_PORT and its own NODE_RANK
#   GPU_MEM_GB   memory per GPU used by the ZeRO table (default 80)
#   ZERO_STAGE, OFFLOAD=0|1   override the table's choice
#   MODEL        model to start from (sft, reward, dpo); ACTOR and CRITIC for ppo
#   ALGO         step 3's algorithm: ppo (GAE with a critic; default) or a critic-free estimator: grpo,
#                dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline (--n_samples_per_prompt from the preset)
#   REWARD       frozen reward model for step 3 (ppo: default CRITIC unless REWARD_FUNCS are given)
#   REWARD_FUNCS, REWARD_WEIGHTS   rule-based rewards for step 3 (space separated FILE.py:NAME / weights)
#   DATA         data file(s), space separated; OUTPUT_DIR   where the step writes
#   MASTER_PORT  rendezvous port (deepspeed's default 29500 when unset)
#   DRY_RUN=1    print the exact command instead of running it
#   STATUS=1     print whether OUTPUT_DIR holds a finished run of these inputs (exit 0), none (1) or one
#                made from other inputs (3, naming the input; 4 when a stopped run of these inputs waits in
#                OUTPUT_DIR.partial), without running (utils/output.py)
#   STOP_TIMEOUT seconds a stopping job may take before it is killed (default 600)
# Flags after STEP are passed through unchanged and win over the preset (argparse keeps the last).
#
# SIGTERM, SIGINT or SIGUSR1 to this script stops the job: the job runs in its own process group, the
# `deepspeed` command is sent SIGTERM, the ranks (which watch it, utils/signals.py) finish their
# optimizer step, write a checkpoint and exit, and this script waits for every process of the group
# and exits 143. A second signal kills the group at once.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
# shellcheck source=presets.sh
source "$HERE/presets.sh"

# A missing setting is one `error:` line and exit 2 (bash's ${VAR:?} exited 1 with its own wording).
need() {  # need NAME MESSAGE
  [ -n "${!1:-}" ] || { echo "error: $2" >&2; exit 2; }
}
[ $# -ge 1 ] || { echo "error: usage: launch/run.sh sft|reward|ppo|dpo [flags...]" >&2; exit 2; }
STEP="$1"
shift
MODEL_SIZE="${MODEL_SIZE:-1.3b}"
preset "$MODEL_SIZE"

if [ -z "${NGPUS:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NGPUS=$(nvidia-smi -L | wc -l)
  else
    NGPUS=2  # CPU: two DeepSpeed ranks (gloo)
  fi
fi
# Numbers from the environment, checked before bash arithmetic or awk reads them: NGPUS=abc was "abc: unbound
# variable", NGPUS=0 and GPU_MEM_GB=abc chose ZeRO-3 with offload, NUM_NODES=abc ran on one node, OFFLOAD=yes was off.
whole() {  # whole NAME VALUE
  [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge 1 ] || { echo "error: $1 must be a whole number >= 1, got '$2'" >&2; exit 2; }
}
whole NGPUS "$NGPUS"
[ -z "${NUM_NODES:-}" ] || whole NUM_NODES "$NUM_NODES"
[ -z "${GPU_MEM_GB:-}" ] || [[ "$GPU_MEM_GB" =~ ^[0-9]*\.?[0-9]+$ && ! "$GPU_MEM_GB" =~ ^[0.]+$ ]] \
  || { echo "error: GPU_MEM_GB must be a number > 0 (GB per GPU), got '$GPU_MEM_GB'" >&2; exit 2; }
case "${OFFLOAD:-}" in
  "" | 0 | 1) ;;
  *) echo "error: OFFLOAD must be 0 or 1, got '$OFFLOAD'" >&2; exit 2 ;;
esac
NNODES=1
LAUNCH=(deepspeed)
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "error: HOSTFILE '$HOSTFILE' does not exist" >&2; exit 2; }
  # DeepSpeed's runner refuses these in a ValueError traceback (exit 1) after it has started.
  BAD=$(grep -vE '^\s*(#|$)' "$HOSTFILE" | grep -vE '^\s*\S+\s+slots=[0-9]+' | head -1 || true)
  [ -z "$BAD" ] || { echo "error: HOSTFILE '$HOSTFILE': line '$BAD' is not 'HOST slots=N'" >&2; exit 2; }
  DUP=$(grep -vE '^\s*(#|$)' "$HOSTFILE" | awk '{print $1}' | sort | uniq -d | head -1)
  [ -z "$DUP" ] || { echo "error: HOSTFILE '$HOSTFILE' names host '$DUP' twice: give each host one line with its" \
    "slots=N (several launchers on one machine: NUM_NODES and NODE_RANK instead of HOSTFILE)" >&2; exit 2; }
  NNODES=$(grep -cvE '^\s*(#|$)' "$HOSTFILE")
  LAUNCH+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$NGPUS")
elif [ "${NUM_NODES:-1}" -gt 1 ]; then
  # One `deepspeed --no_ssh` per node, as on clusters without ssh between nodes (SLURM, Kubernetes).
  # DeepSpeed takes the node list from a hostfile even then; the names are only labels, every node
  # connects to MASTER_ADDR:MASTER_PORT.
  need NODE_RANK "set NODE_RANK (0..NUM_NODES-1) on each node"
  need MASTER_ADDR "set MASTER_ADDR to the address of node 0"
  NNODES="$NUM_NODES"
  NODES_FILE="${TMPDIR:-/tmp}/ds-rlhf-hostfile-${NNODES}x${NGPUS}"
  NODES_TMP=$(mktemp "$NODES_FILE.XXXXXX")  # written whole, then renamed: every node writes the same file
  for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NGPUS"; done >"$NODES_TMP"
  mv -f "$NODES_TMP" "$NODES_FILE"
  LAUNCH+=(--hostfile "$NODES_FILE" --no_ssh --num_nodes "$NNODES" --node_rank "$NODE_RANK"
           --master_addr "$MASTER_ADDR" --num_gpus "$NGPUS")
  MASTER_PORT="${MASTER_PORT:-29500}"  # every node must use the same one
else
  LAUNCH+=(--num_gpus "$NGPUS")
fi
[ -n "${MASTER_PORT:-}" ] && LAUNCH+=(--master_port "$MASTER_PORT")
TOTAL_GPUS=$((NGPUS * NNODES))
read -r AUTO_STAGE AUTO_OFFLOAD <<<"$(zero_choice "$P_PARAMS" "$TOTAL_GPUS" "${GPU_MEM_GB:-80}" "$([ "$P_LORA" != 0 ] && echo 1 || echo 0)")"
STAGE="${ZERO_STAGE:-$AUTO_STAGE}"
OFFLOAD="${OFFLOAD:-$AUTO_OFFLOAD}"
OFF=()
[ "$OFFLOAD" = "1" ] && OFF=(--offload)
LORA=()
[ "$P_LORA" != "0" ] && LORA=(--lora_dim "$P_LORA" --only_optimize_lora)
CKPT=()
[ "$P_CKPT" = "1" ] && CKPT=(--gradient_checkpointing)
# shellcheck disable=SC2206
DATA_ARGS=(${DATA:+--data_path $DATA})
OUT_ARGS=(${OUTPUT_DIR:+--output_dir "$OUTPUT_DIR"})

case "$STEP" in
  sft)
    ARGS=(step1_sft/main.py ${MODEL:+--model_name_or_path "$MODEL"} --zero_stage "$STAGE" "${OFF[@]}"
          --per_device_train_batch_size "$P_MICRO" --learning_rate "$P_SFT_LR" --max_seq_len "$P_SEQ"
          "${LORA[@]}" "${CKPT[@]}") ;;
  reward)
    ARGS=(step2_reward/main.py ${MODEL:+--model_name_or_path "$MODEL"} --zero_stage "$STAGE" "${OFF[@]}"
          --per_device_train_batch_size "$P_MICRO" --learning_rate "$P_RM_LR" --max_seq_len "$P_SEQ"
          "${LORA[@]}" "${CKPT[@]}") ;;
  dpo)
    ARGS=(dpo/main.py ${MODEL:+--model_name_or_path "$MODEL"} --zero_stage "$STAGE" "${OFF[@]}"
          --per_device_train_batch_size "$P_MICRO" --learning_rate "$P_DPO_LR" --max_seq_len "$P_SEQ"
          "${LORA[@]}" "${CKPT[@]}") ;;
  ppo)
    PPO_CKPT=()
    [ "$P_CKPT" = "1" ] && PPO_CKPT=(--actor_gradient_checkpointing)
    # shellcheck disable=SC2206
    RULES=(${REWARD_FUNCS:+--reward_funcs $REWARD_FUNCS} ${REWARD_WEIGHTS:+--reward_weights $REWARD_WEIGHTS})
    case "${ALGO:-ppo}" in
      ppo)
        PPO_LORA=()
        [ "$P_LORA" != "0" ] && PPO_LORA=(--actor_lora_dim "$P_LORA" --critic_lora_dim "$P_LORA")
        ALGO_ARGS=(${CRITIC:+--critic_model_name_or_path "$CRITIC"} --critic_zero_stage "$STAGE"
                   --critic_learning_rate "$P_CRITIC_LR" "${PPO_LORA[@]}") ;;
      grpo|dr_grpo|rloo|reinforce_pp|reinforce_pp_baseline)
        PPO_LORA=()
        [ "$P_LORA" != "0" ] && PPO_LORA=(--actor_lora_dim "$P_LORA")
        ALGO_ARGS=(--advantage_estimator "$ALGO" --n_samples_per_prompt "$P_GROUP_K" "${PPO_LORA[@]}") ;;
      *) echo "error: unknown ALGO '$ALGO' (ppo, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline)" >&2
         exit 2 ;;
    esac
    ARGS=(step3_ppo/main.py ${ACTOR:+--actor_model_name_or_path "$ACTOR"} "${ALGO_ARGS[@]}"
          ${REWARD:+--reward_model_name_or_path "$REWARD"} "${RULES[@]}" --actor_zero_stage "$STAGE"
          "${OFF[@]}" --actor_learning_rate "$P_ACTOR_LR" --max_answer_seq_len "$P_ANSWER" "${PPO_CKPT[@]}") ;;
  *) echo "error: unknown step '$STEP' (sft, reward, ppo, dpo)" >&2; exit 2 ;;
esac

CMD=("${LAUNCH[@]}" "${ARGS[@]}" "${DATA_ARGS[@]}" "${OUT_ARGS[@]}" "$@")
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "# MODEL_SIZE=$MODEL_SIZE GPUs=$TOTAL_GPUS ($NNODES node(s) x $NGPUS): ZeRO-$STAGE offload=$OFFLOAD"
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
# The programs run from the checkout, and read paths (MODEL, DATA, OUTPUT_DIR, flags, --config) from the
# directory this script was started in: every program changes back to it first (utils/args.py: parse).
export RLHF_CALLER_CWD="$PWD"
cd "$REPO"
# The checkout's packages win over any installed copy (and work without `pip install -e .`).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "${STATUS:-0}" = "1" ]; then
  exec "${PYTHON:-python3}" -m utils.output status "${ARGS[@]}" "${DATA_ARGS[@]}" "${OUT_ARGS[@]}" "$@"
fi

# The ranks stop when this script goes away too, even by SIGKILL (utils/signals.py watches these pids).
export RLHF_WATCH_PIDS="${RLHF_WATCH_PIDS:+$RLHF_WATCH_PIDS }$(hostname):$$"
# Rank 0 writes its exit code here (utils/ds.py: leave): a run that finished while a stop was on its way
# ends 0, not 143.
RLHF_RESULT_FILE="$(mktemp 2>/dev/null || mktemp /tmp/ds-rlhf-result.XXXXXX)"
export RLHF_RESULT_FILE
trap 'rm -f "$RLHF_RESULT_FILE"' EXIT
STOPPING=""
group_alive() {  # a process of the job's group is still running (zombies awaiting their reaper do not count)
  ps -e -o pgid=,stat= | awk -v g="$JOB" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}
stop_job() {
  if [ -n "$STOPPING" ]; then
    echo "[run.sh] $1 again: killing the job" >&2
    kill -KILL -- "-$JOB" 2>/dev/null || true
    return
  fi
  STOPPING=$(date +%s)
  echo "[run.sh] $1: stopping the job (each rank finishes its step and writes a checkpoint)" >&2
  # Only the `deepspeed` command: DeepSpeed's per-node launcher, when signalled itself, SIGKILLs the
  # ranks 30 s later, which could cut a large checkpoint short; the ranks notice the command's exit.
  kill -TERM "$JOB" 2>/dev/null || true
}
trap 'stop_job SIGTERM' TERM
trap 'stop_job SIGINT' INT
trap 'stop_job SIGUSR1' USR1
set -m  # job control: the job gets its own process group, so its processes can be waited for together
"${CMD[@]}" &
JOB=$!
set +m
rc=0
while kill -0 "$JOB" 2>/dev/null; do
  wait "$JOB" && rc=0 || rc=$?  # a trapped signal ends `wait` early: wait again
done
# DeepSpeed's launcher and the ranks may outlive the `deepspeed` command: wait for the whole group.
while group_alive; do
  if [ -n "$STOPPING" ] && [ $(( $(date +%s) - STOPPING )) -gt "${STOP_TIMEOUT:-600}" ]; then
    echo "[run.sh] the job did not stop within ${STOP_TIMEOUT:-600} s: killing it" >&2
    kill -KILL -- "-$JOB" 2>/dev/null || true
  fi
  sleep 0.5 || true  # Ctrl-C reaches this sleep too: it must not end the wait (set -e)
done
# The job is gone. Ranks remove DeepSpeed's shared-memory buffers when they exit, but not when killed (a
# second signal, STOP_TIMEOUT): remove those of this job's port (no other job can hold that port now).
rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${MASTER_PORT:-29500}"_* 2>/dev/null || true
if [ -n "$STOPPING" ]; then
  if [ "$(cat "$RLHF_RESULT_FILE" 2>/dev/null)" = "0" ]; then
    echo "[run.sh] the run had finished when the stop reached it: its output is complete" >&2
    exit 0
  fi
  exit 143
fi
exit "$rc"
