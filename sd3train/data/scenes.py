"""Procedural "compose" world: several coloured shapes per image, for a GenEval-like benchmark.

The objects, colours and backgrounds are those of the shapes world (sd3train/data/shapes.py); an
image holds one to three of them, never overlapping and with a gap, so each is its own connected
region. sd3train/eval/compose.py reads an image back and says whether it satisfies a caption.

Caption grammar, one form per category (every caption ends " on a {white|black} background"):

    single_object       "a {shape}"                              one object, random colour
    colours             "a|an {colour} {shape}"                  one object (the shapes world's caption)
    two_object          "a {shape} and a {shape2}"               distinct shapes, random colours
    counting            "two|three {colour} {shape}s"            only those objects
    position            "a {c1} {s1} left of|right of|above|below a {c2} {s2}"   (c1, s1) != (c2, s2)
    colour_attribution  "a {c1} {s1} and a {c2} {s2}"            c1 != c2 and s1 != s2

    image, caption = make_scene_sample(seed=0, index=7, size=64)   # a pure function of (seed, index)
    prompts = compositional_prompts(4)                              # 4 captions per category, fixed
    prompt = parse_scene_caption(prompts[0]); image = render_scene(prompt, 64, random.Random(0))

`python -m sd3train.tools.make_shapes --world compose --out data/compose` writes its shards.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw

from sd3train.data.shapes import BACKGROUND_COLOURS, SHAPE_COLOURS, SHAPES

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colours", "position",
                               "colour_attribution")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}
# Circumradius of each object as a fraction of the image side (10.2 to 12.8 px at 64 px): small
# enough for three to fit apart, large enough that the tiny VAE's round trip keeps a one-colour
# scene readable (0.10 to 0.14 kept 82% of single objects and 63% of counting scenes, this all of
# them; figures in sd3train/eval/compose.py).
RADIUS_RANGE = (0.16, 0.20)
# Least gap between two objects' circumscribed circles, and from a circle to the image edge,
# as fractions of the side (4 px and 1.3 px at 64 px): once rasterised, objects' pixels lie at
# least 3 px apart, so blurred edges stay apart.
GAP = 0.0625
MARGIN = 0.02
# A position relation is drawn with the offset along its axis at least this many times the offset
# across it, so "left of" is never a near-diagonal.
DOMINANCE = 2.0
MAX_TRIES = 2000


@dataclass(frozen=True)
class SceneObject:
    """One object a caption names: its shape, and its colour (None where the caption leaves it open)."""
    shape: str
    colour: str | None = None

    def phrase(self) -> str:
        words = f"{self.colour} {self.shape}" if self.colour else self.shape
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


@dataclass(frozen=True)
class ScenePrompt:
    """A caption of the compose grammar, parsed. `count` is how many of each object (2 or 3 for
    counting, else 1); `relation` is set for position only (objects[0] is `relation` objects[1])."""
    category: str
    objects: tuple[SceneObject, ...]
    background: str
    count: int = 1
    relation: str | None = None

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError(f"invalid {self.category} prompt {self!r}: {'; '.join(problems)}")

    @property
    def caption(self) -> str:
        objects = self.objects
        if self.category == "counting":
            body = f"{COUNT_WORDS[self.count]} {objects[0].colour} {objects[0].shape}s"
        elif self.category == "position":
            body = f"{objects[0].phrase()} {self.relation} {objects[1].phrase()}"
        else:
            body = " and ".join(obj.phrase() for obj in objects)
        return f"{body} on a {self.background} background"


def _problems(prompt: ScenePrompt) -> list[str]:
    """What makes `prompt` fall outside the grammar (empty when it is in it)."""
    if prompt.category not in CATEGORIES:
        return [f"unknown category {prompt.category!r}"]
    problems = []
    if prompt.background not in BACKGROUND_COLOURS:
        problems.append(f"unknown background {prompt.background!r}")
    coloured = prompt.category not in ("single_object", "two_object")
    for obj in prompt.objects:
        if obj.shape not in SHAPES:
            problems.append(f"unknown shape {obj.shape!r}")
        if (obj.colour is not None) != coloured or (coloured and obj.colour not in SHAPE_COLOURS):
            problems.append(f"colour {obj.colour!r} not allowed here")
    wanted = 2 if prompt.category in ("two_object", "position", "colour_attribution") else 1
    if len(prompt.objects) != wanted:
        return problems + [f"{len(prompt.objects)} objects, wanted {wanted}"]
    if (prompt.count in COUNT_WORDS) != (prompt.category == "counting") or prompt.count not in (1, *COUNT_WORDS):
        problems.append(f"count {prompt.count}")
    if (prompt.relation in RELATIONS) != (prompt.category == "position") or prompt.relation not in (None, *RELATIONS):
        problems.append(f"relation {prompt.relation!r}")
    if wanted == 2:
        first, second = prompt.objects
        if prompt.category == "position" and first == second:
            problems.append("an object related to itself")
        if prompt.category in ("two_object", "colour_attribution") and first.shape == second.shape:
            problems.append("the same shape twice")
        if prompt.category == "colour_attribution" and first.colour == second.colour:
            problems.append("the same colour twice")
    return problems


def _parse_object(phrase: str, coloured: bool) -> SceneObject:
    words = phrase.split(" ")
    if len(words) != (3 if coloured else 2) or words[0] not in ("a", "an"):
        raise ValueError(phrase)
    return SceneObject(shape=words[-1], colour=words[1] if coloured else None)


def parse_scene_caption(caption: str) -> ScenePrompt:
    """Inverse of `ScenePrompt.caption`; raises ValueError naming the caption if it is not in the grammar."""
    try:
        body, rest = caption.rsplit(" on a ", 1)
        background, last = rest.split(" ")
        if last != "background":
            raise ValueError(caption)
        relation = next((word for word in RELATIONS if f" {word} " in body), None)
        if relation is not None:
            first, second = body.split(f" {relation} ")
            prompt = ScenePrompt("position", (_parse_object(first, True), _parse_object(second, True)),
                                 background, relation=relation)
        elif " and " in body:
            first, second = body.split(" and ")
            coloured = len(first.split(" ")) == 3
            prompt = ScenePrompt("colour_attribution" if coloured else "two_object",
                                 (_parse_object(first, coloured), _parse_object(second, coloured)), background)
        elif body.split(" ")[0] in COUNT_WORDS.values():
            number, colour, plural = body.split(" ")
            count = next(count for count, word in COUNT_WORDS.items() if word == number)
            if not plural.endswith("s"):
                raise ValueError(caption)
            prompt = ScenePrompt("counting", (SceneObject(plural[:-1], colour),), background, count=count)
        else:
            coloured = len(body.split(" ")) == 3
            prompt = ScenePrompt("colours" if coloured else "single_object", (_parse_object(body, coloured),),
                                 background)
    except ValueError as error:  # also unpacking a wrong number of words
        raise ValueError(f"caption {caption!r} is not in the compose grammar") from error
    if prompt.caption != caption:  # a wrong article, a doubled space
        raise ValueError(f"caption {caption!r} is not in the compose grammar (did you mean {prompt.caption!r}?)")
    return prompt


def all_scene_prompts(category: str) -> list[ScenePrompt]:
    """Every prompt of `category` the grammar can produce, in a fixed order."""
    return list(_all_prompts(category))


@lru_cache(maxsize=None)
def _all_prompts(category: str) -> tuple[ScenePrompt, ...]:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    plain = [SceneObject(shape) for shape in SHAPES]
    coloured = [SceneObject(shape, colour) for colour in SHAPE_COLOURS for shape in SHAPES]
    prompts = []
    for background in BACKGROUND_COLOURS:
        if category == "single_object":
            prompts += [ScenePrompt(category, (obj,), background) for obj in plain]
        elif category == "colours":
            prompts += [ScenePrompt(category, (obj,), background) for obj in coloured]
        elif category == "counting":
            prompts += [ScenePrompt(category, (obj,), background, count=count) for count in COUNT_WORDS
                        for obj in coloured]
        elif category == "two_object":
            prompts += [ScenePrompt(category, (a, b), background) for a in plain for b in plain if a != b]
        elif category == "position":
            prompts += [ScenePrompt(category, (a, b), background, relation=relation) for relation in RELATIONS
                        for a in coloured for b in coloured if a != b]
        else:
            prompts += [ScenePrompt(category, (a, b), background) for a in coloured for b in coloured
                        if a.shape != b.shape and a.colour != b.colour]
    return tuple(prompts)


def random_prompt(category: str, rng: random.Random, background: str | None = None) -> ScenePrompt:
    """A uniformly random prompt of `category` (on `background` when given), drawn from `rng`."""
    prompts = [prompt for prompt in _all_prompts(category) if background in (None, prompt.background)]
    return prompts[rng.randrange(len(prompts))]


def _features(prompt: ScenePrompt) -> list[str]:
    """The words a balanced prompt list should spread over: background, colours, shapes, relation, count."""
    features = [f"background:{prompt.background}", f"count:{prompt.count}", f"relation:{prompt.relation}"]
    for obj in prompt.objects:
        features += [f"shape:{obj.shape}", f"colour:{obj.colour}"]
    return features


def compositional_prompts(prompts_per_category: int, seed: int = 0) -> list[str]:
    """`prompts_per_category` captions of each category, in CATEGORIES order: each next one the
    prompt least used so far whose colours, shapes, background, relation and count have been used
    least (ties broken by a shuffle of `seed`), so a short list still covers every word."""
    if prompts_per_category <= 0:
        raise ValueError(f"prompts_per_category must be positive, got {prompts_per_category}")
    captions = []
    for category in CATEGORIES:
        candidates = all_scene_prompts(category)
        random.Random(f"compose-prompts-{seed}-{category}").shuffle(candidates)
        used: Counter = Counter()
        for _ in range(prompts_per_category):
            best = min(range(len(candidates)), key=lambda i: (
                used[candidates[i]], sum(used[feature] for feature in _features(candidates[i])), i))
            used[candidates[best]] += 1
            used.update(_features(candidates[best]))
            captions.append(candidates[best].caption)
    return captions


def _clearly(relation: str, subject: tuple[float, float], reference: tuple[float, float]) -> bool:
    """Whether `subject` is `relation` `reference` with room to spare (image y grows downwards)."""
    dx, dy = subject[0] - reference[0], subject[1] - reference[1]
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along > 0 and along >= DOMINANCE * abs(across)


def _place(radii: list[float], size: int, relation: str | None, rng: random.Random) -> list[tuple[float, float]]:
    """Centres for circles of `radii` inside the image, pairwise `GAP * size` apart, the first
    `relation` the second when given; objects are placed one by one, starting over when one is stuck."""
    gap, margin = GAP * size, MARGIN * size
    for _ in range(MAX_TRIES):
        centres: list[tuple[float, float]] = []
        for radius in radii:
            for _ in range(50):
                low, high = radius + margin, size - radius - margin
                centre = (rng.uniform(low, high), rng.uniform(low, high))
                if all(math.dist(centre, other) >= radius + r + gap for other, r in zip(centres, radii)):
                    centres.append(centre)
                    break
            else:
                break
        if len(centres) == len(radii) and (relation is None or _clearly(relation, centres[0], centres[1])):
            return centres
    raise RuntimeError(f"could not place {len(radii)} objects of radii {radii} apart in a {size} px image")


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: str, centre: tuple[float, float], radius: float,
          rng: random.Random) -> None:
    """One shape inscribed in the circle of `radius` about `centre`, at a random rotation (as data.shapes)."""
    cx, cy = centre
    fill = SHAPE_COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        return
    angle0 = rng.uniform(0.0, 2.0 * math.pi)
    corners = 4 if shape == "square" else 3
    draw.polygon([(cx + radius * math.cos(angle0 + 2.0 * math.pi * i / corners),
                   cy + radius * math.sin(angle0 + 2.0 * math.pi * i / corners)) for i in range(corners)], fill=fill)


def render_scene(prompt: ScenePrompt, size: int, rng: random.Random) -> Image.Image:
    """An image that satisfies `prompt`: its objects (open colours drawn at random) of random size,
    rotation and position, apart from each other, on the prompt's background."""
    objects = [(obj.shape, obj.colour or rng.choice(list(SHAPE_COLOURS)))
               for obj in prompt.objects for _ in range(prompt.count)]
    radii = [rng.uniform(*RADIUS_RANGE) * size for _ in objects]
    centres = _place(radii, size, prompt.relation, rng)
    image = Image.new("RGB", (size, size), BACKGROUND_COLOURS[prompt.background])
    draw = ImageDraw.Draw(image)
    for (shape, colour), centre, radius in zip(objects, centres, radii):
        _draw(draw, shape, colour, centre, radius, rng)
    return image


def make_scene_sample(seed: int, index: int, size: int, category: str | None = None,
                      categories: tuple[str, ...] = CATEGORIES) -> tuple[Image.Image, str]:
    """Sample `index` of the compose world with base seed `seed`: (image, caption). The category is
    drawn uniformly from `categories` (all six by default) unless `category` names it."""
    unknown = [name for name in categories if name not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"unknown categories {unknown or categories!r}; expected some of {CATEGORIES}")
    rng = random.Random(f"scenes-{seed}-{index}")
    prompt = random_prompt(category or categories[rng.randrange(len(categories))], rng)
    return render_scene(prompt, size, rng), prompt.caption
