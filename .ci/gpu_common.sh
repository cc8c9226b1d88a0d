# Shared by the GPU scripts in .ci/ (sourced): wheels, environment, demo data and the `run NAME ARGS...` helper.
# Expects OUT to be set; defines COMMON (the tiny model on the demo corpus) and FAILED.
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
NGPU=$(nvidia-smi -L | wc -l)
STEPS=${STEPS:-20}
# The generated demo corpus at the Stage 1 media budget (data defaults), decoded by 2 workers per rank.
[ -f "$OUT/data/shards/index.json" ] || python3 -m data_pipeline.cli demo --out "$OUT/data" >"$OUT/data.log" 2>&1 || exit 1
COMMON=(~recipe model=tiny logging.wandb_mode=disabled logging.progress_bar=false "train.steps=$STEPS"
        "data.shards=$OUT/data/shards" "data.tokenizer=$OUT/data/tokenizer.json" data.workers=2
        train.global_batch=8 train.seq_length=2048 optim.lr=2e-3 optim.warmup_steps=5)
FAILED=0

run() {
  local name=$1; shift
  local start=$SECONDS
  python3 -m keye_train.cli "${COMMON[@]}" "run_dir=$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || FAILED=1
  printf '%-14s rc=%d %4ds  %s\n' "$name" $rc $((SECONDS - start)) "$(grep '^done' "$OUT/$name.log")"
  [ $rc -eq 0 ] || grep -v -i warn "$OUT/$name.log" | tail -25
}
