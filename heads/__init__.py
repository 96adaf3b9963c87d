"""vlm_efficient.heads: attention-head interventions (PAI, VAF, VAR, ACT, OCR-head sink, VHR, GIFT, PAINT,
AdaptVis), cross-modal masks (NAAViT, EE-MLLM, 2-D window, CMAI, knockout, AKI, Vista-LLaMA's equal distance, TC-LLaVA's
frame-causal mask and temporal-aware dual RoPE) and
discovery (`vlm-efficient inspect`: heads/inspect.py, a command, not imported here). One file per method; see
heads/README.md. Importing this package registers the methods (each class carries @register_method)."""

from . import (act, adaptvis, aki, cmai, dual_rope, ee_mllm, equal_distance, frame_causal, gift,  # noqa: F401
               knockout, memvr, naavit, ocr_sink, pai, paint, vaf, var, vhr, window)
