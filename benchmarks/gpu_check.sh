#!/usr/bin/env bash
# The GPU acceptance check: one table, in at most 5 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                  on a GPU machine (any directory; it finds the repository)
#   bash benchmarks/gpu_check.sh --cpu-dry-run    every section tiny and on CPU: checks the script's plumbing
#
# Needs torch, numpy, tiktoken, pyyaml, psutil, safetensors, tqdm and pytest; not deepspeed, datasets or wandb
# (the package imports those only where they are used). Data: synthetic tokens (dist_gpt.data.synthetic), so no
# corpus or network is needed. Sections, each under its own time limit; one that fails is reported and the
# others still run:
#   doctor      python -m dist_gpt.doctor
#   cuda tests  pytest -m cuda (the CUDA-marked tests)
#   trainer     torchrun --nproc_per_node=1 launch/train.py --config gpt2-124m-owt, 30 steps: its log line's tok/s, MFU
#   fp16/bf16   train.dtype=fp16 forced against bf16, 50 steps each (eager): both finite, losses within 1 %
#   fsdp offload  parallel.strategy=fsdp parallel.fsdp_cpu_offload=true on one GPU (a NCCL-only group crashed at step 1)
#   deepspeed   ZeRO-2 bf16 (fp32 gradient accumulation) on one GPU: deepspeed from wheels in .whl/ if present, else
#               the installed one, else skipped with the reason
#   autotune    train.micro_batch_size=auto with a 24 GB budget (an L4): the chosen size's peak as % of 24 GB
#   loss share  benchmarks/loss_share.py: eager vs compiled ms/step and the chunked loss's share (torch.profiler)
#   compile     dist_gpt.tools.bench --compare compile off / on (when time is left)
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python3}
ROWS=$(mktemp)
WORK=$(mktemp -d -t gpu_check.XXXXXX)
trap 'rm -rf "$WORK" "$ROWS"' EXIT
START=$SECONDS

if [[ "${1:-}" == "--cpu-dry-run" ]]; then
    MODE=cpu
    # gpt2-124m-owt's settings at a tiny shape, on CPU, a 256-id vocabulary (fp16 matmuls are slow on CPU)
    SHAPE="model.n_layer=2 model.n_head=2 model.n_embd=64 model.block_size=64 model.vocab_size=256 model.tokenizer_vocab_size=256 train.device=cpu train.micro_batch_size=4"
    HALF=bf16                    # what fp16 is compared against (bf16 autocast runs on CPU too)
    TOKENS=200000 VOCAB=256
    OWT_STEPS=3 OWT_BATCH=8      # global batch: grad-accum 2
    DTYPE_STEPS=8 DTYPE_BATCH=8
    SHORT_STEPS=3                # the runs that only have to work (offload, DeepSpeed)
    BUDGET_GB=2                  # of RAM, for a tiny model
    LIMIT=300                    # seconds per section
else
    MODE=gpu
    SHAPE=""
    HALF=bf16
    TOKENS=4000000 VOCAB=50257
    OWT_STEPS=30 OWT_BATCH=480   # the preset's own global batch: micro-batch 12 x grad-accum 40
    DTYPE_STEPS=50 DTYPE_BATCH=48
    SHORT_STEPS=5
    BUDGET_GB=24
    LIMIT=240
fi
TRAIN_COMMON="data.dir=$WORK/data train.out_dir=$WORK/runs train.eval_every=0 train.eval_batches=4 logging.log_every=10 checkpoint.every_steps=0 checkpoint.every_minutes=0"

row() { printf '%s|%s|%s\n' "$1" "$2" "$3" >>"$ROWS"; }  # section | status | result
rows() { "$PYTHON" benchmarks/gpu_check_rows.py "$@"; }    # prints "status|result" for a section's outputs
section() { echo; echo "=== $1 ($(( SECONDS - START )) s so far)"; }
run_limited() { timeout --signal=INT --kill-after=20 "$LIMIT" "$@"; }
train() {  # train RUN_NAME OVERRIDES...: the trainer's own entry point, as a user runs it
    local name=$1; shift
    # `python -m torch.distributed.run` is `torchrun` (without relying on PATH)
    run_limited "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 launch/train.py --config gpt2-124m-owt $SHAPE $TRAIN_COMMON "train.run_name=$name" "$@" \
        >"$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 4 "$WORK/$name.log"
    return $rc
}
record() {  # record SECTION RC COMMAND...: one table row from the helper, or the failure
    local name=$1 rc=$2; shift 2
    local out
    if out=$(rows "$@" 2>/dev/null); then
        [[ $rc -ne 0 ]] && out="FAIL|exit $rc; ${out#*|}"
        row "$name" "${out%%|*}" "${out#*|}"
    else
        row "$name" FAIL "exit $rc, no result (see the output above)"
    fi
}

section "doctor"
run_limited "$PYTHON" -m dist_gpt.doctor --json "$WORK/doctor.json"
record doctor $? doctor "$WORK/doctor.json"

section "CUDA-marked tests"
run_limited "$PYTHON" -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$WORK/pytest.log" | tail -n 15
rc=${PIPESTATUS[0]}
[[ $rc -eq 5 ]] && rc=0  # 5: pytest selected no test
record "cuda tests" $rc pytest "$WORK/pytest.log"

