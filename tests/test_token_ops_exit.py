"""DyVTE visual-token exit: exit layers against the formula, learned gates from a file, the training script, and
decoding with the exited cache on every family."""

from __future__ import annotations

import pytest
import torch

import vlm_efficient as ve
from test_token_ops_helpers import (
    capture_entering,
    check_batched_equals_alone,
    check_generate,
    num_layers,
    recorded_probs,
    two_samples,
)
from vlm_efficient.evals import dyvte_train
from vlm_efficient.token_ops.dyvte import DyVTE, gate_features, load_gates, make_gate, save_gates
from vlm_efficient.testing import FAMILIES, tiny_model

MIN_LAYER = 1


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _visual_mass(probs, visual):
    """[B]: head-averaged attention of the last prompt row on the visual keys."""
    return (probs[:, :, -1, :].mean(1) * visual).sum(-1)


def _separating_threshold(masses):
    """A threshold under which the samples exit at different layers, when one exists."""
    values = sorted({float(v) for mass in masses for v in mass})
    for low, high in zip(values, values[1:]):
        threshold = (low + high) / 2
        exits = [next((i for i, m in enumerate(mass) if m < threshold), None) for mass in zip(*masses)]
        if len(set(exits)) > 1:
            return threshold
    return values[len(values) // 2] + 1e-6


def test_attention_rule_exits_where_the_last_token_stops_looking(family):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    layers = range(MIN_LAYER, num_layers(model) - 1)
    ve.wrap(model, [DyVTE(rule="fixed", min_layer=MIN_LAYER)])  # only to read the layout
    with torch.no_grad():
        model(**batch)
    visual = ve.engine_of(model).run.layout.visual
    ve.unwrap(model)
    probs = recorded_probs(model, batch)
    masses = [_visual_mass(probs[l]["probs"], visual).tolist() for l in layers]
    threshold = _separating_threshold(masses)
    expected = {}
    for b in range(visual.shape[0]):
        hit = [l for l, mass in zip(layers, masses) if mass[b] < threshold]
        if hit:
            expected[b] = hit[0]
    run, methods = check_generate(family, [DyVTE(rule="attention", threshold=threshold, min_layer=MIN_LAYER)])
    assert run.memory(methods[0]).get("exit_layer", {}) == expected
    for b, layer in expected.items():
        assert int(run.visual_per_layer[layer + 1][b]) == 0 < int(run.visual_per_layer[layer][b])


def _random_gates(model, path, seed=0):
    hidden = model.config.get_text_config().hidden_size
    torch.manual_seed(seed)
    gates = {l: make_gate(hidden, 16).eval() for l in range(num_layers(model) - 1)}
    for gate in gates.values():  # an output bias-like shift: some gates exit, some do not
        torch.nn.init.normal_(gate[3].weight, std=2.0)
    save_gates(path, gates, hidden, 16)
    return gates


def test_gate_decisions_equal_the_gates_on_the_hidden_states(family, tmp_path):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    gates = _random_gates(model, tmp_path / "gates.pt")
    run, methods = check_generate(family, [DyVTE(rule="gate", gates=str(tmp_path / "gates.pt"), min_layer=MIN_LAYER)])
    question = run.layout.after_visual_text
    with capture_entering(model, range(MIN_LAYER + 1, num_layers(model))) as after, torch.no_grad():
        model(**batch)
    entering = {l - 1: hidden for l, hidden in after.items()}
    expected = {}
    for l in range(MIN_LAYER, num_layers(model) - 1):  # before its exit a sample's states are the dense model's
        with torch.no_grad():
            logits = gates[l](gate_features(entering[l], question))
        for b in range(question.shape[0]):
            if b not in expected and logits[b, 1] > logits[b, 0]:
                expected[b] = l
    assert run.memory(methods[0]).get("exit_layer", {}) == expected


@pytest.mark.parametrize("rule", ["attention", "gate"])
def test_batched_equals_alone(family, rule, tmp_path):
    if rule == "gate":
        _random_gates(tiny_model(family)[0], tmp_path / "gates.pt", seed=1)
        method = DyVTE(rule="gate", gates=str(tmp_path / "gates.pt"), min_layer=MIN_LAYER)
    else:
        method = DyVTE(rule="attention", threshold=0.3, min_layer=MIN_LAYER)
    check_batched_equals_alone(family, [method])


def test_training_script_writes_loadable_gates_with_the_papers_labels(tmp_path):
    model, processor = tiny_model("llava")
    samples = list(dyvte_train.tiny_samples(model, processor, 4))
    data = dyvte_train.collect(model, samples, [1, 2])
    inputs, answer = samples[0]
    with torch.no_grad():
        full = model(**dyvte_train._append(inputs, answer), use_cache=False).logits
    ve.wrap(model, "dyvte:rule=fixed,min_layer=1")
    with torch.no_grad():
        exited = model(**dyvte_train._append(inputs, answer), use_cache=False).logits
    ve.unwrap(model)
    (p0, l0), (p1, l1) = dyvte_train._answer_stats(full, answer), dyvte_train._answer_stats(exited, answer)
    assert int(data[1][1][0]) == int(bool((p0 == p1).float().mean() > 0.99 and l1 < l0 * 1.03))
    path = tmp_path / "gates.pt"
    dyvte_train.main(["--model", "tiny:llava", "--out", str(path), "--samples", "3", "--steps", "5",
                      "--gate-hidden", "8", "--min-layer", "1"])  # fmt: skip
    assert sorted(load_gates(str(path), 64)) == [1, 2]
    ve.wrap(model, f"dyvte:rule=gate,gates={path},min_layer=1")
    ve.unwrap(model)


def test_bad_parameters_are_refused(tmp_path):
    model, _ = tiny_model("llava")
    with pytest.raises(ValueError, match="rule"):
        ve.wrap(model, "dyvte:rule=sometimes")
    with pytest.raises(ValueError, match="gates=<file>"):
        ve.wrap(model, "dyvte")
    with pytest.raises(ValueError, match="min_layer"):
        ve.wrap(model, "dyvte:rule=attention,min_layer=3")
    gates = {0: make_gate(32, 4)}
    save_gates(tmp_path / "small.pt", gates, 32, 4)
    with pytest.raises(ValueError, match="hidden size 32"):
        ve.wrap(model, f"dyvte:gates={tmp_path / 'small.pt'}")
    assert not ve.is_wrapped(model)


def test_bare_dyvte_loads_the_gates_shipped_for_its_model(tmp_path, monkeypatch):
    """A bare `dyvte` finds the shipped gate file whose fingerprint is the wrapped model's (the package ships the
    testbed's); a model without shipped gates is refused with the two ways forward."""
    from vlm_efficient.token_ops import dyvte

    path = tmp_path / "dyvte_gates_tiny.pt"
    dyvte_train.main(["--model", "tiny:llava", "--out", str(path), "--samples", "2", "--steps", "2",
                      "--gate-hidden", "8", "--min-layer", "1"])  # fmt: skip
    monkeypatch.setattr(dyvte, "SHIPPED_GATES", [path])
    model, _ = tiny_model("llava")
    ve.wrap(model, "dyvte:min_layer=1")
    assert sorted(ve.engine_of(model).methods[0].gate_modules) == [1, 2]
    ve.unwrap(model)
    other, _ = tiny_model("llava", seed=1)  # same shape, other weights: not the model the gates were trained for
    with pytest.raises(ValueError, match="rule=attention"):
        ve.wrap(other, "dyvte:min_layer=1")


def test_the_shipped_testbed_gates_run_a_bare_dyvte():
    from vlm_efficient.evals.testbed import load_testbed
    from vlm_efficient.token_ops.dyvte import SHIPPED_GATES, shipped_gates

    model, _ = load_testbed()
    assert [p.name for p in SHIPPED_GATES] == ["dyvte_gates_testbed.pt"] and shipped_gates(model) == SHIPPED_GATES[0]
    ve.wrap(model, "dyvte")
    assert sorted(ve.engine_of(model).methods[0].gate_modules) == [2, 3, 4]
    ve.unwrap(model)
