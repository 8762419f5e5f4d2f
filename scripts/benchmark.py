"""``make bench``: our training paths against plain references, side by side in one process.

    python scripts/benchmark.py                 # CPU: small sizes; GPU: batch 512, fast path compiled
    python scripts/benchmark.py --batch 64      # the CRD recipe's batch
    python scripts/benchmark.py --fig3          # also time `make reproduce-fig3` (minutes)
    python scripts/benchmark.py --measure kd_step epoch parity   # what scripts/gpu_check.sh measures
    python scripts/benchmark.py --smoke         # seconds: checks the script, not the speed

Writes results/bench/bench.json (flat dotted keys) and results/bench/bench.md; see experiments/bench.py
for what is measured and docs/performance.md for the figures.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's kd and experiments

from experiments.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
