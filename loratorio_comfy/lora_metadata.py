"""Trigger words from a LoRA file's safetensors metadata, read from the header only.

Trainers record trigger words in different places; the first one present wins:

1. ``modelspec.trigger_phrase`` (Stability's model spec, written by kohya's sd-scripts and others);
2. ``trigger_words`` / ``trigger_phrase`` / ``activation_text`` (other trainers and converters),
   a JSON list or a comma-separated string;
3. ``ss_tag_frequency`` (kohya's caption statistics): the most frequent caption tags.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

PHRASE_KEYS = ("modelspec.trigger_phrase", "trigger_words", "trigger_phrase", "activation_text")
TAG_FREQUENCY_KEY = "ss_tag_frequency"
MOST_FREQUENT_TAGS = 5
MAX_HEADER_BYTES = 16 * 1024 * 1024  # real LoRA headers are kilobytes; kohya's tag statistics stay far below


class MetadataError(ValueError):
    """The file's safetensors header cannot be read."""


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` header, without reading any tensor.

    Raises ``MetadataError`` for files that are not safetensors or whose header is damaged.
    """
    if path.suffix.lower() != ".safetensors":
        raise MetadataError(f"{path.name} is not a .safetensors file; only safetensors files carry readable metadata")
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise MetadataError(f"{path.name} is too short to be a safetensors file")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > MAX_HEADER_BYTES:
            raise MetadataError(f"{path.name} has an implausible header size ({header_size} bytes); the file is corrupt")
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MetadataError(f"{path.name} has a damaged safetensors header; copy or download the file again") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        return {}
    return {str(key): str(value) for key, value in metadata.items()}


def split_phrases(value: str) -> list[str]:
    """A JSON list of strings or a comma-separated string, as a list of stripped, unique phrases."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    items = parsed if isinstance(parsed, list) else str(parsed).split(",")
    phrases: list[str] = []
    for item in items:
        phrase = str(item).strip()
        if phrase and phrase not in phrases:
            phrases.append(phrase)
    return phrases


def most_frequent_tags(tag_frequency: str, count: int = MOST_FREQUENT_TAGS) -> list[str]:
    """The ``count`` most frequent tags over all datasets of kohya's ``ss_tag_frequency``.

    ``ss_tag_frequency`` is ``{dataset: {tag: occurrences}}``; ties are broken by the tag's text.
    """
    try:
        datasets = json.loads(tag_frequency)
    except json.JSONDecodeError:
        return []
    totals: dict[str, int] = {}
    for tags in datasets.values() if isinstance(datasets, dict) else ():
        for tag, occurrences in tags.items() if isinstance(tags, dict) else ():
            tag = str(tag).strip()
            if tag and isinstance(occurrences, (int, float)):
                totals[tag] = totals.get(tag, 0) + int(occurrences)
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    return [tag for tag, _ in ranked[:count]]


def trigger_words(metadata: dict[str, str]) -> tuple[list[str], str | None]:
    """(trigger words, the metadata key they came from); ``([], None)`` when the file names none."""
    for key in PHRASE_KEYS:
        phrases = split_phrases(metadata.get(key, ""))
        if phrases:
            return phrases, key
    tags = most_frequent_tags(metadata.get(TAG_FREQUENCY_KEY, ""))
    if tags:
        return tags, TAG_FREQUENCY_KEY
    return [], None
