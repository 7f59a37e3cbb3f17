# Model-size presets, sourced by launch/run.sh. One row per size class:
#   size  params(M)  micro_batch  sft_lr  rm_lr  actor_lr  critic_lr  dpo_lr  lora_dim  max_seq_len  grad_ckpt
#         group_k  answer_len
# A rate of 0 lets the step scale its rate to the model's actual size (utils/lr.py: a known-good 7B rate
# x sqrt(7e9 / parameters), capped at 1e-3), which is what every full-fine-tuning row does; at these
# rows' nominal sizes it gives the usual ranges (SFT 7.5e-5 at 125M, 2.3e-5 at 1.3B, 1e-5 at 7B).
# LoRA rows set their rates explicitly because adapters need larger steps than full fine-tuning;
# from 13B up LoRA is on by default so a single node can hold the run. group_k is the answers per prompt of
# the critic-free step-3 estimators (ALGO=grpo, rloo, ...): small models afford 16, the largest 4, since a
# rank generates prompts x K answers at once; answer_len is step 3's --max_answer_seq_len for every ALGO.
# Override any of them with flags.
PRESETS="
125m   125   16  0     0     0      0      0     0    512   0  16  256
350m   350   16  0     0     0      0      0     0    512   0  16  256
1.3b   1300  8   0     0     0      0      0     0    512   0  8   512
7b     7000  4   0     0     0      0      0     0    1024  1  8   1024
13b    13000 4   1e-4  5e-5  1e-5   5e-6   5e-6   128  1024  1  8   1024
70b    70000 1   1e-4  5e-5  1e-5   5e-6   5e-6   128  1024  1  4   1024
tiny   1     8   0     0     0      0      0     0    256   0  8   16
"

# preset SIZE -> sets P_PARAMS P_MICRO P_SFT_LR P_RM_LR P_ACTOR_LR P_CRITIC_LR P_DPO_LR P_LORA P_SEQ P_CKPT
#                     P_GROUP_K P_ANSWER
preset() {
  local row
  row=$(printf '%s\n' "$PRESETS" | awk -v s="$1" '$1 == s')
  if [ -z "$row" ]; then
    echo "error: unknown MODEL_SIZE '$1'; choose one of: $(printf '%s\n' "$PRESETS" | awk 'NF {printf "%s ", $1}')" >&2
    return 1
  fi
  read -r _ P_PARAMS P_MICRO P_SFT_LR P_RM_LR P_ACTOR_LR P_CRITIC_LR P_DPO_LR P_LORA P_SEQ P_CKPT P_GROUP_K P_ANSWER \
    <<<"$row"
}

# zero_choice PARAMS_M GPUS GPU_MEM_GB LORA -> "STAGE OFFLOAD"
# Per-GPU memory of mixed-precision Adam training, in bytes per parameter (ZeRO paper, section 3):
#   ZeRO-2: 2 (weights) + 2/N (grads) + 12/N (fp32 master + moments);  ZeRO-3: 16/N;
#   ZeRO-3 + optimizer offload: 4/N on the GPU. With LoRA only the adapters train, so the frozen
#   weights (2 bytes, or 2/N under ZeRO-3) dominate. The first choice that fits in 60% of GPU
#   memory (the rest is for activations) wins; ZeRO-0 when one GPU holds everything.
zero_choice() {
  awk -v p="$1" -v n="$2" -v m="$3" -v lora="${4:-0}" 'BEGIN {
    budget = 0.6 * m * 1e9; P = p * 1e6
    full = lora ? 2 : 16; z2 = lora ? 2 : 2 + 14 / n; z3 = full / n
    if (n == 1 && full * P <= budget)  { print "0 0"; exit }
    if (z2 * P <= budget)              { print "2 0"; exit }
    if (z3 * P <= budget)              { print "3 0"; exit }
    print "3 1"
  }'
}
