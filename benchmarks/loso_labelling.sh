#!/usr/bin/env bash
# Leave-one-site-out labelling on public-lumbar: for each site, train the appearance + context
# networks without it (the shipped recipe, models/appearance-cpu-v4.md) and score detection +
# labelling on all of that site's cases (training and validation split: the fold saw neither),
# also with the detections below the lowest annotated body removed (a detector missing the sacrum).
# The shipped recipe includes SPIDER's slices labelled by a teacher, so each fold trains twice:
# first without SPIDER (v3's recipe), then with SPIDER's slices labelled by that first model (the
# fold's own teacher, never one that saw the site). SPIDER_DIR=none runs the first round only.
# Prints one table per site, then fits level_probability's calibration on the held-out sites'
# TRAINING-split scans and prints reliability before / after. About 7 min per site and round on
# 2 cores; writes only under $OUT.
#   bash benchmarks/loso_labelling.sh [OUT=/tmp/spinecohort-loso] [DETECTOR_FOR_ITEMS] [SPIDER_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/spinecohort-loso}
ITEMS_DETECTOR=${2:-models/detector-cpu-v6.pt}
SPIDER=${3:-../shared/data/spider-midsagittal}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
train() {  # site, output tag, extra arguments
  local site=$1 tag=$2
  shift 2
  "$PY" -m spinecohort.training.labeller --stage all --cache "$OUT/cache" --n-synthetic 500 \
    --appearance-steps 3000 --context-steps 1500 --public-weight 0.35 --threads 1 \
    --detector "$ITEMS_DETECTOR" --exclude-source "$site" \
    --appearance-out "$OUT/appearance-$tag.pt" --context-out "$OUT/context-$tag.pt" --log "$OUT/train-$tag.log" "$@"
}
for site in vb2 vb3 ivd; do
  train "$site" "no-$site"
  if [ "$SPIDER" != none ] && [ -d "$SPIDER" ]; then
    train "$site" "no-$site-spider" --spider "$SPIDER" \
      --spider-teacher "$OUT/appearance-no-$site.pt" "$OUT/context-no-$site.pt"
    tag="no-$site-spider"
  else
    tag="no-$site"
  fi
  "$PY" -m spinecohort.evaluation.labelling --appearance "$OUT/appearance-$tag.pt" \
    --context "$OUT/context-$tag.pt" --datasets "public-lumbar:$site" --public-split all \
    --modes end2end end2end-no-sacrum truth --quiet --out "$OUT/loso-$site.json"
done
"$PY" -m spinecohort.evaluation.labelling --calibrate-from "$OUT"/loso-vb2.json "$OUT"/loso-vb3.json "$OUT"/loso-ivd.json
