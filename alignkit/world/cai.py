"""Constitutional AI in the built-in world: red-team prompts and critique/revision demonstrations.

A tiny model cannot critique what it has never seen critiqued, so the world teaches the skill,
in the exact prompt formats of `alignkit.feedback.constitution` (critique_prompt,
revision_prompt, preference_prompt), on TRAINING questions only:

    red_team_prompts(world, "train")        harmful requests + their benign look-alikes
    cai_sft_records(world, seed, n)         n demonstrations {"prompt": [messages], "response"}
    helpful_sft_records(world, seed, n)     a "helpful-only" assistant's demonstrations: the
                                            world's SFT rows, harmful requests complied with
                                            (the starting point of Constitutional AI)

The demonstrations are made from the world's graded responses (`World.render`):

    harmful request, compliance     critique: it helps hurt someone   revision: a refusal with a reason
    harmful request, bare/rude no   critique: right to refuse, but ...  revision: a refusal with a reason
    harmful request, good refusal   critique: nothing harmful           revision: unchanged
    benign look-alike, good answer  critique: harmless, it helps        revision: unchanged
    benign, refusal / rude / wrong  critique: needless refusal / ...    revision: the helpful answer
    preference question             the answer (A or B) is the better-graded reply (the world's
                                    quality order, never the gold judge's score)

None of these is a direct (request -> answer) example: the model learns to answer harmful
requests harmlessly only through its own revisions (SL-CAI) and its own labels (RL-CAI).
"""

from __future__ import annotations

import random

from alignkit.feedback.constitution import (
    Constitution,
    critique_prompt,
    load_constitution,
    preference_prompt,
    revision_prompt,
)
from alignkit.world.tasks import REFUSALS_IDEAL, Task
from alignkit.world.world import World

RED_TEAM_CATEGORIES = ("harmful", "benign")

CRITIQUES = {
    ("harmful", "harmful"): "My reply helps someone cause harm. I should refuse and say why.",
    ("harmful", "mediocre"): "Refusing is right, but my reply does not say why.",
    ("harmful", "rude"): "Refusing is right, but my reply is rude.",
    ("harmful", "ideal"): "My reply refuses to cause harm and says why. It is fine.",
    ("benign", "ideal"): "The request is harmless and my reply helps. It is fine.",
    ("benign", "mediocre"): "The request is harmless. My reply helps but is too short.",
    ("benign", "refusal"): "The request is harmless, so I should answer it, not refuse.",
    ("benign", "rude"): "The request is harmless, but my reply is rude and unhelpful.",
    ("benign", "wrong"): "The request is harmless, but my reply answers another question.",
}
"""The critique of each (category, response quality); one wording per case, whatever the principle."""

DEMO_MIX = {
    "harmful": {"harmful": 5, "mediocre": 2, "rude": 2, "ideal": 2},
    "benign": {"ideal": 4, "refusal": 3, "rude": 2, "mediocre": 2, "wrong": 1},
}
"""How often each response quality is critiqued; compliance and needless refusals dominate."""

RANK = {
    "harmful": {"ideal": 3, "mediocre": 2, "rude": 1, "harmful": 0},
    "benign": {"ideal": 3, "mediocre": 2, "refusal": 1, "rude": 1, "wrong": 1},
}
"""The world's quality order used for the preference demonstrations (higher is better)."""

KINDS = ("critique", "revision", "preference")


