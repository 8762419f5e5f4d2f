"""Table 1: the knowledge-levels ablation on CIFAR-100 under the CRD recipe (see experiments/tables.py).

python -m experiments.table1 [--seeds 0 1 2] [--methods ...] [-- hydra overrides]
"""

from experiments.tables import main

if __name__ == "__main__":
    main("table1")
