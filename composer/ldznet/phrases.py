"""Referring phrases from the synthetic scene graph: phrases that pick out exactly one object, with its mask.

    referrals = referring_phrases(scene.meta["objects"])      # every unique-referring phrase of a scene
    image, phrase, mask = next(iter(ReferringScenes(seed=1)))  # (3, 64, 64) in [0, 1], str, (1, 64, 64) in {0, 1}

A phrase is a conjunction of attribute words over one object of the scene graph (composer.data.scenes):

    the [size] [colour] [texture] (shape | "shape") [position]
    e.g. "the large red striped star", "the blue circle at the left", "the small shape in the center"

with ``position`` one of "at the left" / "at the right" (the object's column third), "at the top" / "at the
bottom" (its row third), "at the top left" ... (both, corners only) and "in the center" (middle row and column).
The row and column thirds are the scene's own ``position`` words (from the mean of the object's visible pixels).
A phrase *matches* every object whose attributes agree with all of its words; it is kept only when it matches
exactly one object of its scene, so "the red star" never appears in a scene with two red stars (then "the red
star at the left" may). The mask is the ground-truth instance mask of that object (its visible pixels).

Scene ``index`` of ``seed`` always gives the same image and the same phrase choices (the choice draws from
``SeedSequence([seed, index, 7])``), so training data is addressed by (seed, index) and resumes exactly.
Seed 99 is the project's held-out seed (HELDOUT_SEED): training code must refuse it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from composer.data.scenes import TEXTURE_WORDS, generate_scene

HELDOUT_SEED = 99  # the evaluation scenes (scripts/ldznet_eval.py); never trained on
APPEARANCE = ("size", "colour", "texture", "shape")  # the order words appear in a phrase
VERTICAL = ("top", "middle", "bottom")
HORIZONTAL = ("left", "center", "right")
GENERIC_NOUN = "shape"  # the noun of a phrase that does not name the shape ("the red striped shape")
# Position descriptors: words of the phrase -> the (vertical, horizontal) thirds they accept (None = any).
POSITIONS: dict[str, tuple[str | None, str | None]] = {
    "at the left": (None, "left"),
    "at the right": (None, "right"),
    "at the top": ("top", None),
    "at the bottom": ("bottom", None),
    "at the top left": ("top", "left"),
    "at the top right": ("top", "right"),
    "at the bottom left": ("bottom", "left"),
    "at the bottom right": ("bottom", "right"),
    "in the center": ("middle", "center"),
}


@dataclass(frozen=True)
class Referral:
    """A phrase and the one object it refers to. ``words``: attribute -> value of each word it uses."""

    phrase: str
    instance_id: int
    words: tuple[tuple[str, str], ...]


def object_attributes(record: dict[str, Any]) -> dict[str, str]:
    """The attribute values of one object record of ``Scene.meta["objects"]`` (size, colour, texture word,
    shape, and the vertical / horizontal thirds of its position)."""
    vertical, horizontal = _thirds(record["position"])
    return {"size": record["size"], "colour": record["colour"], "texture": TEXTURE_WORDS[record["texture"]],
            "shape": record["class"], "vertical": vertical, "horizontal": horizontal}


def _thirds(position: str) -> tuple[str, str]:
    """("top", "left") for "top left"; the scene writes "center" alone and "middle left" for the middle row."""
    words = position.split()
    if words == ["center"]:
        return "middle", "center"
    if len(words) != 2 or words[0] not in VERTICAL or words[1] not in HORIZONTAL:
        raise ValueError(f"unknown position words {position!r} in a scene record")
    return words[0], words[1]


def matches(words: Sequence[tuple[str, str]], attributes: dict[str, str]) -> bool:
    """Whether an object with ``attributes`` satisfies every word of a phrase."""
    for kind, value in words:
        if kind == "position":
            vertical, horizontal = POSITIONS[value]
            if (vertical is not None and attributes["vertical"] != vertical) or \
                    (horizontal is not None and attributes["horizontal"] != horizontal):
                return False
        elif attributes[kind] != value:
            return False
    return True


def describe(words: Sequence[tuple[str, str]]) -> str:
    """The phrase of a set of attribute words: "the large red striped star at the top left"."""
    chosen = dict(words)
    parts = ["the"] + [chosen[k] for k in APPEARANCE[:3] if k in chosen] + [chosen.get("shape", GENERIC_NOUN)]
    if "position" in chosen:
        parts.append(chosen["position"])
    return " ".join(parts)


def candidate_words(attributes: dict[str, str]) -> list[tuple[tuple[str, str], ...]]:
    """Every word set that describes an object truthfully: any non-empty subset of its appearance words, with
    or without a position descriptor it satisfies (a position alone also counts: "the shape at the left")."""
    appearance = [(k, attributes[k]) for k in APPEARANCE]
    positions = [None] + [p for p in POSITIONS if matches((("position", p),), attributes)]
    out = []
    for count in range(len(appearance) + 1):
        for subset in itertools.combinations(appearance, count):
            for position in positions:
                words = subset + ((("position", position),) if position else ())
                if words:
                    out.append(words)
    return out


def referring_phrases(records: Sequence[dict[str, Any]]) -> list[Referral]:
    """Every phrase that matches exactly one object of a scene, for every object (in record order)."""
    attributes = [object_attributes(r) for r in records]
    out = []
    for record, own in zip(records, attributes):
        for words in candidate_words(own):
            if sum(matches(words, other) for other in attributes) == 1:  # itself, and no other object
                out.append(Referral(describe(words), int(record["instance_id"]), words))
    return out


def choose_referrals(records: Sequence[dict[str, Any]], rng: np.random.Generator, *,
                     per_object: bool = False) -> list[Referral]:
    """One unique-referring phrase of a random object (``per_object``: one for every object that has any),
    the phrase drawn uniformly among that object's unique phrases; [] when no object can be singled out."""
    by_object: dict[int, list[Referral]] = {}
    for referral in referring_phrases(records):
        by_object.setdefault(referral.instance_id, []).append(referral)
    if not by_object:
        return []
    ids = sorted(by_object)
    if not per_object:
        ids = [ids[int(rng.integers(len(ids)))]]
    return [by_object[i][int(rng.integers(len(by_object[i])))] for i in ids]


