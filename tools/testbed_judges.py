"""Judges for ``tools/testbed.py``: the paper's pairwise VLM protocol, the toy world's detector, and
win/tie/loss tables with intervals.

The VLM protocol (Multi-LoRA Composition, section 4 and ``evaluate.py`` of the official repository):
the judge sees the elements to compose (category, name, trigger words) and two images, and scores
each image 0-10 (in 0.5 steps) on composition quality (3 points off per missing or wrong element, 1
per missing feature, 1 for disharmony) and image quality (3 off per deformity, 2 for texture, light
or colour problems, 1 per minor flaw), ending with a fixed ``Scores:`` block. Each pair is asked in
both orders and each image's two scores averaged, which cancels the judge's positional bias; the
higher average wins that dimension, equal averages tie.

Any OpenAI-compatible chat-completions endpoint works (OpenAI, Azure, vLLM, Ollama, LM Studio ...):
requests are spaced by a rate limit, retried with backoff on 429/5xx and connection errors, and
every parsed verdict is cached on disk by (endpoint, model, prompt, both images' hashes, settings),
so a re-run asks nothing twice.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DIMENSIONS = ("composition", "image_quality")
DIMENSION_TITLES = {"composition": "composition quality", "image_quality": "image quality"}
RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}

# The paper's rubric (its criteria, scale, point deductions and answer format), in our own words:
# the official wording is not licensed for reuse. Scores parse the same way.
CRITERIA = """Score each of the two images on two dimensions.

Composition quality, 0 to 10 in steps of 0.5 (10 = best):
- take off 3 points when an element is absent or drawn wrongly;
- take off 1 point for every missing or wrong feature of an element;
- take off 1 point when the elements clash or sit together inconsistently;
- take off more for a composition that is incoherent, unimaginative or implausible.

Image quality, 0 to 10 in steps of 0.5 (10 = best):
- take off 3 points for every deformity (extra limbs or fingers, a distorted face, wrong proportions);
- take off 2 points for visible problems of texture, lighting or colour;
- take off 1 point for every small flaw;
- take off more for anything else that hurts the clarity or look of the image.

Answer in this form:

For Image 1:
[why you gave its scores]

For Image 2:
[why you gave its scores]

Scores:
Image 1: Composition Quality: [score]/10, Image Quality: [score]/10
Image 2: Composition Quality: [score]/10, Image Quality: [score]/10

Compare the two images step by step. Be critical, and avoid giving the two images equal scores on both dimensions."""

SCORE_LINE = re.compile(
    r"image\s*([12])\W*:?\W*composition\s+quality\W*:?\W*(\d+(?:\.\d+)?)\s*/\s*10\W+image\s+quality\W*:?\W*(\d+(?:\.\d+)?)\s*/\s*10",
    re.IGNORECASE,
)


class JudgeError(RuntimeError):
    """The judge cannot go on (refused key, unknown model, endpoint away); the message says what to do."""


@dataclass(frozen=True)
class Scores:
    composition: float
    image_quality: float

    def as_dict(self) -> dict[str, float]:
        return {"composition": self.composition, "image_quality": self.image_quality}


def mean_scores(first: Scores, second: Scores) -> Scores:
    return Scores((first.composition + second.composition) / 2, (first.image_quality + second.image_quality) / 2)


# --- the VLM protocol ------------------------------------------------------------------------


def eval_prompt(elements: list[tuple[str, str, tuple[str, ...]]]) -> str:
    """The judge's instructions for a set: ``elements`` are (category, name, trigger words) in set order."""
    lines = [
        f"{index}. {category} ({name}): {', '.join(features)}" for index, (category, name, features) in enumerate(elements, 1)
    ]
    return (
        "Two text-to-image models were asked to compose several elements into one image. Compare their images. "
        "The elements, each with its key features:\n\n" + "\n".join(lines) + "\n\n" + CRITERIA
    )


def parse_scores(text: str) -> tuple[Scores, Scores] | None:
    """(image 1, image 2) from the answer's score lines (the last line per image wins); None when absent or out of range."""
    found: dict[str, Scores] = {}
    for number, composition, quality in SCORE_LINE.findall(text.replace("*", "")):
        scores = Scores(float(composition), float(quality))
        if not (0 <= scores.composition <= 10 and 0 <= scores.image_quality <= 10):
            return None
        found[number] = scores
    if set(found) != {"1", "2"}:
        return None
    return found["1"], found["2"]


