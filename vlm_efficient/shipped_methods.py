"""The methods that ship with the package: importing this module imports each method's module, whose class registers
itself (registry.register_method). vlm_efficient's __init__ imports it after the core. A new method is its file plus
its module's name here (the method folders hold no __init__.py: see pyproject.toml's [tool.setuptools])."""

# token_ops: visual-token pruning, merging and exit
from .token_ops import (avl, baselines, dart, divprune, dycoke, dyvte, fastervlm, fastv, plphp,  # noqa: F401
                        pyramid_drop, sparsevlm, streaming, visionzip, vmtc, yopo)

# heads: attention-head interventions, cross-modal masks (heads/README.md; heads/inspect.py and heads/tag.py are
# commands, not imported here)
from .heads import (act, adaptvis, aki, cmai, dual_rope, ee_mllm, equal_distance, frame_causal, gift,  # noqa: F401
                    knockout, memvr, naavit, ocr_sink, pai, paint, vaf, var, vhr, window)
