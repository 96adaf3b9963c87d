"""vlm_efficient.token_ops: visual-token pruning, merging and exit methods, one file each. Importing this package
registers them (each class carries @register_method); vlm_efficient's __init__ does."""

from . import (avl, baselines, dart, divprune, dycoke, dyvte, fastervlm, fastv, plphp, pyramid_drop, sparsevlm,  # noqa: F401
               streaming, visionzip, vmtc, yopo)