def red_team_prompts(
    world: World, split: str = "train", categories: tuple[str, ...] = RED_TEAM_CATEGORIES
) -> list[dict]:
    """Harmful requests and their benign look-alikes of `split` ("train" or "eval"), as
    {"prompt", "category"} rows in the order of `categories`. Evaluation uses both (the benign
    ones catch a model that learned to refuse everything that sounds dangerous); SL-CAI revises
    the harmful ones (categories=("harmful",)) and keeps helpfulness with helpful data."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    bad = [c for c in categories if c not in RED_TEAM_CATEGORIES]
    if bad or not categories:
        raise ValueError(
            f"categories must be a non-empty subset of {RED_TEAM_CATEGORIES}, got {categories!r}"
        )
    pool = world.train if split == "train" else world.eval
    return [{"prompt": world.prompt(t), "category": c} for c in categories for t in pool[c]]


def helpful_sft_records(world: World, seed: int = 0, n: int = 3000, harmful: str = "comply") -> list[dict]:
    """A helpful-only assistant's demonstrations: the world's SFT rows (`write.sft_examples`,
    same seed, same rows) with the harmful category answered as asked ("comply": the world's
    harmful-compliance responses, what an annotator judging helpfulness alone would write) or
    left out ("drop"). The starting point of Constitutional AI (Bai et al. 2022, Sec. 3.1) is
    such a model: it does what it is asked, harmful or not."""
    from alignkit.world.write import sft_examples

    if harmful not in ("comply", "drop"):
        raise ValueError(f"harmful must be 'comply' or 'drop', got {harmful!r}")
    rng = random.Random(f"alignkit-world:{seed}:sft")
    rows = sft_examples(world, n, rng)
    if harmful == "drop":
        return [r for r in rows if r["category"] != "harmful"]
    for r in rows:
        if r["category"] == "harmful":
            r["response"] = world.render(world.task(r["prompt"]), "harmful", rng)
    return rows


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[k] for k in names])[0]


def _revision(world: World, task: Task, quality: str, response: str, rng: random.Random) -> str:
    if task.category == "harmful":
        return response if quality == "ideal" else rng.choice(REFUSALS_IDEAL)
    return response if quality == "ideal" else world.render(task, "ideal", rng)


def _messages(conversation) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in conversation]


def _demo(world: World, constitution: Constitution, kind: str, rng: random.Random) -> dict:
    cat = rng.choice(RED_TEAM_CATEGORIES)
    task = rng.choice(world.train[cat])
    prompt = world.prompt(task)
    principle = rng.choice(constitution.principles)
    if kind == "preference":
        ranks = RANK[cat]
        while True:
            qa, qb = rng.sample(list(ranks), 2)
            if ranks[qa] != ranks[qb]:
                break
        a, b = world.render(task, qa, rng), world.render(task, qb, rng)
        answer = constitution.choices[0] if ranks[qa] > ranks[qb] else constitution.choices[1]
        # no leading space: "A" and "B" are then single, symmetric tokens right after "Assistant:"
        return {"prompt": _messages(preference_prompt(prompt, a, b, principle, constitution.choices)),
                "response": answer, "category": cat}  # fmt: skip
    quality = _weighted(rng, DEMO_MIX[cat])
    response = world.render(task, quality, rng)
    critique = " " + CRITIQUES[(cat, quality)]
    if kind == "critique":
        return {"prompt": _messages(critique_prompt(prompt, response, principle)), "response": critique,
                "category": cat}  # fmt: skip
    revision = _revision(world, task, quality, response, rng)
    return {"prompt": _messages(revision_prompt(prompt, response, principle, critique)), "response": revision,
            "category": cat}  # fmt: skip


def cai_sft_records(
    world: World,
    seed: int = 0,
    n: int = 3000,
    constitution: Constitution | str | None = None,
    kinds: tuple[str, ...] = KINDS,
) -> list[dict]:
    """`n` demonstrations on training questions, cycling through `kinds` (critique, revision,
    preference).

    Rows are SFT records {"prompt": [{"role", "content"}, ...], "response", "category"} that
    `alignkit sft` reads directly; the conversation prompt is rendered by the model's chat
    template exactly as `alignkit cai revise` / `cai label` render theirs. Same arguments, same rows.
    """
    if not isinstance(constitution, Constitution):
        constitution = load_constitution(constitution)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    rng = random.Random(f"alignkit-world:{seed}:cai")
    return [_demo(world, constitution, kinds[i % len(kinds)], rng) for i in range(n)]


def red_team_scores(world: World, prompts: list[str], responses: list[str]) -> dict:
    """Gold criteria per category of red-team answers: for each category the mean `harmless`,
    `helpful` and `total`, the share of refusals, and how often each judge label occurs."""
    by_cat: dict[str, list] = {}
    for p, r in zip(prompts, responses):
        v = world.judge(p, r)
        by_cat.setdefault(v.category, []).append(v)
    out = {}
    for cat, vs in sorted(by_cat.items()):
        n = len(vs)
        labels: dict[str, int] = {}
        for v in vs:
            labels[v.label] = labels.get(v.label, 0) + 1
        out[cat] = {
            "n": n,
            "harmless": sum(v.harmless for v in vs) / n,
            "helpful": sum(v.helpful for v in vs) / n,
            "total": sum(v.total for v in vs) / n,
            "refusal_rate": labels.get("refusal", 0) / n,
            "labels": labels,
        }
    return out


def label_agreement(world: World, pairs: list[dict]) -> dict:
    """How often AI preference labels {"prompt", "chosen", "rejected"} pick the gold judge's
    better response. Pairs the judge scores equal are left out (counted in `gold_ties`);
    `agreement` is over the rest, overall and per category."""
    agree: dict[str, list[bool]] = {}
    ties = 0
    for row in pairs:
        sc, sr = world.score(row["prompt"], row["chosen"]), world.score(row["prompt"], row["rejected"])
        if sc == sr:
            ties += 1
            continue
        cat = world.judge(row["prompt"], row["chosen"]).category
        agree.setdefault(cat, []).append(sc > sr)
    flat = [a for v in agree.values() for a in v]
    return {
        "pairs": len(pairs),
        "gold_ties": ties,
        "decided": len(flat),
        "agreement": sum(flat) / len(flat) if flat else None,
        "per_category": {
            c: {"decided": len(v), "agreement": sum(v) / len(v)} for c, v in sorted(agree.items())
        },
    }
