#!/usr/bin/env bash
# The README's main job (synthesize the embedded head-CT set, train the default float model, compress
# it with distill + prune + int8, bench float vs int8 on the host profile), each stage timed.
# Run by hand on an idle machine:
#   bash benchmarks/main_job.sh [WORKDIR]
set -euo pipefail
work=${1:-$(mktemp -d)}
t0=$(date +%s)
edgedx data synth "$work/headct"
t1=$(date +%s)
edgedx train --data "$work/headct" --out "$work/headct-float" --json > "$work/train.json"
t2=$(date +%s)
edgedx compress "$work/headct-float" --distill --prune --quantize int8 --out "$work/headct-small" --json \
    > "$work/compress.json"
t3=$(date +%s)
bench_status=0
edgedx bench "$work/headct-float" "$work/headct-small" --device host --out "$work/bench" --json \
    > "$work/bench.json" || bench_status=$?
t4=$(date +%s)
echo "on $(nproc) cores: synth $((t1 - t0)) s, train $((t2 - t1)) s (synth + train $((t2 - t0)) s)," \
    "compress $((t3 - t2)) s, bench $((t4 - t3)) s (exit $bench_status); bundles in $work"
python - "$work/train.json" "$work/compress.json" "$work/bench.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for split, m in report["metrics"].items():
    lo, hi = m["auc_ci95"]
    print(f"float {split}: AUC {m['auc']:.4f} (95% CI {lo:.3f}-{hi:.3f}) acc {m['accuracy']:.4f} "
          f"sens {m['sensitivity']:.4f} spec {m['specificity']:.4f} n {m['n']}")
for row in json.load(open(sys.argv[2]))["steps"]:
    print(f"{row['step']:>14}: {row['nonzero_parameters']:>8,} non-zero of {row['parameters']:>8,} params, "
          f"{row['bytes']:>9,} B ({row['gzip_bytes']:>9,} gzipped), test AUC {row['test']['auc']:.4f}, "
          f"flips {row['flips']:.3f}, {row['seconds']:.0f} s")
bench = json.load(open(sys.argv[3]))
for r in bench["rows"]:
    c, d = r["clinical"], r["device"]
    print(f"bench {r['bundle']:>13} {r['precision']:>16}: AUC {c['auc']:.4f} flips {c['flips']:.3f} "
          f"p50 {d['p50_ms']:.3f} ms p95 {d['p95_ms']:.3f} ms RSS {d['peak_rss_mb']:.0f} MB "
          f"cold start {d['cold_start_seconds']:.2f} s {d['bytes'] / 1024:.0f} KB")
print(*bench["notes"], *bench["missed"], sep="\n")
PY
