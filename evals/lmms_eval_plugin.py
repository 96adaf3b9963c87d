"""An lmms-eval model backed by vlm_efficient, so the harness users know runs wrapped models, and the data loaders of
the task YAMLs shipped with it (lmms_eval_tasks/: lmms-eval's own tasks on local data and on the testbed suites).

    make lmms-eval                                    # lmms-eval 0.7.3 + what it imports; torch stays as it is
    lmms-eval --model vlm_efficient --tasks testbed_pope,testbed_mme --include_path "$(vlm-efficient lmms-eval --tasks-dir)" \\
        --model_args 'pretrained=testbed,methods="fastv:layer=2,ratio=0.5",batch_size=8' --log_samples --output_path out
    vlm-efficient lmms-eval --model vlm_efficient --tasks pope_local --data-dir DIR ...   # the same, exit status kept

lmms-eval (>= 0.7) finds the model through the entry point group "lmms_eval.models" (pyproject:
`[project.entry-points."lmms_eval.models"] vlm_efficient = "vlm_efficient.evals.lmms_eval_plugin:manifest"`).
lmms-eval splits --model_args at commas outside quotes: quote the spec, or write its commas as ';'.
`pretrained` takes what `vlm-efficient eval --model` takes (testbed, tiny:<family>, a directory, a hub id).

Each answer carries lmms-eval's token counts (input_tokens: the prompt's tokens, image tokens included; output_tokens:
the answer's tokens) plus the engine's statistics, under the names `vlm-efficient eval` writes in its samples:
visual_tokens, tokens_per_layer (this sample's), visual_tokens_per_layer, visual_tokens_kept, prefill_flops,
kv_cache_bytes, prefill_ms (time to first token) ... Figures of the whole batch (timings, memory) are the batch's;
per-sample shares (FLOPs, KV bytes) are the batch's total / batch size, as in `vlm-efficient eval`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

try:
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms as _Base
except ImportError:  # lmms-eval is optional: the module stays importable (and testable) without it
    _Base, GenerationResult, TokenCounts = object, None, object

DATA_DIR_ENV = "VLM_EFFICIENT_DATA_DIR"  # what --data-dir is for `vlm-efficient eval`, for the *_local task YAMLs
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lmms_eval_tasks")
CLASS_PATH = f"{__name__}.VLMEfficient"


def manifest():
    import sys

    from lmms_eval.models.registry_v2 import ModelManifest

    # `lmms-eval models` prints lmms-eval's own table, not the entry-point registry: list the plugin there too
    # (lmms_eval.models calls this while it is being imported: it is read from sys.modules)
    models = sys.modules.get("lmms_eval.models")
    if models is not None and hasattr(models, "AVAILABLE_SIMPLE_MODELS"):
        models.AVAILABLE_SIMPLE_MODELS.setdefault("vlm_efficient", CLASS_PATH)
    return ModelManifest(model_id="vlm_efficient", simple_class_path=CLASS_PATH)


@dataclass
class EfficiencyCounts(TokenCounts):
    """lmms-eval's per-answer token counts plus the engine's statistics; lmms-eval logs `to_dict()` per sample."""

    efficiency: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), **self.efficiency}


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
        kwargs.pop("max_batch_size", None)  # lmms-eval's --max_batch_size is for batch_size=auto, which is refused
        if kwargs:
            raise ValueError(f"vlm_efficient: unknown model_args {sorted(kwargs)} (a spec's commas must be quoted)")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"vlm_efficient: batch_size must be a whole number >= 1, not {batch_size!r}")
        state = dist_state()
        self._rank, self._world_size = (state.process_index, state.num_processes) if state else (0, 1)
        device = device or (str(state.device) if state else default_device())
        self.model, self.processor = load_eval_model(str(pretrained), device, getattr(torch, dtype))
        self.methods = str(methods).strip("\"'").replace(";", ",")
        vlm_efficient.wrap(self.model, self.methods)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.task_dict = getattr(self, "task_dict", {})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval passes --batch_size (default 1) and --device next to --model_args: a batch_size or device in
        --model_args wins over the default; given in both places with different values, it is refused."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        for key, default in (("batch_size", "1"), ("device", None)):
            if key in args and key in extra:
                if str(extra[key]) not in (default, str(args[key])):
                    raise ValueError(f"vlm_efficient: {key}={args[key]} in --model_args and --{key} {extra[key]} "
                                     f"differ: give it once")  # fmt: skip
                del extra[key]
        return cls(**args, **extra)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests) -> list:
        """Greedy answers, in batches of requests with equal generation arguments, in the requests' order; each with
        its token counts and the engine's statistics (EfficiencyCounts)."""
        from tqdm.auto import tqdm

        import vlm_efficient
        from vlm_efficient.models import build_prompt

        from .runner import batch_inputs, generate_batch

        out: list = [None] * len(requests)
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
                texts, efficiency = generate_batch(self.model, self.processor, inputs, tokens)
                stats = vlm_efficient.stats(self.model)
                for row, (i, text) in enumerate(zip(chunk, texts)):
                    for stop in until:  # lmms-eval's stop strings
                        text = text.split(stop)[0] if stop else text
                    out[i] = self._result(text, row, stats, efficiency)
                bar.update(len(chunk))
        bar.close()
        return out

    def _result(self, text: str, row: int, stats, efficiency: dict):
        per_sample = {"prompt_tokens": stats.prompt_tokens[row], "visual_tokens": stats.visual_tokens[row],
                      "tokens_per_layer": stats.tokens_per_layer_per_sample[row],
                      "visual_tokens_per_layer": stats.visual_tokens_per_layer}  # fmt: skip
        counts = EfficiencyCounts(
            input_tokens=stats.prompt_tokens[row],
            output_tokens=len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]),
            efficiency={**efficiency, **per_sample},
        )
        return GenerationResult(text=text, token_counts=counts)

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


