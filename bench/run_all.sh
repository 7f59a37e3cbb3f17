#!/usr/bin/env bash
# Every CPU benchmark of the README's table, 3 repetitions each, on an otherwise idle machine.
#   bash bench/run_all.sh [OUT_DIR]          (default bench_out/; about an hour and a half on 2 idle cores)
# Each result is printed with the load average at its start and end, and saved as OUT_DIR/NAME.{txt,json}.
# Check `uptime` first: a load average above ~1 on this 2-core machine means the numbers are not valid.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-bench_out}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
PY="${PYTHON:-python3}"
run() {  # run NAME ARGS...: one bench, its output kept
  local name="$1"; shift
  echo "== $name: $* ($(uptime | sed 's/.*load/load/'))"
  "$PY" "$@" --json "$OUT/$name.json" 2>"$OUT/$name.err" | tee "$OUT/$name.txt"
}
run sft_tiny bench/bench_sft.py
run sft_realistic bench/bench_sft.py --size realistic
run reward_tiny bench/bench_reward.py
run dpo_tiny bench/bench_dpo.py
run reward_realistic bench/bench_reward.py --size realistic --runners ours,ours_packed,trl
run dpo_realistic bench/bench_dpo.py --size realistic --runners ours_pre,ours_pre_packed,trl_pre
run ppo_bf16_offload bench/bench_ppo.py                 # llama-small (2.6M), DeepSpeed-Chat's setting
run ppo_fp32 bench/bench_ppo.py --dtype fp32 --no-offload
echo "== sft_memory ($(uptime | sed 's/.*load/load/'))"
"$PY" bench/bench_sft.py --size realistic --memory 2>"$OUT/sft_memory.err" | tee "$OUT/sft_memory.txt"
echo "== profile_ppo ($(uptime | sed 's/.*load/load/'))"
OMP_NUM_THREADS=1 "$PY" bench/profile_ppo.py --steps 20 2>"$OUT/profile_ppo.err" | grep -E "^PPO profile|^  " \
  | tee "$OUT/profile_ppo.txt"
echo "== first run of the demo, with an empty DeepSpeed op cache ($(uptime | sed 's/.*load/load/'))"
DEMO="$(mktemp -d)"
/usr/bin/env time -f "demo first run: %e s" env TORCH_EXTENSIONS_DIR="$DEMO/ext" DEMO_DIR="$DEMO/out" \
  bash launch/demo.sh 2>&1 | grep -E "^\[demo\]|^\[pipeline\].*done|demo finished|first run" | tee "$OUT/demo_first_run.txt"
rm -rf "$DEMO"
echo "== the README's tables"
"$PY" bench/table.py "$OUT"
