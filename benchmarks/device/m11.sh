# issue-11 models: FP16 vs FP16+BF16 searches refined side by side
MODELS=$1; T=${2:-20}
export PYTHONPATH=/tmp/site:$PWD OPENBLAS_NUM_THREADS=1
mkdir -p /tmp/res11
s=$(date +%s)
timeout ${B_S:-540} python3 benchmarks/gpu_bf16.py /tmp/gm /tmp/res11 --models $MODELS --peers /tmp/peers11 --trials $T --pairs 8 2>&1 | tail -25
echo "bf16 $(( $(date +%s)-s ))s"; cp /tmp/res11/*.json $OUT/ 2>/dev/null; ls $OUT
