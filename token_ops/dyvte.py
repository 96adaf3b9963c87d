"""DyVTE: dynamic visual-token exit (Wu et al., 2024, "Accelerating Multimodal Large Language Models via Dynamic
Visual-Token Exit and the Empirical Findings").

After some layer every visual token of a sample leaves the sequence at once (the paper's finding: after the model has
read the image, the visual tokens no longer change the answer). Each sample exits at its own layer, so a batch holds
samples at different stages; an exited sample's later layers and their KV cache hold no visual token.

- `rule="gate"` (the paper): a small gate per layer reads [mean hidden state of the question tokens before the last
  one, hidden state of the last prompt token] after layer l and says "exit" when its logit 1 beats logit 0. Gates are
  trained with `evals/dyvte_train.py` (model frozen; label = "dropping the visual tokens after l changes neither
  the argmax answer nor the loss by more than 3%", as in the public code) and loaded from `gates=<file>`. Without
  `gates`, the gates shipped with the package for the wrapped model are used: the package ships them for the
  testbed (dyvte_gates_testbed.pt, recognised by a fingerprint of the model: its shape and first embedding rows), so
  a bare `dyvte` runs there. For any other model a bare `dyvte` is refused with the two ways forward (train gates,
  or `rule=attention`): switching silently to another rule would put another method's numbers under its name.
- `rule="attention"` (training-free option): exit after the first layer l >= min_layer where the head-averaged
  attention that the last prompt token pays all visual tokens falls below `threshold`.
- `rule="fixed"`: every sample exits after layer `min_layer` (the training script's probe, and a baseline).

The public code's gate is Linear(2d, 2048, no bias) -> GELU -> Linear(2048, 2, no bias) and it checks every layer
from 0; it is eager, batch 1 and hard-codes the image span. Here decisions are taken after layers >= min_layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlm_efficient.method import AttentionRequest, Method
from vlm_efficient.registry import register_method

GATE_FORMAT = "dyvte-gates/1"
SHIPPED_GATES = sorted(Path(__file__).resolve().parent.glob("dyvte_gates_*.pt"))  # gates for the shipped testbeds


def model_fingerprint(model) -> str:
    """A model's identity for shipped gates: its language model's depth, width and vocabulary, and a checksum of its
    first embedding rows (4 significant digits: the same weights in fp16 or fp32 agree)."""
    config = model.config.get_text_config()
    embed = model.get_input_embeddings().weight[:8].detach().double().abs().sum()
    return f"{config.num_hidden_layers}x{config.hidden_size}/{config.vocab_size}/{float(embed):.4g}"


def shipped_gates(model) -> Path | None:
    """The shipped gate file trained for `model`, or None."""
    fingerprint = model_fingerprint(model)
    for path in SHIPPED_GATES:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("info", {}).get("fingerprint") == fingerprint:
            return path
    return None


def make_gate(hidden_size: int, gate_hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(2 * hidden_size, gate_hidden, bias=False),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(gate_hidden, 2, bias=False),
    )


def gate_features(hidden: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """[B, 2d]: mean of the question rows except the last row, and the last row (the last prompt token).

    hidden [B, n, d] (rows right-aligned: the last row is the last prompt token), question [B, n] bool."""
    last = hidden[:, -1]
    text = question.clone()
    text[:, -1] = False
    count = text.sum(1, keepdim=True)
    mean = (hidden.float() * text[..., None]).sum(1) / count.clamp(min=1)
    mean = torch.where(count > 0, mean, last.float())  # no question text: the last token stands in
    return torch.cat([mean, last.float()], dim=-1)


def save_gates(path, gates: dict[int, nn.Module], hidden_size: int, gate_hidden: int, **info) -> None:
    torch.save(
        {
            "format": GATE_FORMAT,
            "hidden_size": hidden_size,
            "gate_hidden": gate_hidden,
            "state": {str(layer): gate.state_dict() for layer, gate in gates.items()},
            "info": info,
        },
        path,
    )


def load_gates(path, hidden_size: int) -> dict[int, nn.Module]:
    if not path or not os.path.isfile(path):
        raise ValueError(f"dyvte: rule=gate needs gates=<file> written by evals/dyvte_train.py; got {path!r}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != GATE_FORMAT:
        raise ValueError(f"dyvte: {path} is not a DyVTE gate file ({GATE_FORMAT})")
    if data["hidden_size"] != hidden_size:
        raise ValueError(
            f"dyvte: the gates in {path} were trained for hidden size {data['hidden_size']}, this model has "
            f"{hidden_size}: train gates for this model with evals/dyvte_train.py"
        )
    gates = {}
    for layer, state in data["state"].items():
        gate = make_gate(hidden_size, data["gate_hidden"])
        gate.load_state_dict(state)
        gates[int(layer)] = gate.eval()
    return gates


@register_method
@dataclass
class DyVTE(Method):
    name = "dyvte"
    summary = "drop all visual tokens of a sample after the layer where a gate (or its attention) says it is done"

    rule: str = "gate"
    gates: str = ""
    threshold: float = 0.1
    min_layer: int = 2

    def bind(self, engine) -> None:
        if self.rule not in ("gate", "attention", "fixed"):
            raise ValueError(f"dyvte: rule={self.rule!r} must be gate, attention or fixed")
        if not 0 <= self.min_layer <= engine.num_layers - 2:
            raise ValueError(
                f"dyvte: min_layer={self.min_layer} must be in [0, {engine.num_layers - 2}]: tokens exit after a "
                "layer and at least one layer must follow"
            )
        if self.rule == "attention" and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"dyvte: threshold={self.threshold} must be in (0, 1): a share of attention")
        self.num_layers = engine.num_layers
        self.gate_modules = {}
        if self.rule == "gate":
            hidden_size = engine.text_config.hidden_size
            path = self.gates or shipped_gates(engine.model)
            if path is None:
                raise ValueError(
                    "dyvte: rule=gate needs gates=<file>; the package ships gates for the testbed only. Train gates "
                    "for this model (python -m vlm_efficient.evals.dyvte_train --out gates.pt, then "
                    "gates=gates.pt) or use the training-free rule=attention."
                )
            self.gate_modules = load_gates(path, hidden_size)
            missing = [l for l in range(self.min_layer, self.num_layers - 1) if l not in self.gate_modules]
            if missing:
                raise ValueError(f"dyvte: {path} has no gate for layers {missing}; raise min_layer or retrain")

    def prune_layers(self) -> set[int]:
        return set(range(self.min_layer + 1, self.num_layers))

    def attention_request(self, layer: int) -> AttentionRequest | None:
        if self.rule == "attention" and self.min_layer <= layer < self.num_layers - 1:
            return AttentionRequest(queries="last")
        return None

    def observe_attention(self, layer, run, stats) -> None:
        visual = run.current(run.layout.visual, fill=False).to(stats.received.device)
        mass = (stats.received * visual).sum(1)
        run.memory(self)[layer] = mass < self.threshold

    def _decide(self, layer: int, run, hidden: torch.Tensor) -> torch.Tensor:
        """[B] bool: exit after `layer`, read off the hidden states entering layer + 1."""
        if self.rule == "fixed":
            return torch.full((hidden.shape[0],), layer == self.min_layer, device=hidden.device)
        if self.rule == "attention":
            return run.memory(self).pop(layer).to(hidden.device)
        gate = self.gate_modules[layer].to(hidden.device)
        question = run.current(run.layout.after_visual_text, fill=False).to(hidden.device)
        with torch.no_grad():
            logits = gate(gate_features(hidden, question))
        return logits[:, 1] > logits[:, 0]

    def select_tokens(self, layer, run, hidden) -> torch.Tensor | None:
        memory = run.memory(self)
        exited = memory.setdefault("exited", torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device))
        exits = self._decide(layer - 1, run, hidden) & ~exited
        if not bool(exits.any()):
            return None
        memory.setdefault("exit_layer", {}).update({int(b): layer - 1 for b in exits.nonzero().flatten()})
        exited |= exits
        visual = run.current(run.layout.visual, fill=False).to(hidden.device)
        return ~(visual & exits[:, None])
