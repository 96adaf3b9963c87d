"""The lmms-eval model plugin, against lmms-eval's own base class and request type; skipped without lmms-eval."""

import pytest

lmms_eval = pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed")


def test_plugin_answers_like_the_runner():
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    import vlm_efficient
    from vlm_efficient.evals.lmms_eval_plugin import VLMEfficient, manifest
    from vlm_efficient.evals.runner import batch_inputs, generate_batch
    from vlm_efficient.models import build_prompt
    from vlm_efficient.testing import tiny_image

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("vlm_efficient") is VLMEfficient and issubclass(VLMEfficient, lmms)

    model = VLMEfficient(pretrained="tiny:llava", methods='"fastv:layer=2;ratio=0.5"', batch_size=2)
    assert model.methods == "fastv:layer=2,ratio=0.5" and vlm_efficient.is_wrapped(model.model)
    docs = [{"image": tiny_image(i), "q": f"Is there a cat number {i}?"} for i in range(3)]
    model.task_dict = {"toy": {"test": docs}}
    gen = {"max_new_tokens": 3, "until": ["\n\n"], "do_sample": False}
    requests = [Instance("generate_until", (d["q"], dict(gen), lambda doc: [doc["image"]], i, "toy", "test"), i,
                         {"task": "toy", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]  # fmt: skip
    answers = model.generate_until(requests)
    expect = []
    for chunk in (docs[:2], docs[2:]):
        inputs = batch_inputs(model.processor, [build_prompt(model.processor, d["q"]) for d in chunk],
                              [[d["image"]] for d in chunk], model.model)  # fmt: skip
        expect += generate_batch(model.model, model.processor, inputs, 3)[0]
    assert answers == [a.split("\n\n")[0] for a in expect]
    with pytest.raises(NotImplementedError):
        model.loglikelihood(requests)
    with pytest.raises(ValueError, match="unknown model_args"):
        VLMEfficient(pretrained="tiny:llava", methods="fastv:layer=2", ratio=0.5)
