"""`World(seed)`: the knowledge base, the questions, the train/eval split and the gold judge."""

from __future__ import annotations

import math
import random
import re

from alignkit.world.judge import Verdict, judge_task, normalise, off_world, parse_question
from alignkit.world.kb import ATTRIBUTES, KnowledgeBase, make_kb
from alignkit.world.tasks import (
    CATEGORIES,
    FACT_QUESTIONS,
    NUMBER_WORDS,
    Task,
    arithmetic_task,
    enumerate_tasks,
    fact_task,
    format_prompt,
    format_task,
    render,
)

HOLDOUT_FRACTION = 0.25

_ARITHMETIC = re.compile(r"what is (-?\d+) (plus|minus) (-?\d+)\?")
_UPPER = re.compile(r"say the word ([a-z]+) in uppercase\.")
_REPEAT = re.compile(r"repeat the word ([a-z]+) (two|three) times\.")
_FACT = {
    attr: re.compile(re.escape(normalise(q)).replace(r"\{e\}", r"([a-z]+)"))
    for attr, q in FACT_QUESTIONS.items()
}


class World:
    """The built-in world of `seed`: everything is a deterministic function of the seed.

    tasks[c] lists every question of category c; train[c] and eval[c] split them, holding out
    a quarter of each category by question (for "unknown", by entity name) for evaluation.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.kb: KnowledgeBase = make_kb(self.seed)
        self.tasks: dict[str, list[Task]] = enumerate_tasks(self.kb)
        self.train: dict[str, list[Task]] = {}
        self.eval: dict[str, list[Task]] = {}
        for cat in CATEGORIES:
            groups = sorted({t.group for t in self.tasks[cat]})
            random.Random(f"alignkit-world:{self.seed}:split:{cat}").shuffle(groups)
            held = set(groups[: math.ceil(HOLDOUT_FRACTION * len(groups))])
            self.eval[cat] = [t for t in self.tasks[cat] if t.group in held]
            self.train[cat] = [t for t in self.tasks[cat] if t.group not in held]
        self._index = {normalise(t.question): t for ts in self.tasks.values() for t in ts}

    def __repr__(self) -> str:
        return f"World(seed={self.seed})"

    def task(self, prompt: object) -> Task | None:
        """The task a prompt asks, or None when it is not a question of this world.

        Questions in the world's templates are understood beyond the enumerated ones
        (any numbers, any word, any entity name: an unlisted name is an unknown entity).
        """
        q = normalise(parse_question(prompt))
        if q in self._index:
            return self._index[q]
        if m := _ARITHMETIC.fullmatch(q):
            return arithmetic_task(int(m.group(1)), m.group(2), int(m.group(3)))
        if m := _UPPER.fullmatch(q):
            return format_task(m.group(1), 0)
        if m := _REPEAT.fullmatch(q):
            n = {v: k for k, v in NUMBER_WORDS.items()}[m.group(2)]
            return format_task(m.group(1), n)
        for attr in ATTRIBUTES:
            if m := _FACT[attr].fullmatch(q):
                known = self.kb.get(m.group(1))
                name = known.name if known else m.group(1).capitalize()
                return fact_task(name, attr, known is not None)
        return None

    def judge(self, prompt: object, response: object) -> Verdict:
        """The gold verdict on `response` to `prompt` (never raises)."""
        task = self.task(prompt)
        if task is None:
            return off_world(prompt)
        return judge_task(task, response, self.kb)

    def score(self, prompt: object, response: object) -> float:
        """The gold score in [0, 1]."""
        return self.judge(prompt, response).total

    def prefer(
        self, prompt: object, a: str, b: str, noise: float = 0.0, rng: random.Random | None = None
    ) -> int:
        """Which response an annotator prefers: 0 for `a`, 1 for `b`.

        The gold judge decides; ties are a coin flip; with probability `noise` the label is
        flipped (annotators disagree).
        """
        rng = rng or random.Random(0)
        sa, sb = self.score(prompt, a), self.score(prompt, b)
        label = rng.randrange(2) if sa == sb else int(sb > sa)
        if noise > 0 and rng.random() < noise:
            label = 1 - label
        return label

    def render(self, task: Task, quality: str, rng: random.Random) -> str:
        """A response of `quality` (see tasks.QUALITIES) to `task`."""
        return render(task, quality, rng, self.kb)

    @staticmethod
    def prompt(task: Task) -> str:
        """The prompt string of a task: "Human: <question>\\nAssistant:"."""
        return format_prompt(task.question)
