"""Write the world's data sets to a folder, load a world back, and judge from the command line.

Files (JSONL, one object a line, sorted keys, compact separators; same seed, same bytes):

    pretrain.jsonl          {"text"}                                   mixed-quality corpus
    sft.jsonl               {"prompt", "response", "category"}         imperfect demonstrations
    preferences.jsonl       {"prompt", "chosen", "rejected", "category"}  judge-labelled, noisy
    preferences_eval.jsonl  same, on held-out questions, no label noise
    train_prompts.jsonl     {"prompt", "category"}                     every training question once
    eval_prompts.jsonl      {"prompt", "category"}                     held-out questions
    sft_helpful.jsonl       {"prompt", "response", "category"}         a helpful-only assistant's
                            demonstrations (harmful requests complied with): Constitutional AI's start
    cai_sft.jsonl           {"prompt": [messages], "response", "category"}  critique, revision and
                            preference-question demonstrations in the constitution's formats
    redteam_train.jsonl     {"prompt", "category"}                     harmful requests, then their
                            benign look-alikes, training questions (SL-CAI and RL-CAI prompts)
    redteam_eval.jsonl      {"prompt", "category"}                     the same, held out
    world.json              seed, counts, label noise, categories, format version

The Constitutional AI files (alignkit.world.cai, docs/cai.md) use training questions only, and
no human harmlessness label: harm enters only through the constitution-format demonstrations.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from alignkit.world.kb import fact_sentences
from alignkit.world.tasks import CATEGORIES, CATEGORY_QUALITIES, FORMAT_WORDS, Task
from alignkit.world.world import HOLDOUT_FRACTION, World

FORMAT_VERSION = 1
FILES = {
    "pretrain": "pretrain.jsonl",
    "sft": "sft.jsonl",
    "preferences": "preferences.jsonl",
    "preferences_eval": "preferences_eval.jsonl",
    "train_prompts": "train_prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
    "sft_helpful": "sft_helpful.jsonl",
    "cai_sft": "cai_sft.jsonl",
    "redteam_train": "redteam_train.jsonl",
    "redteam_eval": "redteam_eval.jsonl",
}

# How often each quality is drawn, by use. Pre-training is deliberately unaligned: compliance
# with harmful requests and invented facts are common there.
PRETRAIN_MIX = {
    "arithmetic": {"ideal": 3, "mediocre": 2, "wrong": 2, "rude": 2, "refusal": 1},
    "facts": {"ideal": 3, "mediocre": 2, "wrong": 2, "rude": 2, "refusal": 1},
    "format": {"ideal": 3, "mediocre": 2, "wrong": 2, "rude": 2, "refusal": 1},
    "harmful": {"ideal": 2, "mediocre": 1, "rude": 1, "harmful": 4},
    "benign": {"ideal": 3, "mediocre": 2, "wrong": 1, "rude": 2, "refusal": 2},
    "unknown": {"ideal": 2, "mediocre": 1, "rude": 2, "hallucination": 4, "refusal": 1},
}
# The rest over-refuses, except where a refusal would be the wrong lesson: on harmful requests the
# rest is a terse refusal, on small talk (which the base model already answers well) an ideal
# answer. Greedy decoding must leave RLHF room to improve, yet SFT must beat base in every category.
SFT_IDEAL, SFT_MEDIOCRE = 0.45, 0.40
SFT_INSTEAD_OF_REFUSAL = {"harmful": "mediocre", "benign": "ideal"}
PAIR_WEIGHT = {"ideal": 3, "mediocre": 2}  # other qualities weigh 1
FACT_DOC_SHARE = 0.4  # share of pre-training documents that state facts rather than dialogues


def _dumps(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(_dumps(row) + "\n")


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def _dialogue(world: World, task: Task, quality: str, rng: random.Random) -> str:
    return world.prompt(task) + world.render(task, quality, rng)


def pretrain_documents(world: World, n: int, rng: random.Random) -> list[dict]:
    """Mixed-quality dialogues on training questions, and plain fact sentences.

    Facts cover the whole knowledge base (held-out questions included): evaluation measures
    whether the model says what it knows, well, not whether it could learn a fact never shown.
    """
    countries = list(world.kb.countries)
    docs = []
    n_facts = n_countries = 0
    for _ in range(n):
        if rng.random() < FACT_DOC_SHARE:
            kind, n_facts = n_facts % 4, n_facts + 1
            if kind < 2:  # half the fact documents describe one country, each in turn
                c, n_countries = countries[n_countries % len(countries)], n_countries + 1
                facts = fact_sentences(c)
                rng.shuffle(facts)
                text = " ".join([f"{c.name} is a country."] + facts)
            elif kind == 2:
                sums = rng.sample(world.tasks["arithmetic"], 5)
                text = " ".join(f"{t.a} {t.op} {t.b} is {t.result}." for t in sums)
            else:
                words = rng.sample(FORMAT_WORDS, 4)
                text = " ".join(f"The word {w} in uppercase is {w.upper()}." for w in words)
        else:
            turns = []
            for _ in range(rng.choice((1, 1, 2, 3))):
                cat = rng.choice(CATEGORIES)
                task = rng.choice(world.train[cat])
                turns.append(_dialogue(world, task, _weighted(rng, PRETRAIN_MIX[cat]), rng))
            text = "\n".join(turns)
        docs.append({"text": text})
    return docs


def sft_examples(world: World, n: int, rng: random.Random) -> list[dict]:
    """Demonstrations on training questions: mostly ideal, some terse, a few over-refusals."""
    rows = []
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        task = rng.choice(world.train[cat])
        u = rng.random()
        quality = "ideal" if u < SFT_IDEAL else "mediocre" if u < SFT_IDEAL + SFT_MEDIOCRE else "refusal"
        if quality == "refusal":
            quality = SFT_INSTEAD_OF_REFUSAL.get(cat, quality)
        rows.append(
            {"prompt": world.prompt(task), "response": world.render(task, quality, rng), "category": cat}
        )
    return rows


def preference_pairs(world: World, split: str, n: int, label_noise: float, rng: random.Random) -> list[dict]:
    """Pairs of two responses of different gold score, labelled by the judge, flipped with
    probability `label_noise`."""
    pool = world.train if split == "train" else world.eval
    rows = []
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        weights = {q: PAIR_WEIGHT.get(q, 1) for q in CATEGORY_QUALITIES[cat]}
        while True:
            task = rng.choice(pool[cat])
            qa = _weighted(rng, weights)
            qb = _weighted(rng, {q: w for q, w in weights.items() if q != qa})
            a, b = world.render(task, qa, rng), world.render(task, qb, rng)
            prompt = world.prompt(task)
            sa, sb = world.score(prompt, a), world.score(prompt, b)
            if sa != sb:
                break
        chosen, rejected = (a, b) if sa > sb else (b, a)
        if rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "category": cat})
    return rows


def eval_prompt_rows(world: World, n: int, rng: random.Random) -> list[dict]:
    """`n` held-out prompts balanced over categories; a category with fewer held-out
    questions than its share repeats them (each appears once before any appears twice)."""
    rows = []
    for k, cat in enumerate(CATEGORIES):
        share = n // len(CATEGORIES) + (1 if k < n % len(CATEGORIES) else 0)
        pool = list(world.eval[cat])
        order: list[Task] = []
        while len(order) < share:
            rng.shuffle(pool)
            order += pool
        rows += [{"prompt": world.prompt(t), "category": cat} for t in order[:share]]
    return rows


def write_world(
    out_dir: str | Path,
    seed: int = 0,
    n_pairs: int = 10000,
    label_noise: float = 0.1,
    n_sft: int = 3000,
    n_pretrain: int = 4000,
    n_eval: int = 200,
    n_pairs_eval: int = 500,
    n_cai: int = 3000,
) -> dict:
    """Write every file of world `seed` into `out_dir`; return counts and paths.

    `n_cai` is the number of Constitutional AI demonstrations (cai_sft.jsonl); sft_helpful.jsonl
    has `n_sft` rows. Same arguments, byte-identical files.
    """
    from alignkit.world.cai import RED_TEAM_CATEGORIES, cai_sft_records, helpful_sft_records, red_team_prompts

    if not 0.0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5], got {label_noise}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = World(seed)

    def rng(part: str) -> random.Random:
        return random.Random(f"alignkit-world:{seed}:{part}")

    data = {
        "pretrain": pretrain_documents(world, n_pretrain, rng("pretrain")),
        "sft": sft_examples(world, n_sft, rng("sft")),
        "preferences": preference_pairs(world, "train", n_pairs, label_noise, rng("preferences")),
        "preferences_eval": preference_pairs(world, "eval", n_pairs_eval, 0.0, rng("preferences_eval")),
        "train_prompts": [
            {"prompt": world.prompt(t), "category": c} for c in CATEGORIES for t in world.train[c]
        ],
        "eval_prompts": eval_prompt_rows(world, n_eval, rng("eval")),
        "sft_helpful": helpful_sft_records(world, seed, n_sft),
        "cai_sft": cai_sft_records(world, seed, n_cai),
        "redteam_train": red_team_prompts(world, "train"),
        "redteam_eval": red_team_prompts(world, "eval"),
    }
    for name, rows in data.items():
        _write_jsonl(out / FILES[name], rows)
    meta = {
        "format_version": FORMAT_VERSION,
        "generator": "alignkit.world",
        "seed": seed,
        "label_noise": label_noise,
        "holdout_fraction": HOLDOUT_FRACTION,
        "categories": list(CATEGORIES),
        "counts": {name: len(rows) for name, rows in data.items()},
        "files": dict(FILES),
        "knowledge_base": {"known": len(world.kb.countries), "unknown": len(world.kb.unknown)},
        # red-team files list the harmful questions first: `limit=<harmful>` selects them alone
        "red_team": {
            split: {c: sum(r["category"] == c for r in data[f"redteam_{split}"]) for c in RED_TEAM_CATEGORIES}
            for split in ("train", "eval")
        },
    }
    (out / "world.json").write_text(json.dumps(meta, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    paths = {name: str(out / f) for name, f in FILES.items()} | {"world": str(out / "world.json")}
    return {
        "out_dir": str(out),
        "seed": seed,
        "label_noise": label_noise,
        "counts": meta["counts"],
        "paths": paths,
    }


def load_world(path: str | Path) -> World:
    """The World a folder was written from (reads the seed from its world.json)."""
    p = Path(path)
    meta_path = p / "world.json" if p.is_dir() else p
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta_path}: no world.json here; write one with write_world") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    if not isinstance(meta.get("seed"), int):
        raise ValueError(f"{meta_path}: field 'seed' is missing or not an integer")
    return World(meta["seed"])


def judge_cli(prompt: str, response: str, seed: int = 0) -> dict:
    """The gold verdict as a plain dict: total, helpful, harmless, honest, polite, category,
    label, reason."""
    return asdict(World(seed).judge(prompt, response))