class RateLimit:
    """At most ``per_minute`` requests a minute, evenly spaced, shared by every caller."""

    def __init__(self, per_minute: float) -> None:
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            delay = max(0.0, self.next_at - now)
            self.next_at = max(now, self.next_at) + self.interval
        if delay:
            time.sleep(delay)


@dataclass
class VlmSettings:
    url: str
    model: str
    key: str | None
    cache_dir: Path
    per_minute: float = 20.0
    retries: int = 5
    parse_retries: int = 3
    temperature: float = 1.0  # the paper's setting
    max_tokens: int = 2048
    timeout: float = 120.0


def endpoint(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


class VlmJudge:
    """Pairwise verdicts from an OpenAI-compatible chat endpoint, cached on disk."""

    def __init__(self, settings: VlmSettings, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.url = endpoint(settings.url)
        self.limit = RateLimit(settings.per_minute)
        self.say = say
        self.requests = 0
        settings.cache_dir.mkdir(parents=True, exist_ok=True)

    def cache_key(self, prompt: str, first: bytes, second: bytes) -> str:
        s = self.settings
        parts = [self.url, s.model, prompt, hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()]
        parts += [repr(s.temperature), str(s.max_tokens)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def request(self, prompt: str, first: bytes, second: bytes) -> str:
        content: list[dict] = [{"type": "text", "text": prompt}]
        for image in (first, second):
            content.append(
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}
            )
        body = {
            "model": self.settings.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.settings.max_tokens,
            "temperature": self.settings.temperature,
        }
        headers = {"Content-Type": "application/json"}
        if self.settings.key:
            headers["Authorization"] = f"Bearer {self.settings.key}"
        for attempt in range(self.settings.retries + 1):
            self.limit.wait()
            self.requests += 1
            try:
                request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers)
                with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                    answer = json.load(response)
                return str(answer["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as error:
                detail = error.read()[:500].decode(errors="replace")
                if error.code not in RETRY_STATUSES:
                    raise JudgeError(refusal_message(self.url, self.settings.model, error.code, detail)) from None
                wait = retry_after(error.headers.get("Retry-After"), attempt)
                problem = f"HTTP {error.code}"
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                wait, problem = min(60.0, 2.0**attempt), str(getattr(error, "reason", error))
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                raise JudgeError(
                    f"{self.url} did not answer in the chat-completions format; give an OpenAI-compatible URL"
                ) from None
            if attempt == self.settings.retries:
                raise JudgeError(
                    f"the judge at {self.url} failed {attempt + 1} times ({problem}); check --judge-url, or lower --judge-rpm"
                )
            self.say(f"judge: {problem}; retrying in {wait:.1f} s")
            time.sleep(wait)
        raise AssertionError("unreachable")

    def verdict(self, prompt: str, first: bytes, second: bytes) -> tuple[Scores, Scores, str]:
        """Scores of (first, second) shown in that order, and the cache key of the verdict."""
        key = self.cache_key(prompt, first, second)
        path = self.settings.cache_dir / f"{key}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            return Scores(**cached["image_1"]), Scores(**cached["image_2"]), key
        for _ in range(self.settings.parse_retries + 1):
            text = self.request(prompt, first, second)
            parsed = parse_scores(text)
            if parsed:
                record = {
                    "model": self.settings.model,
                    "answer": text,
                    "image_1": parsed[0].as_dict(),
                    "image_2": parsed[1].as_dict(),
                }
                temporary = path.with_suffix(".tmp")
                temporary.write_text(json.dumps(record, indent=1))
                temporary.replace(path)
                return parsed[0], parsed[1], key
            self.say("judge: the answer had no parsable 'Scores:' block; asking again")
        raise JudgeError(f"{self.settings.model} never gave scores in the asked format; try another --judge-model")

    def judge_pair(self, prompt: str, image_a: Path, image_b: Path) -> tuple[Scores, Scores, list[str]]:
        """A's and B's scores, each averaged over both orders (A first, then B first)."""
        a_bytes, b_bytes = image_a.read_bytes(), image_b.read_bytes()
        a_first, b_second, key_ab = self.verdict(prompt, a_bytes, b_bytes)
        b_first, a_second, key_ba = self.verdict(prompt, b_bytes, a_bytes)
        return mean_scores(a_first, a_second), mean_scores(b_second, b_first), [key_ab, key_ba]


def retry_after(header: str | None, attempt: int) -> float:
    try:
        return min(120.0, max(0.0, float(header))) if header else min(60.0, 2.0**attempt)
    except ValueError:
        return min(60.0, 2.0**attempt)


def refusal_message(url: str, model: str, code: int, detail: str) -> str:
    hint = {
        401: "the key was refused: set the variable --judge-key-env names (default OPENAI_API_KEY)",
        403: "the key may not use this model: check the account or --judge-model",
        404: f"no such endpoint or model: check --judge-url ({url}) and --judge-model ({model})",
    }.get(code, "the request was refused: check --judge-url and --judge-model")
    return f"the judge answered HTTP {code}: {detail.strip()}\n{hint}"


# --- the toy world's detector as an offline judge ------------------------------------------------


def detector_scores(image_path: Path, asked: list[str]) -> Scores:
    """0-10 scores from the toy world's detector (``tools/quality/detector.py``), on the VLM's rubric,
    rounded to its 0.5 steps:

    * composition: 10 x the mean credit of the asked concepts (1 when found by colour and shape, 0.5
      by colour alone, 0 when missing), less 2 per concept shown that was not asked;
    * image quality: 10 x the share of painted (not black) pixels that are a clean concept colour
      rather than a washed-out or muddy mix, less 3 per asked concept whose colour shows with a wrong
      shape (a deformity).
    """
    import numpy as np
    from PIL import Image
    from quality.detector import COLOUR_RADIUS, colour_masks, detect

    with Image.open(image_path) as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    found = detect(pixels)
    credit = [1.0 if c in found.present else 0.5 if c in found.colour_present else 0.0 for c in asked]
    extra = len(found.colour_present - set(asked))
    painted = np.linalg.norm(pixels, axis=-1) > COLOUR_RADIUS
    clean = np.any(np.stack(list(colour_masks(pixels).values())), axis=0) & painted
    share = float(clean.sum()) / max(1, int(painted.sum()))
    deformed = sum(1 for c in asked if c in found.colour_present and c not in found.present)

    def rubric(value: float) -> float:
        return round(min(10.0, max(0.0, value)) * 2) / 2

    return Scores(rubric(10.0 * sum(credit) / len(asked) - 2.0 * extra), rubric(10.0 * share - 3.0 * deformed))


# --- win / tie / loss with intervals -----------------------------------------------------------


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def outcome(a: float, b: float) -> str:
    return "win" if a > b else "loss" if a < b else "tie"


def summarise(judgements: list[dict]) -> list[dict]:
    """Per (N, pair), and per pair over every N when it has several: counts, rates with Wilson intervals, mean scores."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    sizes: dict[tuple[str, str], set[int]] = {}
    for record in judgements:
        sizes.setdefault((record["a"], record["b"]), set()).add(record["n"])
    for record in judgements:
        several = len(sizes[(record["a"], record["b"])]) > 1  # an "all" row only adds to several N
        for n in (str(record["n"]), "all") if several else (str(record["n"]),):
            groups.setdefault((record["a"], record["b"], n), []).append(record)
    rows = []
    for (a, b, n), records in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] == "all", item[0][2])):
        row: dict = {"a": a, "b": b, "n": n, "pairs": len(records)}
        for dimension in DIMENSIONS:
            for result in ("win", "tie", "loss"):
                count = sum(1 for r in records if r["outcome"][dimension] == result)
                low, high = wilson(count, len(records))
                row[f"{dimension}_{result}"] = count
                row[f"{dimension}_{result}_rate"] = round(count / len(records), 4)
                row[f"{dimension}_{result}_low"], row[f"{dimension}_{result}_high"] = round(low, 4), round(high, 4)
            row[f"{dimension}_mean_a"] = round(sum(r["a_scores"][dimension] for r in records) / len(records), 3)
            row[f"{dimension}_mean_b"] = round(sum(r["b_scores"][dimension] for r in records) / len(records), 3)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The paper's table: per N and pair, A's win / tie / loss rate against B with 95% Wilson intervals."""

    def cell(row: dict, dimension: str) -> str:
        parts = []
        for result in ("win", "tie", "loss"):
            rate, low, high = (row[f"{dimension}_{result}{suffix}"] for suffix in ("_rate", "_low", "_high"))
            parts.append(f"{rate:.0%} [{low:.0%}-{high:.0%}]")
        return " / ".join(parts) + f" (means {row[f'{dimension}_mean_a']:.1f} vs {row[f'{dimension}_mean_b']:.1f})"

    lines = [
        "| N | A vs B | pairs | composition quality: A win / tie / loss | image quality: A win / tie / loss |",
        "|---|---|---:|---|---|",
    ]
    for row in rows:
        pair = f"{row['a']} vs {row['b']}"
        lines.append(f"| {row['n']} | {pair} | {row['pairs']} | {cell(row, 'composition')} | {cell(row, 'image_quality')} |")
    return "\n".join(lines)
