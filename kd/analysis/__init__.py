"""The paper's three levels of teacher knowledge, made visible on trained models.

- ``universe``: how much a teacher smooths the labels (KD as a non-uniform label smoothing).
- ``domain``: class relationships in the teacher's probabilities and in the logit-layer weights.
- ``instance``: the per-example gradient rescaling factor w of KD against the teacher's q_c.
- ``diagnosis``: all three on one teacher, to tell why KD fails with it (``diagnose``).

Each module has functions on tensors, plus thin helpers taking any model (with ``features`` and
``classifier``) and any data module (``loader``, ``num_classes``, ``superclass_of``).
"""

from kd.analysis import diagnosis, domain, instance, universe
from kd.analysis.diagnosis import diagnose

__all__ = ["diagnose", "diagnosis", "domain", "instance", "universe"]
