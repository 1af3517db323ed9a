"""The ComposLoRA testbed runner (``tools/testbed.py``), run as a user runs it: against real ComfyUI
servers with the toy world, spread over two of them, one killed mid-run, interrupted and resumed,
judged by the toy detector and by a scripted stand-in for a VLM endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.server
PACK_DIR = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, str(PACK_DIR / "tools" / "testbed.py")]
TOY_SETS = PACK_DIR / "tools" / "testbed_toy_sets.json"
FAST = ["--toy", "--sets", str(TOY_SETS), "--steps", "6"]  # 32x32 toy images, few steps: about half a second an image


def run_testbed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=timeout, cwd=PACK_DIR)


def manifest(out: Path) -> list[dict]:
    """The finished images' entries (while a run writes, a line not yet ended is left out)."""
    path = out / "manifest.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    return [json.loads(line) for line in lines]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def running_on(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/queue", timeout=5) as response:
        return bool(json.load(response)["queue_running"])


# --- the composition sets ------------------------------------------------------------------------


def official_layout() -> dict:
    """A lora_info.json in the official layout: 3 characters and 2 of each other category (as ComposLoRA)."""
    counts = {"character": 3, "clothing": 2, "style": 2, "background": 2, "object": 2}
    return {
        category: [{"id": f"{category}_{i}", "name": f"{category} {i}", "trigger": [f"{category}{i} word", "extra"], "url": ""}
                   for i in range(1, count + 1)]
        for category, count in counts.items()
    }  # fmt: skip


def test_import_forms_the_480_composlora_sets_with_the_character_first(tmp_path):
    import testbed_sets

    info = tmp_path / "anime_lora_info.json"
    info.write_text(json.dumps(official_layout()))
    result = run_testbed("import", str(info), "--out", str(tmp_path / "sets.json"))
    assert result.returncode == 0, result.stderr
    assert "240 sets (N=2: 24, N=3: 72, N=4: 96, N=5: 48)" in result.stdout  # x 2 styles = the paper's 480
    loaded = testbed_sets.load(tmp_path / "sets.json")
    assert len(loaded.sets) == 240 and loaded.defaults["steps"] == 200 and loaded.strength == 0.8
    for cset in loaded.sets:
        assert cset.loras[0].category == "character"
        assert len({lora.category for lora in cset.loras}) == cset.n  # one LoRA per category
        assert cset.prompt == "masterpiece, best quality, " + ", ".join(w for lora in cset.loras for w in lora.trigger)
    assert loaded.sets[0].loras[0].file == "ComposLoRA/anime/character_1.safetensors"
    assert len(testbed_sets.load(info).sets) == 240  # the runner also reads the official file as it is


def test_our_set_file_format_and_its_checks(tmp_path):
    import testbed_sets

    toy = testbed_sets.load(TOY_SETS)
    assert [sum(1 for s in toy.sets if s.n == n) for n in (2, 3, 4)] == [6, 6, 2]
    assert toy.sets[0].id == "ruby-disk+cobalt-square" and toy.sets[0].prompt == "ruby, cobalt"
    document = json.loads(TOY_SETS.read_text())
    document["sets"] = [{"id": "backwards", "loras": ["lemon-stripe", "ruby-disk"]}]
    with pytest.raises(testbed_sets.SetFileError, match=r"character LoRA comes first.*move 'ruby-disk' to the front"):
        testbed_sets.from_document(document, "sets.json")
    document["sets"] = [["ruby-disk", "knight"]]
    with pytest.raises(testbed_sets.SetFileError, match="uses 'knight', not in \"loras\""):
        testbed_sets.from_document(document, "sets.json")


# --- bad inputs: a clear message naming the problem and the fix ----------------------------------


