#!/usr/bin/env bash
# Leave-one-site-out labelling on public-lumbar: for each site, train the appearance + context
# networks without it (the shipped recipe, models/appearance-cpu-v3.md) and score detection +
# labelling on all of that site's cases (training and validation split: the fold saw neither).
# Prints one table per site, then fits level_probability's calibration on the held-out sites'
# TRAINING-split scans and prints reliability before / after. About 10 min per site on 2 cores;
# writes only under $OUT.
#   bash benchmarks/loso_labelling.sh [OUT=/tmp/spinecohort-loso] [DETECTOR_FOR_ITEMS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/spinecohort-loso}
ITEMS_DETECTOR=${2:-models/detector-cpu-v6.pt}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
for site in vb2 vb3 ivd; do
  "$PY" -m spinecohort.training.labeller --stage all --cache "$OUT/cache" --n-synthetic 500 \
    --appearance-steps 3000 --context-steps 1500 --public-weight 0.35 --threads 1 \
    --detector "$ITEMS_DETECTOR" --exclude-source "$site" \
    --appearance-out "$OUT/appearance-no-$site.pt" --context-out "$OUT/context-no-$site.pt" --log "$OUT/train-$site.log"
  "$PY" -m spinecohort.evaluation.labelling --appearance "$OUT/appearance-no-$site.pt" \
    --context "$OUT/context-no-$site.pt" --datasets "public-lumbar:$site" --public-split all \
    --modes end2end truth --quiet --out "$OUT/loso-$site.json"
done
"$PY" -m spinecohort.evaluation.labelling --calibrate-from "$OUT"/loso-vb2.json "$OUT"/loso-vb3.json "$OUT"/loso-ivd.json