@dataclass
class ReferringSample:
    """image: (3, H, W) float32 in [0, 1]; phrase; mask: (1, H, W) float32 in {0, 1}; where it came from."""

    image: torch.Tensor
    phrase: str
    mask: torch.Tensor
    seed: int
    index: int
    instance_id: int


def scene_samples(seed: int, index: int, size: int = 64, *, per_object: bool = False) -> list[ReferringSample]:
    """The referring samples of scene ``index`` of ``seed``: one (or one per object) phrase with its mask."""
    scene = generate_scene(seed, index, size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 7]))
    image = torch.from_numpy(scene.image).permute(2, 0, 1).contiguous()
    out = []
    for referral in choose_referrals(scene.meta["objects"], rng, per_object=per_object):
        mask = torch.from_numpy((scene.instances == referral.instance_id).astype(np.float32))[None]
        out.append(ReferringSample(image, referral.phrase, mask, int(seed), int(index), referral.instance_id))
    return out


class ReferringScenes(torch.utils.data.IterableDataset):
    """(image (3, H, W) in [0, 1], phrase, mask (1, H, W) in {0, 1}) from scenes ``start``, ``start + 1``, ...
    of ``seed`` (``count`` of them, or endlessly). One phrase per scene, or one per object with ``per_object``;
    scenes in which no object can be singled out are skipped. Single-process (the scenes render in ~6 ms)."""

    def __init__(self, seed: int, *, size: int = 64, start: int = 0, count: int | None = None,
                 per_object: bool = False):
        if count is not None and count < 0:
            raise ValueError(f"count must be non-negative or None, got {count}")
        self.seed, self.size, self.start, self.count, self.per_object = int(seed), int(size), int(start), count, per_object

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, torch.Tensor]]:
        indices = itertools.count(self.start) if self.count is None else range(self.start, self.start + self.count)
        for index in indices:
            for sample in scene_samples(self.seed, index, self.size, per_object=self.per_object):
                yield sample.image, sample.phrase, sample.mask


def referring_batch(seed: int, start: int, batch_size: int, size: int = 64) -> tuple[torch.Tensor, list[str], torch.Tensor, int]:
    """A training batch from scenes ``start``, ``start + 1``, ... of ``seed`` (one phrase each):
    (images (B, 3, H, W) in [0, 1], phrases, masks (B, 1, H, W) in {0, 1}, the next unused scene index)."""
    images, phrases, masks = [], [], []
    index = start
    while len(phrases) < batch_size:
        for sample in scene_samples(seed, index, size):
            images.append(sample.image)
            phrases.append(sample.phrase)
            masks.append(sample.mask)
        index += 1
    return torch.stack(images), phrases, torch.stack(masks), index

