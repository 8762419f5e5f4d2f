"""Understanding and Improving Knowledge Distillation (Tang et al., arXiv 2002.03532), reproduced.

The paper's three levels of teacher knowledge live in one obvious place each:
``kd.objectives`` builds the soft targets (universe, domain, instance) and the one KD loss;
``kd.analysis.{universe,domain,instance}`` makes each level visible on trained models.
"""

import os
import sys

__version__ = "0.1.0"

# torch reads CUBLAS_WORKSPACE_CONFIG once per process, at its first cuBLAS call, and deterministic
# algorithms on CUDA need one of these values there: set before torch can start, so that a
# deterministic run after earlier matrix products still has it (docs/determinism.md). Where CUDA
# started before kd was imported, torch may have read it already: kd.schema then refuses such runs.
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
if "torch" not in sys.modules or not sys.modules["torch"].cuda.is_initialized():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC[0])