def test_bad_inputs_exit_with_a_message_naming_the_problem_and_the_fix(tmp_path, toy_server):
    from comfy_server import free_port

    (tmp_path / "broken.json").write_text('{"format": "loratorio-testbed-sets/1", "loras": {')
    wrong_lora = json.loads(TOY_SETS.read_text())
    wrong_lora["loras"]["ruby-disk"]["file"] = "toy-ruby-sphere.safetensors"
    (tmp_path / "wrong-lora.json").write_text(json.dumps(wrong_lora))
    server = ["--server", toy_server.url]
    cases = [
        (["--sets", str(tmp_path / "nope.json"), "--toy"], "no such set file"),
        (["--sets", str(tmp_path / "broken.json"), "--toy"], "not valid JSON (line 1"),
        ([*FAST, "--methods", "loratorio,blend"], "unknown method blend; choose from lora-merge-baseline"),
        ([*FAST, "--n", "1-3"], "--n '1-3': give N or LOW-HIGH with 2 <= LOW"),
        ([*FAST, "--n", "5"], "the set file has sets of N = 2, 3, 4 only"),
        (["--sets", str(TOY_SETS)], "give --checkpoint NAME"),
        ([*FAST, "--server", f"http://127.0.0.1:{free_port()}"], "cannot reach ComfyUI at http://127.0.0.1:"),
        ([*FAST, *server, "--sets", str(tmp_path / "wrong-lora.json")], "does not have the LoRA(s) toy-ruby-sphere.safetensors"),
        (
            [*FAST, *server, "--setting", "loratorio.tempreature=0.1"],
            "unknown setting 'tempreature' for loratorio; its settings:",
        ),
        ([*FAST, *server, "--sampler", "eulerish"], "sampler_name 'eulerish' is not offered"),
        ([*FAST, *server, "--judge", "vlm"], "--judge vlm needs --judge-url"),
        ([*FAST, *server, "--pairs", "loratorio:switch", "--methods", "loratorio,merge"], "--pairs 'loratorio:switch'"),
    ]
    for arguments, message in cases:
        result = run_testbed("run", *arguments, "--out", str(tmp_path / "out"))
        assert result.returncode == 2, (arguments, result.stdout, result.stderr)
        assert "testbed: error: " in result.stderr and message in result.stderr, (arguments, result.stderr)
    assert not (tmp_path / "out" / "images").exists()  # nothing was queued


# --- the runner: two servers, one killed mid-run; results; resume --------------------------------


