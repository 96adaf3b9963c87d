"""The Gradio demo (`vlm-efficient demo`), end to end through gradio_client against a launched app on the testbed:
streamed answers equal the library's own, the numbers equal `stats`, the pictures show exactly the kept tokens and the
attention, two users at once get what each gets alone, bad input gets a clear message. The browser test is
tests/test_demo_browser.py."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from matplotlib import colormaps
from PIL import Image

import vlm_efficient as ve
from vlm_efficient.cli import held_out_sample, main
from vlm_efficient.demos import app as demo_app
from vlm_efficient.demos import render
from vlm_efficient.demos.runner import Request, Side
from vlm_efficient.evals.testbed import ask, build_prompt, load_testbed, tasks, world

FASTV = "fastv:layer=2,ratio=0.75"
COMPOSED = "visionzip:ratio=0.889+fastv:layer=2,ratio=0.5"
TIMES = ("time_to_first_token_ms", "decode_ms", "total_ms")
TOO_LARGE = "is too large: the demo takes images up to 40 megapixels; downscale it"


@pytest.fixture(scope="module")
def app():
    app = demo_app.launch("testbed", concurrency=2)
    yield app
    app.close()


@pytest.fixture(scope="module")
def testbed():
    return load_testbed()


def _describe(tmp_path, index: int):
    """(image file, image, question) of held-out scene `index` with the description question."""
    image = world.make_scene("test", index).image()
    path = tmp_path / f"scene_{index}.png"
    image.save(path)
    return str(path), image, tasks.DESCRIBE


def _ask(app, path, question, spec, max_new_tokens=24, layer=5, head="-1"):
    client = Client(app.local_url, verbose=False)
    job = client.submit(handle_file(path), question, spec, max_new_tokens, layer, head, api_name="/answer")
    return client, job


def _cells(picture: np.ndarray, view: np.ndarray, grid=24) -> np.ndarray:
    """[grid, grid] ratio of each cell's mean brightness in `picture` to that in `view`."""
    size = view.shape[0] // grid

    def means(a):
        return a.astype(float).reshape(grid, size, grid, size, -1).mean(axis=(1, 3, 4))

    return means(picture) / np.maximum(means(view), 1e-6)


def _reference(testbed, image, question, spec, max_new_tokens) -> dict:
    """What the library gives alone (the testbed's own `ask`): the answer, stats, the prompt positions each layer
    kept, the inputs."""
    model, processor = testbed
    ve.wrap(model, spec)
    try:
        answer = ask(model, processor, image, question, max_new_tokens)
        run = ve.engine_of(model).run
        kept = [None if p is None else set(p[0].tolist()) for p in (run.layer_positions[i] for i in range(6))]
        image_positions = run.layout.visual[0].nonzero().flatten().tolist()
        stats = ve.stats(model).to_dict()
    finally:
        ve.unwrap(model)
    inputs = processor(images=[image], text=[build_prompt(question)], return_tensors="pt")
    return {"answer": answer, "kept": kept, "image_positions": image_positions, "stats": stats, "inputs": inputs}


