#!/usr/bin/env bash
# The README's main job (synthesize the embedded head-CT set, train the default float model), timed.
# Run by hand on an idle machine: bash benchmarks/main_job.sh [WORKDIR]
set -euo pipefail
work=${1:-$(mktemp -d)}
start=$(date +%s)
edgedx data synth "$work/headct"
edgedx train --data "$work/headct" --out "$work/headct-float" --json > "$work/train.json"
end=$(date +%s)
echo "main job: $((end - start)) s on $(nproc) cores; bundle $work/headct-float"
python - "$work/train.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for split, m in report["metrics"].items():
    lo, hi = m["auc_ci95"]
    print(f"{split}: AUC {m['auc']:.4f} (95% CI {lo:.3f}-{hi:.3f}) acc {m['accuracy']:.4f} "
          f"sens {m['sensitivity']:.4f} spec {m['specificity']:.4f} n {m['n']}")
PY
