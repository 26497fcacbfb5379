# one issue-12 model: prepare, per-node timing, measured-latency search + refine
M=$1; T=${2:-10}
export PYTHONPATH=/tmp/site:$PWD OPENBLAS_NUM_THREADS=1
mkdir -p /tmp/gm /tmp/peers /tmp/res
s=$(date +%s)
timeout 120 python3 benchmarks/gpu_recurrent.py --prepare /tmp/gm /tmp/peers --models $M 2>&1 | tail -8
echo "prep $(( $(date +%s)-s ))s"
timeout ${R_S:-200} python3 benchmarks/gpu_recurrent.py /tmp/gm /tmp/peers /tmp/res --models $M 2>&1 | tail -12
echo "rec $(( $(date +%s)-s ))s"; cp /tmp/res/*.json $OUT/ 2>/dev/null
timeout ${T_S:-220} python3 benchmarks/gpu_timing.py /tmp/gm /tmp/res --models $M --peers /tmp/peers --trials $T --pairs 8 2>&1 | tail -14
echo "timing $(( $(date +%s)-s ))s"; cp -r /tmp/res/*.json $OUT/ 2>/dev/null; ls $OUT
