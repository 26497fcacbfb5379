# Why BF16 candidates fail on the CUDA EP: one FP16+BF16 search of MODEL (in /tmp/gm), every
# failed trial's reason written to $OUT/bf16_failures_MODEL.json (no refine, no FP16-only search)
M=${1:-minilm}; T=${2:-20}
export PYTHONPATH=/tmp/site:$PWD OPENBLAS_NUM_THREADS=1
rm -rf /tmp/bf16f && mkdir -p /tmp/bf16f
timeout ${F_S:-300} python3 - "$M" "$T" <<'PY' 2>&1 | grep -v "plugin EP" | tail -20
import json, os, sys
from pathlib import Path
from amp_search.search import SearchConfig, run_search
m, t = sys.argv[1], int(sys.argv[2])
cfg = SearchConfig(model=Path(f"/tmp/gm/{m}.onnx"), data=Path(f"/tmp/gm/{m}.npz"),
                   out=Path("/tmp/bf16f/out"), device="cuda", n_trials=t,
                   storage="sqlite:////tmp/bf16f/s.db", study_name=m, seed=0,
                   latency="measured", precisions=("fp16", "bf16"), timing_max_s=4.0)
o = run_search(cfg)
fails = [[x.number, str(x.user_attrs.get("error", ""))] for x in o.study.get_trials()
         if x.state.name == "FAIL"]
doc = {"model": m, "trials": t, "failed": fails, "notes": o.notes}
Path(os.environ["OUT"], f"bf16_failures_{m}.json").write_text(json.dumps(doc, indent=1))
for n, e in fails:
    print(n, e[:700])
PY
