"""``python -m spinecohort.training.grader``: the ``spinecohort train grader`` command, plus
``build-train DIR [WORKERS]`` / ``build-test DIR [WORKERS]``, which only build the synthetic
training / held-out cohort of grader-cpu-v3 under ``DIR/train`` or ``DIR/test``."""
import json
import os
import sys
import time
from pathlib import Path

from . import READS_SEED, SYNTH_TEST_SEEDS, SYNTH_TRAIN_SEEDS, build_synthetic_cohort, main

os.environ.setdefault("OMP_NUM_THREADS", "1")
if len(sys.argv) >= 3 and sys.argv[1] in ("build-train", "build-test"):
    which = sys.argv[1].split("-")[1]
    lo, hi = SYNTH_TRAIN_SEEDS if which == "train" else SYNTH_TEST_SEEDS
    t = time.time()
    tab, _, _ = build_synthetic_cohort(Path(sys.argv[2]) / which, range(lo, hi), READS_SEED[which],
                                       workers=int(sys.argv[3]) if len(sys.argv) > 3 else 1,
                                       log=lambda m: print(m, flush=True))
    print(json.dumps({"discs": len(tab), "seconds": round(time.time() - t, 1)}), flush=True)
    sys.exit(0)
sys.exit(main())