def test_answers_stream_and_equal_the_library(app, testbed, tmp_path):
    path, image, question = _describe(tmp_path, 0)
    client, job = _ask(app, path, question, FASTV)
    status, base_answer, wrapped_answer, table, kept, base_map, wrapped_map, caption, raw = job.result()
    assert status == "Done."

    # streamed: the answers grew token by token, every update a prefix of the final answer
    partial = [output[2] for output in job.outputs()]
    assert len(set(partial)) >= 5 and all(wrapped_answer.startswith(text) for text in partial)

    sides = {"base": "", "wrapped": FASTV}
    reference = {side: _reference(testbed, image, question, spec, 24) for side, spec in sides.items()}
    for side, answer in (("base", base_answer), ("wrapped", wrapped_answer)):
        assert answer == reference[side]["answer"] == raw[side]["answer"]
        assert raw[side]["stats"] == reference[side]["stats"]
        assert raw[side]["image_tokens_kept_per_layer"] == reference[side]["stats"]["visual_tokens_per_layer"]
    assert raw["wrapped"]["image_tokens_kept_per_layer"] == [576, 576, 144, 144, 144, 144]
    for name in ("time to first token", "KV cache", "prefill FLOPs", "tokens per layer"):
        assert f"| {name} |" in table
    base, wrapped = raw["base"], raw["wrapped"]
    speed_up = base["time_to_first_token_ms"] / wrapped["time_to_first_token_ms"]
    assert f"| {wrapped['time_to_first_token_ms']:.1f} ms | {speed_up:.2f}x speed-up |" in table
    assert f"{wrapped['stats']['kv_cache_bytes'] / 2**20:.2f} MiB" in table
    assert 0 < wrapped["time_to_first_token_ms"] < wrapped["total_ms"]

    # the overlay darkens exactly the image tokens FastV dropped at layer 5; the wrapped map is black there
    image_positions = reference["wrapped"]["image_positions"]
    dropped = np.array([p not in reference["wrapped"]["kept"][5] for p in image_positions]).reshape(24, 24)
    view = np.asarray(image)
    ratio = _cells(np.asarray(Image.open(kept)), view)
    assert np.allclose(ratio[dropped], render.DROPPED, atol=0.02) and np.allclose(ratio[~dropped], 1, atol=0.02)
    black = np.kron(dropped, np.ones((14, 14), bool))  # under a dropped token: only the grey view, a quarter of it
    grey = np.asarray(image.convert("L"), dtype=float)
    assert np.allclose(np.asarray(Image.open(wrapped_map), dtype=float)[black], 0.25 * grey[black][:, None], atol=1.5)
    assert "keeps 144 of 576" in caption

    # the base map is the last token's attention at layer 5 (mean of heads) of an eager-attention run, token by token
    eager = load_testbed(attn_implementation="eager")[0]
    with torch.inference_mode():
        attentions = eager(**reference["base"]["inputs"], output_attentions=True).attentions
    last = torch.stack([a[0, :, -1, image_positions] for a in attentions]).numpy()  # [layers, heads, 576]
    assert np.allclose(base["image_attention_per_layer_and_head"], last.sum(-1), atol=1e-5)
    weights = last[5].mean(0)
    colours = 0.75 * colormaps["inferno"](weights / weights.max())[:, :3] * 255
    shown = np.asarray(Image.open(base_map), dtype=float) - 0.25 * grey[..., None]
    assert np.allclose(shown.reshape(24, 14, 24, 14, 3).mean(axis=(1, 3)), colours.reshape(24, 24, 3), atol=2)

    # the layer slider redraws from this session's results: nothing is dropped before layer 2
    kept_1, _, _, caption_1 = client.predict(1, "-1", api_name="/pictures")
    assert np.allclose(_cells(np.asarray(Image.open(kept_1)), view), 1, atol=0.02)
    assert "Layer 1, mean of heads" in caption_1 and "keeps 576 of 576" in caption_1
    _, _, _, caption_head = client.predict(3, "7", api_name="/pictures")
    share = base["image_attention_per_layer_and_head"][3][7]
    assert "Layer 3, head 7" in caption_head and f"base {share:.2f}" in caption_head


def _outcome(job, timeout=None):
    """Everything a finished request shows except its times: texts, the table without timed rows, the caption, the raw
    results without times, the pictures."""
    status, base_answer, wrapped_answer, table, kept, base_map, wrapped_map, caption, raw = job.result(timeout)
    untimed = [row for row in table.splitlines() if " ms |" not in row and "tokens/s" not in row]
    texts = [status, base_answer, wrapped_answer, untimed]
    for side in raw.values():
        for key in TIMES:
            side.pop(key)
    pictures = [np.asarray(Image.open(p)) for p in (kept, base_map, wrapped_map)]
    return texts, caption, raw, pictures


def _same(outcome, reference) -> bool:
    (*seen, pictures), (*seen_reference, pictures_reference) = outcome, reference
    return seen == seen_reference and all(np.array_equal(a, b) for a, b in zip(pictures, pictures_reference))


def test_two_users_at_once_get_what_each_gets_alone(app, tmp_path):
    users = [(*_describe(tmp_path, 0)[::2], FASTV), (*_describe(tmp_path, 2)[::2], COMPOSED)]
    outcome = _outcome
    alone = [outcome(_ask(app, path, question, spec)[1]) for path, question, spec in users]
    jobs = [_ask(app, path, question, spec)[1] for path, question, spec in users]
    overlapped = False
    while not all(job.done() for job in jobs):
        overlapped |= all(job.outputs() and not job.done() for job in jobs)
        time.sleep(0.005)
    assert overlapped, "the two requests did not run at the same time"
    together = [outcome(job) for job in jobs]
    assert alone[0][2]["wrapped"]["answer"] != alone[1][2]["wrapped"]["answer"]
    for seen, seen_alone in zip(together, alone):
        assert _same(seen, seen_alone)  # answers, table without times, caption, raw results without times, pictures


STRESS_CLIENTS = 8
STRESS_TOKENS = 6
STRESS_TIMEOUT_S = 900  # a hang guard for the whole burst, not a speed bound


