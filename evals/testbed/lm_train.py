"""Train testbed-lm's parts on the priors world, LLaVA's recipe in two stages, then evaluate on held-out scenes.

    python -m vlm_efficient.evals.testbed.lm_train --out DIR            # one H100: stage 1 + stage 2 + eval, < 20 min
    python -m vlm_efficient.evals.testbed.lm_train --out DIR --smoke    # a few steps on a few scenes (CPU check)

- stage 1 (alignment): the vision tower (from the committed testbed's ViT) and a fresh projector, the LM frozen;
- stage 2 (instruction tuning): a LoRA of rank 16 on every attention and MLP projection of the LM (lm.LoRA, a
  parametrization merged into the weights at load), the vision side on at a lower LR.

Every sample is one fresh training scene of the priors world (`priors.make_scene("train", i)`) and a multi-turn
dialogue about it (`tasks.conversation`: existence with random / popular / adversarial negatives, attributes,
counts, positions, text, yes/no checks, and a free-form caption in a share of dialogues) in SmolLM2's chat template;
loss on the answers and their <|im_end|>. As in the testbed's train.py, the projected image tokens also get the dense
patch labels of `world.patch_labels` through a linear head dropped after training (it makes the ViT learn to see).

DIR gets, per stage, stageN/ (the trained parts, `lm.save_trained_parts`), stageN_loss.json / .png and
stageN_log.txt; then checkpoint/ (the parts to commit as evals/testbed/lm_checkpoint/) and eval.json (held-out
POPE random / popular / adversarial, VQA colour / count / position / text, MME, caption recall and CHAIR, on the
test split of the priors world, from the model assembled from checkpoint/ exactly as users load it). A rerun with
the same DIR skips the finished stages. Each stage has a time budget: after a timing window its step count is
lowered to fit (never raised), so the whole run stays under 20 minutes on one H100; the log says the count used.
Estimated from FLOPs (ASSUMED_H100_FLOPS): stage 1 ~110 s (budget 300 s), stage 2 ~380 s (budget 480 s), the eval
1-2 min. `--stop-after stage1` / `stage2` cuts the run into commands of under 10 minutes each (rerun to go on).
The GPU machine needs `gguf` (a wheel) and the GGUF file ($VLM_EFFICIENT_SMOLLM2_GGUF, lm.py) but not peft.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vlm_efficient.evals.testbed import lm as L
from vlm_efficient.evals.testbed import priors, tasks, world
from vlm_efficient.evals.testbed.train import PatchHeads, collate, lr_at, normalise, answer_loss, run_probe, save_curve

STAGE1 = dict(
    seed=101, steps=1200, batch_size=32, lr=1e-3, vision_lr=2e-4, lora_rank=0, lora_alpha=0, warmup=100,
    min_lr_frac=0.1, weight_decay=0.0, betas=(0.9, 0.95), grad_clip=1.0, max_turns=6, caption_prob=0.5,
    aux_weight=0.5, aux_centre_pos_weight=20.0, index_offset=0, time_budget_s=300, workers=14, log_every=25,
    probe_every=300, turn_weights=None,
)  # fmt: skip
STAGE2 = dict(
    STAGE1, seed=202, steps=2600, lr=3e-4, vision_lr=5e-5, lora_rank=16, lora_alpha=32, warmup=100, max_turns=10,
    caption_prob=0.4, aux_weight=0.2, index_offset=20_000_000, time_budget_s=480, probe_every=500,
)  # fmt: skip
STAGES = {"stage1": STAGE1, "stage2": STAGE2}
SMOKE = dict(steps=2, batch_size=2, warmup=1, workers=0, log_every=1, probe_every=3, time_budget_s=None)
SMOKE_EVAL_N = 1
EVAL_N = 150
# For the printed estimate only: sustained bf16 throughput this small model gets on one H100 (576-wide matmuls run
# far below the card's peak); the logs give the measured times.
ASSUMED_H100_FLOPS = 150e12


def encode_dialogue(tokenizer, turns, n_image_tokens: int):
    """input_ids / labels of a dialogue in the chat template (lm.CHAT_TEMPLATE, the <image> placeholder expanded),
    token for token what the processor gives; labels on the answers and their <|im_end|> only. Pieces are cut at
    special tokens, which the tokenizer never merges across, so encoding them apart changes nothing."""
    enc = tokenizer.backend_tokenizer.encode
    image = tokenizer.convert_tokens_to_ids(L.IMAGE_TOKEN)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def text(s):
        return enc(s, add_special_tokens=False).ids

    ids = text(f"<|im_start|>system\n{L.SYSTEM_PROMPT}<|im_end|>\n")
    labels = [-100] * len(ids)
    for k, (question, answer) in enumerate(turns):
        seg = text("<|im_start|>user\n") + ([image] * n_image_tokens + text("\n") if k == 0 else [])
        seg += text(f"{question}<|im_end|>\n<|im_start|>assistant\n")
        ans = text(answer) + [end]
        newline = text("\n")
        ids += seg + ans + newline
        labels += [-100] * len(seg) + ans + [-100] * len(newline)
    return ids, labels


class Dialogues(torch.utils.data.Dataset):
    """Sample i = priors-world training scene (offset + i) + a dialogue seeded by (seed, i):
    (uint8 HWC image, ids, labels, patch labels)."""

    def __init__(self, tokenizer, n: int, cfg: dict, n_image_tokens: int):
        self.tokenizer, self.n, self.cfg, self.n_image_tokens = tokenizer, n, cfg, n_image_tokens

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i += self.cfg["index_offset"]
        scene = priors.make_scene("train", i)
        rng = random.Random(self.cfg["seed"] * 1_000_003 + i)
        cfg = self.cfg
        turns = tasks.conversation(scene, rng, cfg["max_turns"], cfg["caption_prob"], cfg["turn_weights"])
        ids, labels = encode_dialogue(self.tokenizer, turns, self.n_image_tokens)
        return np.asarray(scene.image()), ids, labels, world.patch_labels(scene)


def probe_set(tokenizer, n_image_tokens: int, per_task: int):
    """Held-out (validation split) single-turn questions, for the teacher-forced exact-match probes of run_probe."""
    items = []
    for cat in ("random", "popular", "adversarial"):
        rows = tasks.pope("validation", n_images=per_task // 3 + 4, with_images=False, categories=(cat,),
                          world="priors")  # fmt: skip
        items += [(f"pope_{cat}", r["image_source"], r["question"], r["answer"].capitalize()) for r in rows[:per_task]]
    for r in tasks.vqa("validation", n_per_task=per_task, with_images=False, world="priors"):
        items.append((r["task"], r["image_id"], r["question"], r["multiple_choice_answer"]))
    out = []
    for task, image_id, question, answer in items:
        scene = priors.make_scene("validation", int(image_id.rsplit("_", 1)[1]))
        ids, labels = encode_dialogue(tokenizer, [(question + tasks.SHORT_SUFFIX, answer)], n_image_tokens)
        out.append((task, np.asarray(scene.image()), ids, labels, world.patch_labels(scene)))
    return out


def initial_parts_config() -> dict:
    """Stage 1 starts from the committed testbed's ViT (its config here, its weights in `initial_model`)."""
    from transformers import AutoConfig

    from vlm_efficient.evals.testbed import TESTBED_DIR

    return {"vision_config": AutoConfig.from_pretrained(TESTBED_DIR).vision_config.to_dict(), "lora": {}}


