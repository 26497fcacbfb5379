export PYTHONPATH=/tmp/site:$PWD OPENBLAS_NUM_THREADS=1
s=$(date +%s)
timeout ${X_S:-400} python3 benchmarks/rtx_build.py ${RES:-/tmp/amp-gpu-bf16/demo22/fp16_bf16 /tmp/amp-gpu-bf16/minilm/fp16_bf16} --out $OUT/rtx_build_bf16.json --jobs ${J:-8} 2>&1 | tail -15
echo "rtx $(( $(date +%s)-s ))s"
