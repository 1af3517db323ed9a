"""Composition sets for ``tools/testbed.py``: our set-file format, its checks, and the importer of
the official ComposLoRA layout (``maszhongming/Multi-LoRA-Composition``).

Our format (JSON, ``"format": "loratorio-testbed-sets/1"``)::

    {
      "format": "loratorio-testbed-sets/1",
      "name": "ComposLoRA anime",
      "quality_tags": "masterpiece, best quality",     # the prompt starts with these ("" for none)
      "negative": "worst quality, low quality",        # optional
      "strength": 0.8,                                 # optional: every LoRA's strength
      "defaults": {"steps": 200, "cfg": 10, "width": 512, "height": 512, "seeds": [111]},   # optional
      "loras": {
        "character_1": {"file": "ComposLoRA/anime/character_1.safetensors", "category": "character",
                        "name": "Kamado Nezuko", "trigger": ["kamado nezuko", "black hair"], "strength": 0.8},
        "clothing_1": {...}
      },
      "sets": [{"id": "character_1+clothing_1", "loras": ["character_1", "clothing_1"]}, ...]
    }

``file`` is the LoRA's name in ComfyUI's ``loras`` list. ``sets`` is optional: without it every set
of the ComposLoRA rule is formed (one LoRA per category, the character always among them, N - 1
other categories chosen in the order the catalogue lists them). A set's prompt is the quality tags,
then every LoRA's trigger words in set order, joined by ", ". In a set the character LoRA comes first.

The official layout is ``{anime,reality}_lora_info.json``: categories (``character``, ``clothing``,
``style``, ``background``, ``object``), each a list of ``{"id", "name", "trigger": [...], "url"}``;
LoRA files are ``<id>.safetensors`` in a folder per style; 22 LoRAs and 480 sets in all (N = 2..5).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "loratorio-testbed-sets/1"
CHARACTER = "character"
MAX_N = 8  # rows of the pack's Multi-LoRA Loader

# The official testbed's prompts and generation settings (utils.py, compose_*.sh, compose_lora.py).
OFFICIAL_STYLES: dict[str, dict] = {
    "anime": {
        "quality_tags": "masterpiece, best quality",
        "negative": (
            "EasyNegative, extra fingers, extra limbs, fewer fingers, fewer limbs, multiple girls, multiple views, "
            "worst quality, low quality, depth of field, blurry, greyscale, 3D face, cropped, lowres, text, jpeg artifacts, "
            "signature, watermark, username, blurry, artist name, trademark, watermark, title, reference sheet, curvy, plump, "
            "fat, muscular female, strabismus, clothing cutout, side slit, tattoo, nsfw"
        ),
        "defaults": {"steps": 200, "cfg": 10.0, "width": 512, "height": 512, "seeds": [111]},
        "base_model": "gsdf/Counterfeit-V2.5",
    },
    "reality": {
        "quality_tags": "RAW photo, subject, 8k uhd, dslr, high quality, Fujifilm XT3, half-length portrait from knees up",
        "negative": (
            "extra heads, nsfw, deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, drawing, "
            "anime, text, cropped, out of frame, worst quality, low quality, jpeg artifacts, ugly, duplicate, morbid, "
            "mutilated, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, mutation, deformed, blurry, "
            "dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, disfigured, gross proportions, malformed "
            "limbs, missing arms, missing legs, extra arms, extra legs, fused fingers, too many fingers, long neck"
        ),
        "defaults": {"steps": 100, "cfg": 7.0, "width": 768, "height": 1024, "seeds": [111]},
        "base_model": "SG161222/Realistic_Vision_V5.1_noVAE with the stabilityai/sd-vae-ft-mse VAE",
    },
}
OFFICIAL_STRENGTH = 0.8  # the official --lora_scale
DEFAULT_KEYS = {"steps", "cfg", "width", "height", "seeds", "sampler_name", "scheduler"}


class SetFileError(ValueError):
    """The set file is unusable; the message names the problem and the fix."""


@dataclass(frozen=True)
class Lora:
    key: str
    file: str
    category: str
    name: str
    trigger: tuple[str, ...]
    strength: float | None


@dataclass(frozen=True)
class CompositionSet:
    id: str
    loras: tuple[Lora, ...]
    prompt: str

    @property
    def n(self) -> int:
        return len(self.loras)


@dataclass
class SetFile:
    name: str
    quality_tags: str
    negative: str
    strength: float | None
    defaults: dict
    loras: dict[str, Lora]
    sets: list[CompositionSet] = field(default_factory=list)


def make_prompt(quality_tags: str, loras: tuple[Lora, ...]) -> str:
    parts = [quality_tags.strip()] if quality_tags.strip() else []
    return ", ".join(parts + [word for lora in loras for word in lora.trigger])


def parse_lora(key: str, entry: object, where: str) -> Lora:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"]:
        raise SetFileError(f'{where}: LoRA {key!r} needs a "file" (its name in ComfyUI\'s loras list)')
    trigger = entry.get("trigger", [])
    if isinstance(trigger, str):
        trigger = [word.strip() for word in trigger.split(",") if word.strip()]
    if not isinstance(trigger, list) or not all(isinstance(word, str) for word in trigger):
        raise SetFileError(f'{where}: LoRA {key!r}: "trigger" is a list of trigger words, e.g. ["kamado nezuko", "black hair"]')
    strength = entry.get("strength")
    if strength is not None and not isinstance(strength, (int, float)):
        raise SetFileError(f'{where}: LoRA {key!r}: "strength" is a number, e.g. 0.8')
    category = str(entry.get("category") or key.split("_")[0])
    return Lora(key, entry["file"], category, str(entry.get("name") or key), tuple(trigger), strength)


def check_set(set_id: str, loras: tuple[Lora, ...], where: str) -> None:
    keys = [lora.key for lora in loras]
    if not 2 <= len(keys) <= MAX_N:
        raise SetFileError(f"{where}: set {set_id!r} has {len(keys)} LoRAs; a set composes 2 to {MAX_N}")
    if len(set(keys)) != len(keys):
        raise SetFileError(f"{where}: set {set_id!r} lists a LoRA twice ({', '.join(keys)}); list each once")
    characters = [lora.key for lora in loras if lora.category == CHARACTER]
    if characters and loras[0].category != CHARACTER:
        raise SetFileError(
            f"{where}: set {set_id!r}: the character LoRA comes first (as in ComposLoRA); move {characters[0]!r} to the front"
        )


def generate_sets(loras: dict[str, Lora], quality_tags: str, sizes: range = range(2, 6)) -> list[CompositionSet]:
    """Every set of the ComposLoRA rule: the character and one LoRA from each of N - 1 other categories."""
    by_category: dict[str, list[Lora]] = {}
    for lora in loras.values():
        by_category.setdefault(lora.category, []).append(lora)
    if CHARACTER not in by_category:
        raise SetFileError(f'no LoRA has "category": "{CHARACTER}", so sets cannot be formed by the ComposLoRA rule; list "sets"')
    others = [category for category in by_category if category != CHARACTER]
    sets = []
    for n in sizes:
        for categories in itertools.combinations(others, n - 1):
            for combo in itertools.product(*(by_category[c] for c in (CHARACTER, *categories))):
                sets.append(CompositionSet("+".join(lora.key for lora in combo), combo, make_prompt(quality_tags, combo)))
    return sets


def explicit_sets(entries: object, loras: dict[str, Lora], quality_tags: str, where: str) -> list[CompositionSet]:
    if not isinstance(entries, list):
        raise SetFileError(f'{where}: "sets" is a list of {{"id": ..., "loras": [KEY, ...]}} (or of key lists)')
    sets, seen = [], set()
    for index, entry in enumerate(entries, start=1):
        keys = entry.get("loras") if isinstance(entry, dict) else entry
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise SetFileError(f'{where}: set {index} needs "loras": a list of LoRA keys from "loras"')
        unknown = [k for k in keys if k not in loras]
        if unknown:
            raise SetFileError(f'{where}: set {index} uses {", ".join(map(repr, unknown))}, not in "loras" ({", ".join(loras)})')
        combo = tuple(loras[k] for k in keys)
        set_id = str(entry.get("id") or "+".join(keys)) if isinstance(entry, dict) else "+".join(keys)
        if set_id in seen:
            raise SetFileError(f'{where}: two sets have the id {set_id!r}; give each a different "id"')
        seen.add(set_id)
        check_set(set_id, combo, where)
        sets.append(CompositionSet(set_id, combo, make_prompt(quality_tags, combo)))
    return sets


def parse_defaults(value: object, where: str) -> dict:
    if not isinstance(value, dict) or set(value) - DEFAULT_KEYS:
        raise SetFileError(f'{where}: "defaults" may set {", ".join(sorted(DEFAULT_KEYS))}')
    return dict(value)


def from_document(document: object, where: str) -> SetFile:
    """A set file from its parsed JSON (our format, or an official ``*_lora_info.json``)."""
    if is_official(document):
        document = import_official(document, style_of(where), None)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SetFileError(
            f'{where}: not a composition-set file; write {{"format": "{FORMAT}", "loras": ..., "sets": ...}} '
            "(docs/testbed.md) or import the official layout with `tools/testbed.py import`"
        )
    raw_loras = document.get("loras")
    if not isinstance(raw_loras, dict) or not raw_loras:
        raise SetFileError(f'{where}: "loras" is an object of LoRA entries keyed by a short name')
    loras = {key: parse_lora(key, entry, where) for key, entry in raw_loras.items()}
    tags = str(document.get("quality_tags", ""))
    strength = document.get("strength")
    if strength is not None and not isinstance(strength, (int, float)):
        raise SetFileError(f'{where}: "strength" is a number, e.g. 0.8')
    if "sets" in document:
        sets = explicit_sets(document["sets"], loras, tags, where)
    else:
        try:
            sets = generate_sets(loras, tags)
        except SetFileError as error:
            raise SetFileError(f"{where}: {error}") from None
    defaults = parse_defaults(document.get("defaults", {}), where)
    return SetFile(
        str(document.get("name", Path(where).stem)), tags, str(document.get("negative", "")), strength, defaults, loras, sets
    )


def load(path: Path) -> SetFile:
    if not path.is_file():
        raise SetFileError(
            f"{path}: no such set file; give a composition-set JSON (docs/testbed.md), e.g. tools/testbed_toy_sets.json"
        )
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SetFileError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); fix the file"
        ) from None
    return from_document(document, str(path))


# --- the official layout ---------------------------------------------------------------------


def is_official(document: object) -> bool:
    return (
        isinstance(document, dict)
        and "format" not in document
        and bool(document)
        and all(
            isinstance(v, list) and all(isinstance(e, dict) and "id" in e and "trigger" in e for e in v)
            for v in document.values()
        )
    )


def style_of(path: str) -> str | None:
    name = Path(path).name
    return next((style for style in OFFICIAL_STYLES if name.startswith(f"{style}_")), None)


def import_official(document: dict, style: str | None, lora_prefix: str | None, sizes: range = range(2, 6)) -> dict:
    """Our format from an official ``<style>_lora_info.json``: its LoRAs (``<prefix><id>.safetensors``),
    its style's quality tags, negative prompt and settings, and every set of its rule for ``sizes``."""
    facts = OFFICIAL_STYLES.get(style or "", {"quality_tags": "", "negative": "", "defaults": {}, "base_model": "?"})
    prefix = f"ComposLoRA/{style}/" if lora_prefix is None and style else (lora_prefix or "")
    loras = {}
    for category, entries in document.items():
        for entry in entries:
            loras[entry["id"]] = {
                "file": f"{prefix}{entry['id']}.safetensors",
                "category": category,
                "name": entry.get("name", entry["id"]),
                "trigger": list(entry["trigger"]),
            }
    parsed = {key: parse_lora(key, entry, "official file") for key, entry in loras.items()}
    sets = [{"id": s.id, "loras": [lora.key for lora in s.loras]} for s in generate_sets(parsed, facts["quality_tags"], sizes)]
    return {
        "format": FORMAT,
        "name": f"ComposLoRA {style or 'import'}",
        "base_model": facts["base_model"],
        "quality_tags": facts["quality_tags"],
        "negative": facts["negative"],
        "strength": OFFICIAL_STRENGTH,
        "defaults": facts["defaults"],
        "loras": loras,
        "sets": sets,
    }