def test_eight_clients_at_once_with_different_methods_get_their_sequential_results(app, tmp_path):
    """8 clients (their own gradio_client sessions) send at once, each a different method on a different scene and
    layer / head; the app answers 2 at a time and queues the rest. Every result equals that client's sequential
    one, and none errors."""
    specs = ["", *demo_app.PRESETS.values()][:STRESS_CLIENTS]
    assert len(set(specs)) == STRESS_CLIENTS
    heads = ["-1", "0", "7"]
    users = [(_describe(tmp_path, index)[0], _describe(tmp_path, index)[2], spec, 1 + index % 5, heads[index % 3])
             for index, spec in enumerate(specs)]  # fmt: skip
    sequential = [_outcome(_ask(app, path, question, spec, STRESS_TOKENS, layer, head)[1])
                  for path, question, spec, layer, head in users]  # fmt: skip
    jobs = [_ask(app, path, question, spec, STRESS_TOKENS, layer, head)[1] for path, question, spec, layer, head in users]
    most_at_once, start = 0, time.monotonic()
    while not all(job.done() for job in jobs) and time.monotonic() - start < STRESS_TIMEOUT_S:
        most_at_once = max(most_at_once, sum(bool(job.outputs()) and not job.done() for job in jobs))
        time.sleep(0.005)
    together = [_outcome(job, STRESS_TIMEOUT_S) for job in jobs]
    assert most_at_once >= 2, "the app's two concurrent requests did not run at the same time"
    assert all(job.status().success for job in jobs)
    for (path, question, spec, _, _), seen, alone in zip(users, together, sequential):
        assert _same(seen, alone), spec
    assert len({alone[2]["wrapped"]["answer"] + str(alone[2]["wrapped"]["stats"]) for alone in sequential}) > 1


def test_the_api_takes_the_head_values_it_advertises(app, tmp_path):
    client = Client(app.local_url, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    advertised = [{p["parameter_name"]: p["type"] for p in endpoints[name]["parameters"]}["head"]
                  for name in ("/answer", "/pictures")]  # fmt: skip
    assert advertised[0] == advertised[1] and advertised[0]["type"] == "string"
    values = advertised[0]["enum"]
    assert values == ["-1", *map(str, range(8))]  # the testbed's 8 heads and their mean
    job = client.submit(handle_file(_describe(tmp_path, 1)[0]), "How many stars are there?", FASTV, 2, 5, values[0],
                        api_name="/answer")  # fmt: skip
    assert job.result()[0] == "Done." and "Layer 5, mean of heads" in job.result()[7]
    _, _, _, caption = client.predict(4, values[-1], api_name="/pictures")
    assert "Layer 4, head 7" in caption


def test_samples_fill_the_image_and_question(app):
    client = Client(app.local_url, verbose=False)
    choices = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/sample"]
    labels = choices["parameters"][0]["type"]["enum"]
    assert len(labels) == demo_app.SCENES + len(demo_app.PHOTOS)
    path, _, question, expected = client.predict(labels[1], api_name="/sample")
    image, count_question, answer = held_out_sample(1)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))
    assert question == count_question and expected == f"Expected answer: {answer}"
    path, _, question, expected = client.predict(labels[-1], api_name="/sample")
    assert Image.open(path).size == (128, 128) and expected == "" and question


@pytest.mark.parametrize(
    "case, message",
    [
        ("text file", "Invalid file type"),
        ("text named .png", "notes.png is not an image the demo can read"),
        ("45 megapixels", f"huge.png {TOO_LARGE} (9000 x 5000 pixels)."),
        ("196 megapixels", f"bomb.png {TOO_LARGE}."),  # past PIL's own limit
        ("empty question", "Type a question about the image."),
        ("unknown method", "unknown method 'fastx'"),
        ("bad parameter", "fastv: ratio=1.5 must be in [0, 1)"),
        ("two specs", "give one spec (join methods with '+', not ';')"),
        ("layer beyond the model", "fastv: layer=9 must be in [1, 5] for this 6-layer model"),
        ("no new tokens", "Value 0 is less than minimum value 1."),  # gradio's own check
    ],
)
def test_bad_input_gets_a_clear_message(app, tmp_path, case, message):
    path, _, question = _describe(tmp_path, 1)
    spec, max_new_tokens = FASTV, 8
    if case == "text file":
        path = tmp_path / "notes.txt"
        path.write_text("not an image")
    elif case == "text named .png":
        path = tmp_path / "notes.png"
        path.write_text("not an image")
    elif case == "45 megapixels":
        path = tmp_path / "huge.png"
        Image.new("1", (9000, 5000)).save(path)
    elif case == "196 megapixels":
        path = tmp_path / "bomb.png"
        Image.new("1", (14000, 14000)).save(path)
    elif case == "empty question":
        question = "   "
    elif case == "unknown method":
        spec = "fastx:ratio=0.5"
    elif case == "bad parameter":
        spec = "fastv:ratio=1.5"
    elif case == "two specs":
        spec = "fastv;dart"
    elif case == "layer beyond the model":
        spec = "fastv:layer=9"
    elif case == "no new tokens":
        max_new_tokens = 0
    client, job = _ask(app, str(path), question, spec, max_new_tokens)
    with pytest.raises(AppError, match=re.escape(message)):
        job.result()
    if case == "text named .png":  # the upload itself says so too
        with pytest.raises(AppError, match="notes.png is not an image"):
            client.predict(handle_file(str(path)), api_name="/upload")
    # and the app still answers
    assert client.predict(handle_file(_describe(tmp_path, 1)[0]), "How many stars are there?", FASTV, 2, 5, "-1",
                          api_name="/answer")[0] == "Done."  # fmt: skip