section "synthetic data"
"$PYTHON" -m dist_gpt.data.synthetic "$WORK/data" --tokens "$TOKENS" --vocab "$VOCAB"

section "trainer: gpt2-124m-owt, $OWT_STEPS steps"
train owt "train.max_steps=$OWT_STEPS" "train.global_batch_size=$OWT_BATCH"
record "trainer gpt2-124m-owt" $? trainer "$WORK/runs/owt"

section "fp16 forced vs $HALF, $DTYPE_STEPS steps each"
# Eager: the numerics of the two dtypes, without two more cold compiles (the trainer section runs compiled).
common=("train.max_steps=$DTYPE_STEPS" "train.global_batch_size=$DTYPE_BATCH" train.warmup_steps=10 train.lr_decay_steps=0 train.compile=false)
train fp16 train.dtype=fp16 "${common[@]}"; rc_fp16=$?
train "$HALF" "train.dtype=$HALF" "${common[@]}"; rc_half=$?
record "fp16 vs $HALF" $(( rc_fp16 | rc_half )) dtypes "$WORK/runs/fp16" "$WORK/runs/$HALF"

section "FSDP + CPU offload on one GPU, $SHORT_STEPS steps"
# The offloaded gradient shards are CPU tensors: the group needs gloo beside NCCL (cpu:gloo,cuda:nccl).
train fsdp_offload parallel.strategy=fsdp parallel.fsdp_cpu_offload=true "train.dtype=$HALF" train.compile=false \
    "train.max_steps=$SHORT_STEPS" "train.global_batch_size=$DTYPE_BATCH" train.warmup_steps=1 logging.log_every=1
record "fsdp + cpu offload" $? ran "$WORK/runs/fsdp_offload"

section "DeepSpeed ZeRO-2 bf16, $SHORT_STEPS steps"
ds_ready="" ds_why=""
if ls "$REPO"/.whl/deepspeed-*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --find-links "$REPO/.whl" deepspeed >"$WORK/ds_install.log" 2>&1 && ds_ready=1 \
        || ds_why="pip install from .whl/ failed: $(tail -n 1 "$WORK/ds_install.log")"
elif "$PYTHON" -c "import deepspeed" >/dev/null 2>&1; then
    ds_ready=1
else
    ds_why="deepspeed is not installed and .whl/ holds no deepspeed wheel (pip download deepspeed -d .whl where there is a network, carry .whl)"
fi
if [[ -n $ds_ready ]]; then
    # data_types.grad_accum_dtype is filled with fp32 for ZeRO-1/2/3: micro-batch gradients are summed in fp32.
    train zero2 parallel.ds_config=ds_configs/zero2.json train.dtype=bf16 train.compile=false \
        "train.max_steps=$SHORT_STEPS" "train.global_batch_size=$DTYPE_BATCH" train.warmup_steps=1 logging.log_every=1
    record "deepspeed zero2 bf16" $? ran "$WORK/runs/zero2"
else
    row "deepspeed zero2 bf16" skip "$ds_why"
fi

section "micro_batch_size=auto, ${BUDGET_GB} GB budget"
# The trials build what training builds (train.compile as set): eager here to fit the check's time.
train autotune train.micro_batch_size=auto "train.memory_budget_gb=$BUDGET_GB" train.max_steps=2 logging.log_every=1 "train.global_batch_size=$OWT_BATCH" train.compile=false
record "autotune ${BUDGET_GB} GB" $? autotune "$WORK/runs/autotune" "$BUDGET_GB"

section "the loss's share of a step, eager vs compiled (torch.profiler)"
run_limited "$PYTHON" benchmarks/loss_share.py --config gpt2-124m-owt --steps 5 --warmup 3 $SHAPE "train.dtype=$HALF" \
    >"$WORK/loss_share.json" 2>"$WORK/loss_share.err"
rc=$?
[[ $rc -ne 0 ]] && tail -n 5 "$WORK/loss_share.err"
record "loss share" $rc loss_share "$WORK/loss_share.json"

section "compile off vs on (bench)"
if (( SECONDS - START < 200 )) || [[ $MODE == cpu ]]; then
    run_limited "$PYTHON" -m dist_gpt.bench --config gpt2-124m-owt --steps 10 --warmup 3 --json $SHAPE \
        --compare "train.compile=false" "train.compile=true" >"$WORK/bench.json" 2>"$WORK/bench.err"
    rc=$?
    [[ $rc -ne 0 ]] && tail -n 5 "$WORK/bench.err"
    record "compile off vs on" $rc bench "$WORK/bench.json"
else
    row "compile off vs on" skip "not run: $(( SECONDS - START )) s spent already"
fi

echo
echo "=== gpu_check ($MODE) in $(( SECONDS - START )) s on $(rows device)"
"$PYTHON" - "$ROWS" <<'EOF'
import sys
rows = [line.rstrip("\n").split("|", 2) for line in open(sys.argv[1]) if line.strip()]
width = max(len(r[0]) for r in rows)
print(f"{'section':{width}s}  status  result")
for name, status, result in rows:
    print(f"{name:{width}s}  {status:6s}  {result}")
sys.exit(1 if any(r[1] == "FAIL" for r in rows) else 0)
EOF
