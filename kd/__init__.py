"""Understanding and Improving Knowledge Distillation (Tang et al., arXiv 2002.03532), reproduced.

The paper's three levels of teacher knowledge live in one obvious place each:
``kd.objectives`` builds the soft targets (universe, domain, instance) and the one KD loss;
``kd.analysis.{universe,domain,instance}`` makes each level visible on trained models.
"""

__version__ = "0.1.0"