def _side(kept, sinks, attention) -> Side:
    """A side on a 4 x 4 token grid (prompt positions 10..25)."""
    cells = np.array([[10 + 4 * row + col, row, col] for row in range(4) for col in range(4)])
    return Side("fastv", grid=(4, 4), cells=cells, kept=kept, sinks=sinks, attention=attention,
                image_attention=attention.sum(-1), done=True)  # fmt: skip


def test_pictures_draw_each_token_in_its_cell():
    """Layer 1 keeps the right half of a 4 x 4 grid over a 64 x 64 view, token (0, 3) is a sink there; head 0
    spreads its attention, head 1 gives token (3, 3) the most."""
    kept, sinks, attention = np.ones((2, 16), bool), np.zeros((2, 16), bool), np.zeros((2, 2, 16))
    kept[1] = np.arange(16) % 4 >= 2
    sinks[1, 3] = True
    attention[1, 0] = np.linspace(0, 0.5, 16)
    attention[1, 1, 15] = 0.9
    side = _side(kept, sinks, attention)
    base = _side(np.ones((2, 16), bool), sinks, attention / 2)
    request = Request(Image.new("RGB", (64, 64), (200, 100, 50)), base, side)
    view = np.asarray(request.view, dtype=float)

    picture = np.asarray(render.kept_tokens(request.view, side, 1), dtype=float)
    assert np.allclose(picture[:, :32], view[:, :32] * render.DROPPED, atol=0.5)  # the left half is dark
    assert np.allclose(picture[16:, 32:], view[16:, 32:])  # the right half is kept
    assert np.allclose(picture[0, 48:64], render.SINK) and np.allclose(picture[2:14, 50:62], view[2:14, 50:62])
    assert np.allclose(np.asarray(render.kept_tokens(request.view, side, 0)), view)  # layer 0 keeps all, no sink

    grey = float(np.asarray(request.view.convert("L"))[0, 0])

    def colour(weight):  # a token's colour: its weight over the largest, on a quarter of the grey view
        return 0.25 * grey + 0.75 * np.array(colormaps["inferno"](weight)[:3]) * 255

    head_1 = np.asarray(render.attention_map(request.view, side, 1, 1), dtype=float)
    assert np.allclose(head_1[56, 56], colour(1.0), atol=0.6) and np.allclose(head_1[40, 40], colour(0.0), atol=0.6)
    assert np.allclose(head_1[20:30, 4:28], 0.25 * grey, atol=0.6)  # dropped: black under the grey
    mean = np.asarray(render.attention_map(request.view, side, 1, -1), dtype=float)
    assert np.allclose(mean[56, 56], colour(1.0), atol=0.6)  # (0.5 + 0.9) / 2: the largest mean weight
    assert np.allclose(mean[40, 40], colour((0.5 * 10 / 15) / 2 / 0.7), atol=0.6)  # token (2, 2)
    assert np.allclose(mean[0, 48:64], render.SINK)
    layer_1, layer_0 = render.caption(request, 1, 0), render.caption(request, 0, 0)
    assert "keeps 8 of 16" in layer_1 and "base 1, wrapped 1." in layer_1
    assert "keeps 16 of 16" in layer_0 and "base none, wrapped none." in layer_0
    assert "base 0.45, wrapped 0.90" in render.caption(request, 1, 1)


def test_methods_and_parameters_come_from_the_registry():
    from vlm_efficient.registry import METHODS, method_class

    assert demo_app.compose(["fastv", "var"], "fastv:layer=3") == "fastv:layer=3+" + method_class("var")().spec()
    assert demo_app.compose(["dart"], "fastv:layer=3") == method_class("dart")().spec()
    assert demo_app.compose([], "fastv") == ""
    text = demo_app.method_help("visionzip:ratio=0.889+fastv")
    assert method_class("visionzip").summary in text and f"`{method_class('fastv')().spec()}`" in text
    assert "No method" in demo_app.method_help("")
    for spec in demo_app.PRESETS.values():
        assert all(m.name in METHODS for m in ve.parse_methods(spec))


def test_command_line(capsys):
    assert main(["demo", "--concurrency", "0"]) == 2
    assert "--concurrency 0: serve at least one request at a time" in capsys.readouterr().err
    assert main(["demo", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
