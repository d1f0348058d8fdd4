"""The fictional knowledge base: made-up countries and their attributes, a function of the seed.

Names are built from a small syllable set so that a tiny BPE vocabulary covers them. Unknown
names are drawn from the same distribution as known ones, so their form says nothing about
whether the knowledge base contains them: only memory does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
COUNTRY_ENDS = ("ria", "land", "mor", "dor")
CITY_ENDS = ("ton", "vik", "burg")

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
ANIMALS = ("fox", "bear", "wolf", "owl", "horse", "eagle", "cat", "deer")
FOODS = ("bread", "rice", "fish", "cheese", "soup", "beans", "honey", "plums")

ATTRIBUTES = ("capital", "colour", "animal", "food")


@dataclass(frozen=True)
class Country:
    """One entity of the knowledge base."""

    name: str
    capital: str
    colour: str
    animal: str
    food: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


def fact_sentences(country: Country) -> list[str]:
    """Plain sentences stating every attribute (the pre-training corpus teaches facts with these)."""
    c = country
    return [
        f"The capital of {c.name} is {c.capital}.",
        f"The flag of {c.name} is {c.colour}.",
        f"The national animal of {c.name} is the {c.animal}.",
        f"{c.name} is known for {c.food}.",
    ]


@dataclass(frozen=True)
class KnowledgeBase:
    """Known countries (`countries`) and names that look alike but are not in it (`unknown`)."""

    countries: tuple[Country, ...]
    unknown: tuple[str, ...]

    def get(self, name: str) -> Country | None:
        for c in self.countries:
            if c.name.lower() == name.lower():
                return c
        return None

    @property
    def capitals(self) -> tuple[str, ...]:
        return tuple(c.capital for c in self.countries)

    def domain(self, attribute: str) -> tuple[str, ...]:
        """Every value an answer about `attribute` could name."""
        return {"capital": self.capitals, "colour": COLOURS, "animal": ANIMALS, "food": FOODS}[attribute]


def _name(rng: random.Random, ends: tuple[str, ...]) -> str:
    syllables = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(2))
    return (syllables + rng.choice(ends)).capitalize()


def _unique_names(rng: random.Random, n: int, ends: tuple[str, ...], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = _name(rng, ends)
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_kb(seed: int, n_known: int = 40, n_unknown: int = 80) -> KnowledgeBase:
    """The knowledge base of world `seed` (deterministic: same seed, same names and facts)."""
    rng = random.Random(f"alignkit-world:{seed}:kb")
    taken: set[str] = set()
    names = _unique_names(rng, n_known + n_unknown, COUNTRY_ENDS, taken)
    cities = _unique_names(rng, n_known, CITY_ENDS, taken)
    countries = tuple(
        Country(name, city, rng.choice(COLOURS), rng.choice(ANIMALS), rng.choice(FOODS))
        for name, city in zip(names[:n_known], cities)
    )
    return KnowledgeBase(countries=countries, unknown=tuple(names[n_known:]))