# ----------------------------------------------------------------------------------------------------------------
# Documents of the shipped task YAMLs (process_docs): the loaders of `vlm-efficient eval`, so that both clients read
# the same rows. lmms-eval first loads a one-row placeholder (it always loads a dataset), which is replaced.


def _docs(task_name: str):
    def docs(_placeholder):
        from .tasks import get_task

        return get_task(task_name, os.environ.get(DATA_DIR_ENV)).load()

    docs.__name__ = f"{task_name}_docs"
    return docs


pope_docs, mme_docs, vqav2_docs, textvqa_docs, scienceqa_img_docs = map(_docs, ("pope", "mme", "vqav2", "textvqa",
                                                                               "scienceqa_img"))  # fmt: skip
testbed_pope_docs, testbed_mme_docs, testbed_vqa_docs = map(_docs, ("testbed_pope", "testbed_mme", "testbed_vqa"))
testbed_video_docs = _docs("testbed_video")


def testbed_video_doc_to_visual(doc) -> list:
    from .tasks import get_task

    return get_task("testbed_video").images(doc)


def testbed_video_doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    from .tasks import get_task

    return get_task("testbed_video").prompt(doc)


def testbed_video_process_results(doc, results) -> dict:
    from .tasks import get_task

    return {"accuracy": get_task("testbed_video").score(doc, results[0])["accuracy"]}


def gqa_docs(_placeholder):
    """GQA's instructions with their image as an `image` column, as lmms-eval's GQA task joins them."""
    import datasets

    from .datasets import DataError
    from .tasks import get_task

    task = get_task("gqa", os.environ.get(DATA_DIR_ENV))
    docs = task.load()
    missing = [i for i in docs["imageId"] if i not in task._where]
    if missing:
        raise DataError(f"{len(missing)} GQA images (e.g. {missing[0]}) are not in testdev_balanced_images")
    images = task._images.select([task._where[i] for i in docs["imageId"]]).select_columns(["image"])
    return datasets.concatenate_datasets([docs, images], axis=1)  # images stay encoded


def coco_caption_docs(_placeholder):
    from .datasets import SOURCES, load_table

    return load_table(SOURCES["coco_captions"], os.environ.get(DATA_DIR_ENV))


# ----------------------------------------------------------------------------------------------------------------
# `vlm-efficient lmms-eval ...`: lmms-eval's CLI with the shipped tasks, and an exit status that says whether it failed
# (lmms-eval 0.7.3 logs "Error during evaluation" and exits 0)

_LMMS_EVAL_MAIN = "import sys; sys.argv[0] = 'lmms-eval'; from lmms_eval.cli.dispatch import main; main()"


def _reports_error(line: str) -> bool:
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", line)  # loguru's colours
    return "Error during evaluation" in plain or re.search(r"\|\s*ERROR\s*\|", plain) is not None


def run_lmms_eval(argv: list[str]) -> int:
    """Run lmms-eval's CLI with `argv`; adds --include_path TASKS_DIR (unless given) and turns `--data-dir DIR` into
    VLM_EFFICIENT_DATA_DIR. Its output passes through; returns its exit status, or 1 when it logged an error."""
    import re
    import subprocess
    import sys
    import threading

    argv, env = list(argv), dict(os.environ)
    if "--data-dir" in argv:
        i = argv.index("--data-dir")
        if i + 1 >= len(argv):
            raise SystemExit("vlm-efficient lmms-eval: --data-dir needs a directory")
        env[DATA_DIR_ENV] = os.path.abspath(argv[i + 1])
        del argv[i : i + 2]
    if "--tasks-dir" in argv:  # where the shipped task YAMLs are, for lmms-eval --include_path
        print(TASKS_DIR)
        return 0
    if argv and argv[0].startswith("-") and "--include_path" not in argv and "--help" not in argv:
        argv += ["--include_path", TASKS_DIR]
    proc = subprocess.Popen([sys.executable, "-c", _LMMS_EVAL_MAIN, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    errors: list[bool] = []

    def relay(source, sink):  # passes the output through as it comes; notes whether a line reports an error
        pending = b""
        for chunk in iter(lambda: source.read1(1 << 16), b""):
            sink.write(chunk)
            sink.flush()
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            errors.extend(_reports_error(x.decode(errors="replace")) for x in lines)
        errors.append(_reports_error(pending.decode(errors="replace")))

    # loguru writes lmms-eval's log to stdout, tracebacks go to stderr: both are read at once
    readers = [threading.Thread(target=relay, args=(proc.stdout, sys.stdout.buffer)),
               threading.Thread(target=relay, args=(proc.stderr, sys.stderr.buffer))]  # fmt: skip
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    failed = any(errors)
    status = proc.wait()
    if status == 0 and failed:
        print("vlm-efficient lmms-eval: lmms-eval reported an error (above); exit status 1", file=sys.stderr)
        return 1
    return status
