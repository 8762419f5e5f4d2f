"""Table 2: the knowledge-levels ablation on ImageNet, resnet34 -> resnet18 (see experiments/tables.py).

python -m experiments.table2 [--seeds 0 1 2] [--methods ...] [-- hydra overrides]
"""

from experiments.tables import main

if __name__ == "__main__":
    main("table2")
