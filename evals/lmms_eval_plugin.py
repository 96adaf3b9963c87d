"""An lmms-eval model backed by vlm_efficient, so the harness users know runs wrapped models:

    lmms-eval --model vlm_efficient --tasks pope,mme \\
        --model_args 'pretrained=llava-hf/llava-1.5-7b-hf,methods="fastv:layer=2,ratio=0.5",batch_size=8'

lmms-eval (>= 0.7) finds it through the entry point group "lmms_eval.models" (pyproject:
`[project.entry-points."lmms_eval.models"] vlm_efficient = "vlm_efficient.evals.lmms_eval_plugin:manifest"`).
lmms-eval splits --model_args at commas outside quotes: quote the spec, or write its commas as ';'.
`pretrained` takes what `vlm-efficient eval --model` takes (testbed, tiny:<family>, a directory, a hub id).
"""

from __future__ import annotations

try:
    from lmms_eval.api.model import lmms as _Base
except ImportError:  # lmms-eval is optional: the class stays importable (and testable) without it
    _Base = object


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlm_efficient", simple_class_path=f"{__name__}.VLMEfficient")


class VLMEfficient(_Base):
    is_simple = True

    def __init__(self, pretrained="testbed", methods="", device=None, dtype="float32", batch_size=1,
                 max_new_tokens=128, **kwargs) -> None:  # fmt: skip
        import torch

        import vlm_efficient
        from vlm_efficient.models import default_device

        from .runner import dist_state, load_eval_model

        if _Base is not object:
            super().__init__()
        if kwargs:
            raise ValueError(f"vlm_efficient: unknown model_args {sorted(kwargs)} (a spec's commas must be quoted)")
        state = dist_state()
        self._rank, self._world_size = (state.process_index, state.num_processes) if state else (0, 1)
        device = device or (str(state.device) if state else default_device())
        self.model, self.processor = load_eval_model(str(pretrained), device, getattr(torch, dtype))
        self.methods = str(methods).strip("\"'").replace(";", ",")
        vlm_efficient.wrap(self.model, self.methods)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.task_dict = getattr(self, "task_dict", {})

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, in batches of requests with equal generation arguments, in the requests' order."""
        from tqdm.auto import tqdm

        from vlm_efficient.models import build_prompt

        from .runner import batch_inputs, generate_batch

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlm_efficient")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                args = [requests[i].args for i in chunk]
                kwargs = dict(args[0][1])
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                images = [self._visuals(a) for a in args]
                prompts = [build_prompt(self.processor, a[0], num_images=len(v)) for a, v in zip(args, images)]
                tokens = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
                inputs = batch_inputs(self.processor, prompts, images, self.model)
                texts, _ = generate_batch(self.model, self.processor, inputs, tokens)
                for i, text in zip(chunk, texts):
                    for stop in until:  # lmms-eval's stop strings
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out

    def _visuals(self, args) -> list:
        from PIL import Image

        context, _, doc_to_visual, doc_id, task, split = args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if not all(isinstance(v, Image.Image) for v in visuals):
            raise ValueError("vlm_efficient: only image inputs are supported (no video or audio)")
        return [v.convert("RGB") for v in visuals]

    def loglikelihood(self, requests):
        raise NotImplementedError("vlm_efficient: loglikelihood tasks are not supported; use generation tasks")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vlm_efficient: multi-round generation is not supported")
