"""The fast path where servers use it: threads sharing one fast-path model (its static buffers are shared, so calls
take turns) and copy.deepcopy of a fast-path model (a copy with its own fast path, graphs and buffers)."""

from __future__ import annotations

import copy
import threading

import torch

import vlm_efficient as ve
from test_engine import two_samples
from vlm_efficient.testing import image_placeholder, tiny_batch, tiny_image, tiny_model

SPEC = "fastv:layer=2,ratio=0.5"


def greedy(model, batch):
    with torch.no_grad():
        return model.generate(**batch, do_sample=False, max_new_tokens=5)


def test_threads_on_one_fast_path_model_get_their_sequential_answers():
    model, processor = tiny_model("llava")
    ph = image_placeholder(processor)
    batches = [
        two_samples(processor),
        tiny_batch(processor, [(f"describe {ph} now", [tiny_image(3)]), (f"{ph} and {ph} here", [tiny_image(4), tiny_image(5)])]),
    ]
    ve.wrap(model, SPEC, fast=True)
    expected = [greedy(model, batch) for batch in batches]
    results, errors = {}, []

    def client(worker: int) -> None:
        try:
            for trial in range(3):
                results[(worker, trial)] = greedy(model, batches[worker % 2])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(results) == 12
    for (worker, _), tokens in results.items():
        assert torch.equal(tokens, expected[worker % 2])


def test_deepcopy_of_a_fast_path_model_has_its_own_fast_path():
    model, processor = tiny_model("llava")
    batch = two_samples(processor)
    ve.wrap(model, SPEC, fast=True)
    expected = greedy(model, batch)
    copied = copy.deepcopy(model)
    assert ve.is_wrapped(copied)
    assert ve.engine_of(copied).fast_path is not None
    assert ve.engine_of(copied).fast_path is not ve.engine_of(model).fast_path
    assert torch.equal(greedy(copied, batch), expected)
    assert torch.equal(greedy(model, batch), expected)
    ve.unwrap(copied)
    assert "generate" not in vars(copied)
    assert torch.equal(greedy(copied, batch), greedy(ve.unwrap(model), batch))