def test_two_servers_one_killed_mid_run_lose_no_job_and_a_rerun_redoes_nothing(toy_server, tmp_path, comfyui_dir):
    import testbed_sets
    from toy_world import write_server_config

    from support.server import comfyui_server

    out = tmp_path / "out"
    methods = ["lora-merge-baseline", "lora-composite", "loratorio"]
    run = [*FAST, "--n", "2", "--seeds", "1,2", "--methods", ",".join(methods), "--out", str(out)]
    config = write_server_config(tmp_path / "second")
    with comfyui_server(comfyui_dir, tmp_path / "second", extra_args=("--extra-model-paths-config", str(config)),
                        env={"OMP_NUM_THREADS": "1"}) as second:  # fmt: skip
        process = subprocess.Popen([*TESTBED, "run", *run, "--server", toy_server.url, "--server", second.url],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PACK_DIR)  # fmt: skip
        try:
            wait_for(lambda: len(manifest(out)) >= 3 and running_on(second.url), 120, "a job running on the second server")
            os.killpg(second.process.pid, signal.SIGKILL)  # the second "GPU" goes away mid-job
            stdout, stderr = process.communicate(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, stderr
    assert f"{second.url} went away" in stderr and "is queued again for the other server(s)" in stderr
    assert "ETA" in stderr and "36/36 images" in stderr
    entries = manifest(out)
    set_ids = [cset.id for cset in testbed_sets.load(TOY_SETS).sets if cset.n == 2]
    expected = {f"{set_id}|{method}|{seed}" for set_id in set_ids for method in methods for seed in (1, 2)}
    assert len(entries) == 36 and {e["key"] for e in entries} == expected  # each image made exactly once
    assert {e["server"] for e in entries} == {toy_server.url, second.url}
    for entry in entries:
        with Image.open(out / entry["image"]) as image:
            assert image.size == (32, 32)

    # the results: per-set sheets, JSON and CSV, the detector's table per N and pair with intervals
    results = json.loads((out / "results.json").read_text())
    assert len(results["images"]) == 36 and not results["failed"]
    assert len(results["judgements"]) == 6 * 2 * 2  # sets x seeds x (composite, loratorio vs merge)
    rows = {(r["a"], r["b"], r["n"]): r for r in results["table"]}
    assert set(rows) == {("lora-composite", "lora-merge-baseline", "2"), ("loratorio", "lora-merge-baseline", "2")}
    for row in rows.values():
        assert row["pairs"] == 12
        for dimension in ("composition", "image_quality"):
            assert sum(row[f"{dimension}_{r}"] for r in ("win", "tie", "loss")) == 12
            assert 0 <= row[f"{dimension}_win_low"] <= row[f"{dimension}_win_rate"] <= row[f"{dimension}_win_high"] <= 1
    assert (out / "results.csv").read_text().count("\n") == 37 and (out / "judgements.csv").read_text().count("\n") == 25
    row_start = "| 2 | loratorio vs lora-merge-baseline | 12 |"
    assert row_start in stdout and row_start in (out / "table.md").read_text()
    sheets = sorted((out / "sheets").glob("*.png"))
    assert len(sheets) == 6
    with Image.open(sheets[0]) as sheet:
        assert sheet.width >= 3 * 256 and sheet.height >= 2 * 256

    # the same command again, on one server: everything is already done, nothing is redone
    times = {e["image"]: (out / e["image"]).stat().st_mtime_ns for e in entries}
    again = run_testbed("run", *run, "--server", toy_server.url)
    assert again.returncode == 0, again.stderr
    assert "36 already done, 0 to run" in again.stderr
    assert len(manifest(out)) == 36 and times == {p: (out / p).stat().st_mtime_ns for p in times}


def test_one_command_with_two_local_servers_interrupted_then_resumed_redoes_no_finished_image(toy_server, tmp_path):
    out = tmp_path / "out"
    common = ["run", *FAST, "--n", "3", "--seeds", "1", "--out", str(out)]
    process = subprocess.Popen([*TESTBED, *common, "--local-servers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=PACK_DIR)  # fmt: skip
    try:
        # both servers at work before Ctrl-C (under load the second can start well after the first)
        wait_for(lambda: len(manifest(out)) >= 4 and len({e["server"] for e in manifest(out)}) == 2, 240,
                 "four finished images, from both servers")  # fmt: skip
        process.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command to resume" in stderr
    urls = re.findall(r"started ComfyUI \d of 2 at (\S+)", stderr)
    assert len(urls) == 2 and "local ComfyUI server(s) stopped" in stderr
    for url in urls:  # the servers it started are gone
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/system_stats", timeout=5)
    before = manifest(out)
    done = len(before)
    assert 4 <= done < 30 and {e["server"] for e in before} == set(urls)
    times = {e["image"]: (out / e["image"]).stat().st_mtime_ns for e in before}
    resumed = run_testbed(*common, "--server", toy_server.url)
    assert resumed.returncode == 0, resumed.stderr
    assert f"30 images; {done} already done, {30 - done} to run" in resumed.stderr
    after = manifest(out)
    assert len(after) == len({e["key"] for e in after}) == 30  # no finished image was made again
    assert times == {p: (out / p).stat().st_mtime_ns for p in times}
    assert len(json.loads((out / "results.json").read_text())["images"]) == 30


def test_your_own_checkpoint_and_loras_through_the_packs_nodes(server, demo_models, tmp_path):
    """The seeded random-weight SD1.5 demo models stand in for a checkpoint and LoRAs of your own."""
    _, checkpoint, loras = demo_models
    sets = {
        "format": "loratorio-testbed-sets/1", "quality_tags": "masterpiece, best quality", "negative": "lowres", "strength": 0.8,
        "loras": {"character_1": {"file": loras[0], "category": "character", "name": "knight", "trigger": ["a knight"]},
                  "style_1": {"file": loras[1], "category": "style", "name": "watercolour", "trigger": ["watercolour"]}},
    }  # fmt: skip
    (tmp_path / "sets.json").write_text(json.dumps(sets))
    out = tmp_path / "out"
    result = run_testbed("run", "--sets", str(tmp_path / "sets.json"), "--checkpoint", checkpoint, "--server", server.url,
                         "--methods", "loratorio,switch,merge", "--setting", "switch.tau=1", "--steps", "2", "--size", "64",
                         "--seeds", "3", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    images = json.loads((out / "results.json").read_text())["images"]
    assert sorted(i["method"] for i in images) == ["lora-merge-baseline", "lora-switch", "loratorio"]
    assert all(i["prompt"] == "masterpiece, best quality, a knight, watercolour" for i in images)
    for image in images:
        with Image.open(out / image["image"]) as picture:
            assert picture.size == (64, 64)
    assert (out / "sheets" / "character_1+style_1.png").is_file()


# --- the VLM judge -------------------------------------------------------------------------------


class ScriptedVlm(http.server.ThreadingHTTPServer):
    """A TEST DOUBLE of an external service we cannot reach from the tests: an OpenAI-compatible VLM
    endpoint (``POST /v1/chat/completions``) with scripted answers. It wants the key ``test-key``,
    answers the first request with 429, the second with no scores, and then scores each image from
    ``truth`` (image sha256 -> (composition, image quality)) plus a positional bias: image 1 always
    gets +1 composition, as the paper observed of GPT-4V."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedVlmHandler)
        self.requests: list[dict] = []
        self.truth: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ScriptedVlmHandler(http.server.BaseHTTPRequestHandler):
    server: ScriptedVlm

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append({"at": time.monotonic(), "auth": self.headers.get("Authorization"), "body": body})
            count = len(self.server.requests)
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": "no such route"}})
        if self.headers.get("Authorization") != "Bearer test-key":
            return self.reply(401, {"error": {"message": "Incorrect API key provided"}})
        if count == 1:
            return self.reply(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "0"})
        parts = body["messages"][0]["content"]
        images = [base64.b64decode(p["image_url"]["url"].split(",", 1)[1]) for p in parts if p["type"] == "image_url"]
        if count == 2:
            text = "Both images are nice."
        else:
            scores = [self.server.truth[hashlib.sha256(image).hexdigest()] for image in images]
            first, second = (min(10.0, scores[0][0] + 1), scores[0][1]), scores[1]
            text = (
                "For Image 1:\nfine.\n\nFor Image 2:\nfine.\n\nScores:\n"
                f"**Image 1**: Composition Quality: {first[0]}/10, Image Quality: {first[1]}/10\n"
                f"Image 2: Composition Quality: {second[0]}/10, Image Quality: {second[1]}/10"
            )
        return self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})


@pytest.fixture
def scripted_vlm():
    server = ScriptedVlm()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_vlm_judge_asks_both_orders_cancels_positional_bias_retries_and_caches(toy_server, tmp_path, scripted_vlm, monkeypatch):
    out = tmp_path / "out"
    run = ["run", *FAST, "--n", "2", "--sets-per-n", "2", "--seeds", "1", "--methods", "loratorio,switch,merge",
           "--server", toy_server.url, "--out", str(out)]  # fmt: skip
    images = run_testbed(*run, "--judge", "none")
    assert images.returncode == 0, images.stderr
    truth = {"loratorio": (8.0, 6.0), "lora-switch": (5.0, 7.0), "lora-merge-baseline": (5.0, 7.0)}
    for entry in manifest(out):
        scripted_vlm.truth[hashlib.sha256((out / entry["image"]).read_bytes()).hexdigest()] = truth[entry["method"]]
    judge = ["--judge", "vlm", "--judge-url", scripted_vlm.url, "--judge-model", "scripted-vlm",
             "--judge-key-env", "TESTBED_TEST_KEY", "--judge-rpm", "1200"]  # fmt: skip
    monkeypatch.setenv("TESTBED_TEST_KEY", "test-key")
    judged = run_testbed(*run, *judge)
    assert judged.returncode == 0, judged.stderr
    assert "6 already done, 0 to run" in judged.stderr  # the images of the first run, now judged
    assert "judge: HTTP 429; retrying" in judged.stderr and "no parsable 'Scores:' block; asking again" in judged.stderr
    requests = scripted_vlm.requests
    assert len(requests) == 2 + 2 * 4  # the 429, the unparsable answer, then 2 sets x 2 pairs, each in both orders
    assert all(r["auth"] == "Bearer test-key" and r["body"]["model"] == "scripted-vlm" for r in requests)
    assert min(b["at"] - a["at"] for a, b in itertools.pairwise(requests)) >= 0.03  # 1200 a minute: 0.05 s apart
    text = requests[-1]["body"]["messages"][0]["content"][0]["text"]
    assert "1. character (red disk): ruby" in text or "1. character (orange triangle): amber" in text
    assert "Composition quality, 0 to 10" in text and "Image 1: Composition Quality: [score]/10" in text
    orders = [tuple(p["image_url"]["url"] for p in r["body"]["messages"][0]["content"][1:]) for r in requests[2:]]
    assert all((second, first) in orders for first, second in orders)  # every pair asked in both orders

    results = json.loads((out / "results.json").read_text())
    rows = {(r["a"], r["b"], r["n"]): r for r in results["table"]}
    better = rows[("loratorio", "lora-merge-baseline", "2")]
    assert better["composition_win"] == 2 and better["image_quality_loss"] == 2
    assert better["composition_mean_a"] == 8.5 and better["composition_mean_b"] == 5.5  # each got the +1 once
    same = rows[("lora-switch", "lora-merge-baseline", "2")]
    assert same["composition_tie"] == 2 and same["image_quality_tie"] == 2  # the positional bias cancelled out
    assert all(len(j["verdicts"]) == 2 for j in results["judgements"])
    assert len(list((out / "judge-cache").glob("*.json"))) == 8

    again = run_testbed(*run, *judge)  # every verdict comes from the cache
    assert again.returncode == 0, again.stderr
    assert len(scripted_vlm.requests) == len(requests)
    assert json.loads((out / "results.json").read_text())["table"] == results["table"]

    monkeypatch.setenv("TESTBED_TEST_KEY", "wrong-key")
    (out / "judge-cache").rename(tmp_path / "old-cache")
    refused = run_testbed(*run, *judge)
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr and "Incorrect API key" in refused.stderr and "--judge-key-env" in refused.stderr


# --- the pieces ----------------------------------------------------------------------------------


def test_score_parsing_and_intervals():
    from testbed_judges import Scores, parse_scores, summarise, wilson

    answer = (
        "Scores:\n**Image 1:** Composition Quality: 7.5/10, Image Quality: 8/10\n"
        "Image 2: Composition Quality: 6 / 10, Image Quality: 9.5/10"
    )
    assert parse_scores(answer) == (Scores(7.5, 8.0), Scores(6.0, 9.5))
    assert parse_scores("Image 1: Composition Quality: 7/10, Image Quality: 8/10") is None  # image 2 missing
    assert parse_scores(answer.replace("9.5/10", "12/10")) is None
    low, high = wilson(0, 10)
    assert low == 0 and 0.27 < high < 0.28
    low, high = wilson(5, 10)
    assert 0.23 < low < 0.24 and 0.76 < high < 0.77
    scores = {"a_scores": {"composition": 1, "image_quality": 1}, "b_scores": {"composition": 0, "image_quality": 1}}
    record = {"a": "x", "b": "y", **scores}
    rows = summarise([{**record, "n": 2, "outcome": {"composition": "win", "image_quality": "tie"}},
                      {**record, "n": 3, "outcome": {"composition": "loss", "image_quality": "tie"}}])  # fmt: skip
    overall = next(r for r in rows if r["n"] == "all")
    assert overall["pairs"] == 2 and overall["composition_win"] == 1 and overall["image_quality_tie_rate"] == 1.0
