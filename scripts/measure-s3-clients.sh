#!/usr/bin/env bash
# Which S3 client the torch backend reads a bucket with: boto3 against s3torchconnector (AWS's
# client for PyTorch), one GET per image (400 default-set JPEGs of ~107 KB), one request at a time
# and 16 in flight, at 0 and 10 ms first-byte latency (the bench shaper in front of a loopback moto
# server). TRIALS rounds, the client order swapped every round; medians and ranges in OUT/README.md.
# s3torchconnector is installed for this script only (pip --target, no dependencies), not into .venv.
#   bash scripts/measure-s3-clients.sh [OUT] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/s3-clients}; TRIALS=${2:-3}
PY=.venv/bin/python
mkdir -p "$OUT"
EXTRA=$(mktemp -d)
"$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$EXTRA" \
  s3torchconnector==1.5.0 s3torchconnectorclient==1.5.0 2>/dev/null
for latency in 0 10; do
  PYTHONPATH="$PWD:$EXTRA" "$PY" - "$latency" "$TRIALS" <<'PY' >> "$OUT/raw.jsonl"
import json, os, subprocess, sys
from bench.data.synth import default_dataset
from bench.storage import store, upload
latency, trials = float(sys.argv[1]), int(sys.argv[2])
with store.session("s3", None, "loaderbench", latency, 0.0):
    url = upload.upload(default_dataset() / "val", "loaderbench", create_bucket=True, progress=False)
    for t in range(trials):
        out = subprocess.run([sys.executable, "scripts/s3-clients.py", url, "400", str(t % 2)],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            print(json.dumps({**json.loads(line), "latency_ms": latency, "trial": t}))
PY
done
"$PY" - "$OUT" <<'PY'
import collections, json, statistics, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/raw.jsonl")]
cells = collections.defaultdict(list)
cpu = collections.defaultdict(list)
for r in rows:
    cells[(r["latency_ms"], r["client"], r["in_flight"])].append(r["gets_per_s"])
    cpu[(r["latency_ms"], r["client"], r["in_flight"])].append(r["client_cpu_ms_per_get"])
lines = ["# S3 clients for the torch backend: GETs/s, one image per request", "",
         "Machine: the 2-core CPU box; loopback moto server behind bench's shaper; 400 JPEGs of the default set",
         "(~107 KB each). Produced by `bash scripts/measure-s3-clients.sh`. Medians over trials, [min-max].", "",
         "| first-byte latency | client | requests in flight | GETs/s median [min-max] | client CPU ms per GET (median) | trials |",
         "|---|---|---|---|---|---|"]
for (lat, client, k), v in sorted(cells.items()):
    c = statistics.median(cpu[(lat, client, k)])
    lines.append(f"| {lat:g} ms | {client} | {k} | {statistics.median(v):,.0f} [{min(v):,.0f}-{max(v):,.0f}] | {c:.2f} | {len(v)} |")
open(f"{out}/README.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