def initial_model():
    """(model, processor): the pretrained LM, the testbed's ViT, a fresh projector (seeded by the caller)."""
    from vlm_efficient.evals.testbed import load_testbed

    model, processor = L.build_model(initial_parts_config())
    testbed, _ = load_testbed()
    model.model.vision_tower.load_state_dict(testbed.model.vision_tower.float().state_dict())
    return model, processor


def estimate_seconds(model, cfg: dict, tokens_per_sample: float, lm_trained: bool) -> float:
    """FLOPs of a stage / ASSUMED_H100_FLOPS: 6 N per token where weights train, 4 N through the frozen LM
    (forward + input gradients)."""
    lm = sum(p.numel() for p in model.model.language_model.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    n_patches = model.config.image_seq_length + 1
    per_sample = (6 if lm_trained else 4) * lm * tokens_per_sample + 6 * vision * n_patches
    return cfg["steps"] * cfg["batch_size"] * per_sample / ASSUMED_H100_FLOPS


def train_stage(name: str, cfg: dict, out: Path, init: Path | None, smoke: bool) -> None:
    """One stage: from the initial model (stage 1) or `init`'s parts; saves out/name/ + the loss curve and log."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model, processor = L.assemble(init) if init else initial_model()
    model.to(device).train()
    tokenizer = processor.tokenizer
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    lora = L.add_lora(model.model.language_model, cfg["lora_rank"], cfg["lora_alpha"]) if cfg["lora_rank"] else []
    vision = list(model.model.vision_tower.parameters())
    projector = list(model.model.multi_modal_projector.parameters())
    n_image_tokens = model.config.image_seq_length
    heads = PatchHeads(model.config.text_config.hidden_size, int(math.isqrt(n_image_tokens)),
                       cfg["aux_centre_pos_weight"]).to(device)  # fmt: skip
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(lambda mod, inp, o: captured.__setitem__("f", o))
    rest = projector + lora + list(heads.parameters())
    groups = [{"params": vision, "lr": cfg["vision_lr"], "base_lr": cfg["vision_lr"]},
              {"params": rest, "lr": cfg["lr"], "base_lr": cfg["lr"]}]  # fmt: skip
    opt = torch.optim.AdamW(groups, betas=cfg["betas"], weight_decay=cfg["weight_decay"], fused=amp)
    trained = [p for g in groups for p in g["params"]]

    data = Dialogues(tokenizer, 10**8, cfg, n_image_tokens)
    sample_tokens = np.mean([len(data[i][1]) for i in range(8)])
    est = estimate_seconds(model, cfg, sample_tokens, lm_trained=bool(lora))
    full = STAGES[name]
    print(f"{name}: {cfg['steps']} steps x {cfg['batch_size']} dialogues (~{sample_tokens:.0f} tokens each); "
          f"estimated {est:.0f} s on one H100 (at {ASSUMED_H100_FLOPS / 1e12:.0f} TFLOP/s sustained); "
          f"time budget {cfg['time_budget_s']} s; the full recipe's {name}: {full['steps']} x {full['batch_size']}, "
          f"estimated {estimate_seconds(model, full, sample_tokens, bool(lora)):.0f} s, at most "
          f"{full['time_budget_s']} s", flush=True)  # fmt: skip
    # transformers 5.17's GGUF tokenizer sets no pad token (5.25 does); padding is masked out of the loss
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg["workers"], drop_last=True,
        collate_fn=lambda b: collate(b, pad_id=pad_id), pin_memory=amp,
        prefetch_factor=4 if cfg["workers"] else None,
    )  # fmt: skip
    probe = probe_set(tokenizer, n_image_tokens, per_task=1 if smoke else 48)

    from tqdm.auto import tqdm

    total, history, probes = cfg["steps"], [], []
    bar = tqdm(total=total, desc=name, unit="step", mininterval=10)
    t_start = time.time()
    step, t_window = 0, None
    for images, input_ids, labels, aux in loader:
        if step >= total:
            break
        schedule = dict(cfg, lr=1.0)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_at(step, total, schedule)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = answer_loss(model, normalise(images, device), input_ids.to(device, non_blocking=True),
                               labels.to(device, non_blocking=True))  # fmt: skip
            aux_loss, _, aux_acc = heads(captured.pop("f"), aux.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        (loss + cfg["aux_weight"] * aux_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg["grad_clip"])
        opt.step()
        step += 1
        bar.update(1)
        if step == 20:
            t_window = time.time()
        if cfg["time_budget_s"] and step == 60 and t_window:
            per_step = (time.time() - t_window) / 40
            fit = int((cfg["time_budget_s"] - (time.time() - t_start)) / per_step) + step
            if fit < total:
                print(f"\n{name}: {per_step * 1e3:.0f} ms/step: {fit} steps fit the time budget (configured {total})",
                      flush=True)  # fmt: skip
                total = fit
                bar.total = total
        if step % cfg["log_every"] == 0 or step in (1, total):
            record = {"step": step, "loss": round(loss.item(), 5), "aux": round(aux_loss.item(), 4),
                      "aux_shape_acc": round(aux_acc.item(), 4), "lr": opt.param_groups[1]["lr"],
                      "grad_norm": round(grad_norm.item(), 4),
                      "elapsed_s": round(time.time() - t_start, 1)}  # fmt: skip
            history.append(record)
            bar.write(" ".join(f"{k}={v}" for k, v in record.items()))
        if step % cfg["probe_every"] == 0 or step == total:
            captured.clear()
            probes.append({"step": step, "acc": run_probe(model, probe, device, amp)})
            captured.clear()
            print(f"\n{name} probe step={step} " + " ".join(f"{k}={v:.3f}" for k, v in probes[-1]["acc"].items()),
                  flush=True)  # fmt: skip
    bar.close()
    seconds = time.time() - t_start
    lora_config = {"rank": cfg["lora_rank"], "alpha": cfg["lora_alpha"]} if lora else {}
    L.save_trained_parts(model, out / name, lora_config)
    record = {"stage": name, "config": dict(cfg, steps=step), "init_from": str(init) if init else "testbed ViT",
              "train_seconds": round(seconds, 1), "estimated_seconds": round(est, 1), "device": str(device),
              "gpu": torch.cuda.get_device_name() if amp else None, "torch": torch.__version__,
              "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if amp else None,
              "history": history, "probes": probes}  # fmt: skip
    (out / f"{name}_loss.json").write_text(json.dumps(record, indent=1))
    save_curve(history, probes, out / f"{name}_loss.png")
    print(f"{name}: {step} steps in {seconds:.0f} s (estimated {est:.0f} s); parts in {out / name}", flush=True)


class _Tee:
    """Writes to the terminal and a log file."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()

    def flush(self):
        for s in self.streams:
            s.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (rerun with it to resume after a finished stage)")
    ap.add_argument("--smoke", action="store_true", help="a few steps on a few scenes, a tiny eval (CPU check)")
    ap.add_argument("--eval-n", type=int, default=None, help=f"held-out scenes / questions per task (default {EVAL_N})")
    ap.add_argument("--time-budgets", default=None, metavar="S1,S2",
                    help="each stage's time budget in seconds, instead of the recipe's (a shorter run where GPU time is "
                         "scarce; the log and <stage>_loss.json record the steps it fitted)")  # fmt: skip
    ap.add_argument("--stop-after", choices=list(STAGES), default=None,
                    help="stop after this stage (a rerun with the same --out goes on from there): for machines that "
                         "limit the length of one command")  # fmt: skip
    args = ap.parse_args(argv)
    budgets = None
    if args.time_budgets:
        try:
            budgets = [float(b) for b in args.time_budgets.split(",")]
        except ValueError:
            budgets = []
        if len(budgets) != len(STAGES) or min(budgets, default=0) <= 0:
            ap.error(f"--time-budgets takes {len(STAGES)} positive numbers of seconds, one per stage: e.g. 300,480")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train_log.txt", "a")
    stdout = sys.stdout
    sys.stdout = _Tee(stdout, log)
    try:
        t0 = time.time()
        L.language_model_dir()  # the GGUF conversion, once, before the stages
        print(f"language model ready ({time.time() - t0:.0f} s)", flush=True)
        init = None
        for index, (name, cfg) in enumerate(STAGES.items()):
            cfg = dict(cfg, **(SMOKE if args.smoke else {}))
            if budgets is not None:
                cfg["time_budget_s"] = budgets[index]
            if (out / f"{name}_loss.json").exists():
                print(f"{name}: done already ({out / name}), skipped", flush=True)
            else:
                train_stage(name, cfg, out, init, args.smoke)
            init = out / name
            if name == args.stop_after:
                print(f"stopped after {name} (--stop-after)", flush=True)
                return
        shutil.copytree(init, out / "checkpoint", dirs_exist_ok=True)
        evaluate_checkpoint(out / "checkpoint", out, args.eval_n or (SMOKE_EVAL_N if args.smoke else EVAL_N))
        print(f"all done in {time.time() - t0:.0f} s", flush=True)
    finally:
        sys.stdout = stdout
        log.close()


def evaluate_checkpoint(parts: Path, out: Path, n: int) -> dict:
    """Held-out eval of the model assembled from `parts` (as users load it), fp32, on the priors world's test split."""
    from vlm_efficient.evals.testbed import evaluate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = L.assemble(parts)
    model.to(device).eval()
    t = time.time()
    results = evaluate.evaluate(model, processor, n=n, batch_size=64, world="priors")
    results["config"] = {"n": n, "split": "test", "world": "priors", "device": device, "dtype": "float32",
                         "seconds": round(time.time() - t, 1)}  # fmt: skip
    print(evaluate.summary(results), flush=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
