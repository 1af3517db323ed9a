"""The toy world: procedural 32x32 images, the concepts LoRAs learn, and the prompt vocabulary.

The base model learns four shapes (disk, triangle, square, full-width stripe) drawn in
washed-out colours on black. Each concept LoRA learns a trigger word the base never saw:

* ``ruby``: a red disk; ``amber``: an orange triangle (red and orange share a colour family);
* ``cobalt``: a blue square; ``lemon``: a yellow full-width stripe, which crosses whatever else is
  in the image (overlapping positions);
* ``dusk``: a global style, a purple background behind everything.

Two "characters" of one class (``CHARACTERS``) make the cases users hit with two character LoRAs:
``jade`` (a green disk) and ``aqua`` (a cyan disk). Each LoRA learns from prompts of its trigger AND
the class word (``jade disk``), as character LoRAs are trained, so both change what ``disk`` means
and interfere when merged. They are kept apart from ``CONCEPTS`` so the main benchmark's
combinations stay as they were.

Pixels are RGB in [-1, 1]; the model's 4-channel latent is RGB plus a zero channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
SHAPES = ("disk", "triangle", "square", "stripe")
BACKGROUND = (0.0, 0.0, 0.0)
PAD = "<pad>"
CONTEXT_TOKENS = 6


@dataclass(frozen=True)
class Concept:
    name: str
    trigger: str
    shape: str | None  # None: a style over the whole image
    colour: tuple[float, float, float]  # RGB in [0, 1]: the shape's colour, or the style's background
    class_word: str | None = None  # a character's class word, prompted with its trigger

    @property
    def is_style(self) -> bool:
        return self.shape is None

    @property
    def words(self) -> list[str]:
        """The words that prompt the concept: its trigger, and its class word if it has one."""
        return [self.trigger] if self.class_word is None else [self.trigger, self.class_word]


CONCEPTS = (
    Concept("ruby-disk", "ruby", "disk", (0.85, 0.10, 0.10)),
    Concept("amber-triangle", "amber", "triangle", (0.95, 0.55, 0.05)),
    Concept("cobalt-square", "cobalt", "square", (0.10, 0.25, 0.90)),
    Concept("lemon-stripe", "lemon", "stripe", (0.95, 0.90, 0.10)),
    Concept("dusk-style", "dusk", None, (0.35, 0.10, 0.45)),
)
CHARACTERS = (
    Concept("jade-disk", "jade", "disk", (0.15, 0.80, 0.20), class_word="disk"),
    Concept("aqua-disk", "aqua", "disk", (0.10, 0.80, 0.85), class_word="disk"),
)
ALL_CONCEPTS = CONCEPTS + CHARACTERS
CONCEPTS_BY_NAME = {concept.name: concept for concept in ALL_CONCEPTS}
# New words go at the end: a base trained before them keeps its token ids (toy_model.load_base
# gives such a base the missing rows).
VOCABULARY = (PAD, *SHAPES, *(concept.trigger for concept in ALL_CONCEPTS))


def washed_out(colour: tuple[float, float, float], amount: float = 0.65) -> tuple[float, float, float]:
    """The colour mixed towards mid-grey: what the base model draws."""
    return tuple((1 - amount) * c + amount * 0.45 for c in colour)  # type: ignore[return-value]


def token_ids(words: list[str]) -> torch.Tensor:
    """Token ids of a prompt, padded to ``CONTEXT_TOKENS``."""
    if len(words) > CONTEXT_TOKENS:
        raise ValueError(f"prompt {words} has more than {CONTEXT_TOKENS} words")
    ids = [VOCABULARY.index(word) for word in words] + [0] * (CONTEXT_TOKENS - len(words))
    return torch.tensor(ids, dtype=torch.long)


def shape_mask(shape: str, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A boolean ``[size, size]`` mask of one shape at a random position and size."""
    rand = lambda low, high: low + (high - low) * torch.rand((), generator=generator).item()  # noqa: E731
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if shape == "stripe":
        height = rand(4.0, 6.0)
        top = rand(2.0, size - 2.0 - height)
        return (ys >= top) & (ys < top + height)
    extent = {"disk": (5.0, 7.0), "square": (4.5, 6.0), "triangle": (6.0, 8.0)}[shape]
    radius = rand(*extent)
    cy, cx = rand(radius + 1, size - radius - 1), rand(radius + 1, size - radius - 1)
    if shape == "disk":
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
    if shape == "square":
        return ((ys - cy).abs() <= radius) & ((xs - cx).abs() <= radius)
    # an upright isosceles triangle: apex at the top, base at the bottom
    top, bottom = cy - radius, cy + radius
    half_width = (ys - top) / (bottom - top) * radius
    return (ys >= top) & (ys <= bottom) & ((xs - cx).abs() <= half_width)


def paint(image: torch.Tensor, mask: torch.Tensor, colour: tuple[float, float, float]) -> None:
    image[:, mask] = torch.tensor(colour).unsqueeze(1) * 2 - 1


def blank(background: tuple[float, float, float] = BACKGROUND) -> torch.Tensor:
    return (torch.tensor(background) * 2 - 1).view(3, 1, 1).repeat(1, IMAGE_SIZE, IMAGE_SIZE)


def base_example(generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """One or two washed-out shapes on black, and the prompt naming them."""
    count = 1 + int(torch.rand((), generator=generator).item() < 0.5)
    order = torch.randperm(len(SHAPES), generator=generator)[:count].tolist()
    image = blank()
    words = []
    for index in order:
        shape = SHAPES[index]
        concept = next(c for c in CONCEPTS if c.shape == shape)
        paint(image, shape_mask(shape, generator), washed_out(concept.colour))
        words.append(shape)
    return image, words


def concept_example(concept: Concept, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """The concept alone (an object sometimes beside a grey distractor), prompted by its words."""
    if concept.is_style:
        image, _ = base_example(generator)
        background = (image == -1).all(dim=0)
        paint(image, background, concept.colour)
        return image, [concept.trigger]
    image = blank()
    if torch.rand((), generator=generator).item() < 0.3:
        distractor = SHAPES[int(torch.randint(len(SHAPES), (), generator=generator))]
        paint(image, shape_mask(distractor, generator), (0.45, 0.45, 0.45))
    paint(image, shape_mask(concept.shape, generator), concept.colour)
    return image, concept.words


def as_latent(images: torch.Tensor) -> torch.Tensor:
    """RGB images ``[B, 3, H, W]`` as the model's 4-channel latents (a zero fourth channel)."""
    return torch.cat([images, torch.zeros_like(images[:, :1])], dim=1)


def as_images(latents: torch.Tensor) -> torch.Tensor:
    """Latents back to RGB in [0, 1], ``[B, H, W, 3]`` (ComfyUI's IMAGE layout)."""
    return ((latents[:, :3].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def combination_prompt(concepts: list[Concept]) -> list[str]:
    return [word for concept in concepts for word in concept.words]
