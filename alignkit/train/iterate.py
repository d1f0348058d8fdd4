"""Stage 3c, the iterate loop (the brief's "Step 3: Iterate"): sample fresh response pairs from the
current policy, have a judge label them, retrain the reward model on the old and new pairs, run
PPO again from the current policy, and repeat.

    alignkit iterate --config configs/iterate.yaml policy=runs/sft/final \\
        reward_model=runs/reward/final world=runs/world out=runs/iterate

Round 0 is the starting point: `policy` (usually the SFT model) and the reward model
`reward_model` (trained here on `preferences` when not given). Round k = 1..R:

  1. sample: `prompts_per_round` training prompts (a seeded draw per round), two responses each
     from policy_{k-1} at `temperature`;
  2. label: the judge compares the two responses; identical or empty pairs are not shown to it,
     ties are dropped; with probability `label_noise` a label is flipped (in the world the gold
     judge plus this noise stands in for human annotators, as in WORLD/preferences.jsonl);
  3. reward model RM_k: trained (alignkit.train.reward) on the initial pairs plus the new pairs of
     rounds 1..k, starting from RM_{k-1} (`reward_init: previous`) or afresh from `reward_base`
     (`reward_init: base`);
  4. PPO (alignkit.train.ppo) from policy_{k-1} (or policy_0 with `ppo_init: start`) against
     RM_k, its KL anchored to the model it starts from (`kl_reference: previous`, a trust region
     around the previous policy) or to policy_0 (`kl_reference: start`); `kl_to_start` in the
     summary measures the whole drift from policy_0;
  5. evaluation: gold score of policy_k on the world's held-out prompts (greedy,
     alignkit.eval.gold), RM_k's accuracy on held-out pairs, KL(policy_k || policy_0).

Files (k >= 1; round_0/ holds reward/ when RM_0 is trained here, and eval_responses.jsonl):

    OUT/summary.json                  config and one row per round (rewritten atomically after each)
    OUT/round_k/samples.jsonl         the sampled response pairs, before judging
    OUT/round_k/pairs.jsonl           the round's labelled pairs (+ judge evidence, `flipped`)
    OUT/round_k/reward_data.jsonl     what RM_k trains on: initial pairs + pairs of rounds 1..k
    OUT/round_k/reward/               RM_k (final/), metrics.jsonl, eval.json
    OUT/round_k/ppo/                  policy_k (final/), metrics.jsonl, eval.json
    OUT/round_k/eval_responses.jsonl  policy_k's greedy answers to the held-out prompts, judged
    OUT/round_k/round.json            the round's summary row: the round is finished

With `resume`, finished rounds are read back and an unfinished one continues from its last
finished step (samples, pairs, reward model, PPO), a killed reward-model or PPO stage from its
newest checkpoint (`reward.train.save_every`, `ppo.train.save_every`), so a human-labelled round (judge=human, which
exports OUT/round_k/human_pairs.jsonl and stops) picks up once the file is labelled.
docs/ppo.md, "The iterate loop", explains the choices and the summary's columns.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignkit.atomic import read_jsonl, write_json_atomic, write_text_atomic
from alignkit.config import ConfigError, required
from alignkit.console import header
from alignkit.data.records import PreferencePair, Prompt, PromptOnly
from alignkit.train import ppo as ppo_stage
from alignkit.train import reward as reward_stage
from alignkit.train.distributed import (
    SINGLE,
    Dist,
    all_gather_list,
    barrier,
    broadcast_object,
    init_dist,
    share,
)
from alignkit.train.ray_launch import RayConfig, run_here_or_on_ray

ROUND_DIR = re.compile(r"round_\d+")


@dataclass(frozen=True)
class Config:
    """Iterated RLHF settings. `reward` and `ppo` are the two stages' own configs (same keys and
    defaults as `alignkit reward` / `alignkit ppo`), minus the paths each round sets itself."""

    policy: str = required()
    """Round 0's policy (usually the SFT model); round k's PPO starts from round k-1's policy."""
    reward_model: str | None = None
    """Round 0's reward model directory; None trains one on `preferences` (OUT/round_0/reward)."""
    reward_init: Literal["previous", "base"] = "previous"
    """RM_k starts from RM_{k-1} ('previous', a warm start) or afresh from reward_base ('base')."""
    ppo_init: Literal["previous", "start"] = "previous"
    """Round k's PPO starts from policy_{k-1} ('previous') or afresh from policy_0 ('start'; its KL
    anchor is then policy_0 too); the pairs are always sampled from policy_{k-1}."""
    kl_reference: Literal["previous", "start"] = "previous"
    """KL anchor of round k's PPO: policy_{k-1}, the model it starts from ('previous'), or policy_0 ('start')."""
    new_pairs_repeat: int = 1
    """Each new (on-policy) pair appears this many times in the reward model's data (upweighting)."""
    reward_base: str | None = None
    """Model a fresh reward model starts from (round 0 without reward_model, or reward_init=base); default `policy`."""
    world: str | None = None
    """World directory: default prompts, pairs, gold judge and label noise, and the gold evaluation."""
    prompts: str | None = None
    """Prompts the pairs and the PPO rollouts are sampled on (any prompt format); default WORLD/train_prompts.jsonl."""
    preferences: str | None = None
    """Initial preference pairs (any preference format); default WORLD/preferences.jsonl."""
    initial_pairs: int = 0
    """Use only the first N initial pairs (0: all); the new pairs are always all kept."""
    eval_preferences: str | None = None
    """Held-out pairs for the reward model's accuracy; default WORLD/preferences_eval.jsonl (none: not measured)."""
    judge: str = "gold"
    """Who labels the new pairs: gold | reward:DIR | llm:DIR | endpoint[:MODEL] | human (exports OUT/round_k/human_pairs.jsonl) | labeldb:DB[#k=N,timeout=S] (people in `alignkit label serve`; waits for their labels, then resume)."""
    label_noise: float | None = None
    """Probability a label is flipped; None: the world's label_noise (world.json) for judge=gold, else 0."""
    rounds: int = 2
    """Rounds after round 0 (each: sample, label, reward model, PPO)."""
    prompts_per_round: int = 256
    """Prompts sampled per round (two responses each; above the number of prompts, each prompt
    is drawn several times); ties and identical responses are dropped."""
    temperature: float = 1.0
    """Sampling temperature of the two responses (> 0)."""
    max_new_tokens: int = 32
    """Longest sampled response."""
    generation_batch_size: int = 64
    """Prompts decoded together."""
    eval_limit: int = 0
    """Held-out prompts for the gold evaluation and the KL, spread over the file (0: all)."""
    eval_max_new_tokens: int = 32
    """Longest greedy answer in the gold evaluation (configs/eval.yaml uses 32)."""
    reward: reward_stage.Config = field(default_factory=reward_stage.Config)
    """Reward model training (alignkit.train.reward.Config); round k uses train.seed + k."""
    ppo: ppo_stage.Config = field(
        default_factory=lambda: ppo_stage.Config(iterations=20, rollout_batch=32, ppo_epochs=2, kl_coef=0.1)
    )
    """PPO (alignkit.train.ppo.Config); reward.source is 'model' (RM_k); round k uses train.seed + k."""
    seed: int = 0
    """Seed of the prompt draws, the sampling and the label noise."""
    out: str = "runs/iterate"
    """Run directory (see the module docstring)."""
    resume: bool = False
    """Continue the run in `out`: finished rounds are kept, an unfinished one continues."""
    overwrite: bool = False
    """Delete an earlier run's round_* folders and summary.json in `out` and start afresh."""
    launcher: Literal["torchrun", "ray"] = "torchrun"
    """'torchrun': this process is the run (or one of torchrun's ranks); 'ray': place ray.workers ranks as Ray actors."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray placement (launcher=ray only): the ranks and their resources, the cluster (no reward or reference actor:
    both models change every round)."""


# keys of the nested stage configs that each round sets itself -> the top-level key to set instead
PPO_SET_BY_ROUND = {
    "model.path": "policy (or ppo_init)", "data.path": "prompts", "reward.model": "reward_model", "world": "world", "out": "out",
    "reference": "kl_reference", "launcher": "launcher", "ray": "ray",
}
REWARD_SET_BY_ROUND = {
    "model.path": "reward_base (or reward_init)", "data.path": "preferences", "data.eval_path": "eval_preferences",
    "data.limit": "initial_pairs", "world": "world", "out": "out",
}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check(cfg: Config) -> None:
    if not cfg.policy:
        raise ConfigError("config key 'policy' is required (round 0's policy, e.g. runs/sft/final)")
    if not cfg.prompts and not cfg.world:
        raise ConfigError("set prompts (a prompt file) or world (uses WORLD/train_prompts.jsonl)")
    if not cfg.reward_model and not cfg.preferences and not cfg.world:
        raise ConfigError("set reward_model, or preferences / world to train round 0's reward model")
    if cfg.rounds > 0 and not cfg.preferences and not cfg.world:
        raise ConfigError("set preferences (or world): each round's reward model trains on them plus the new pairs")
    if cfg.new_pairs_repeat < 1:
        raise ConfigError(f"config key 'new_pairs_repeat' must be >= 1, got {cfg.new_pairs_repeat}")
    if cfg.kl_reference == "start" and cfg.ppo.model.lora_r > 0:
        raise ConfigError("config key 'kl_reference': 'start' needs ppo.model.lora_r = 0 (LoRA anchors to its own base)")
    if cfg.rounds < 0 or cfg.prompts_per_round < 1 or cfg.initial_pairs < 0 or cfg.eval_limit < 0:
        raise ConfigError("rounds, initial_pairs and eval_limit must be >= 0, prompts_per_round >= 1")
    if not cfg.temperature > 0:
        raise ConfigError(f"config key 'temperature' must be > 0 (two greedy samples are identical), got {cfg.temperature}")
    if cfg.label_noise is not None and not 0.0 <= cfg.label_noise <= 0.5:
        raise ConfigError(f"config key 'label_noise' must be in [0, 0.5], got {cfg.label_noise}")
    if cfg.judge.startswith("human:"):
        raise ConfigError("config key 'judge': use judge=human (each round exports OUT/round_k/human_pairs.jsonl)")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("set at most one of resume and overwrite")
    for section, stage_cfg, owned in (("ppo", cfg.ppo, PPO_SET_BY_ROUND), ("reward", cfg.reward, REWARD_SET_BY_ROUND)):
        default = type(stage_cfg)()
        for key, instead in owned.items():
            if _get(stage_cfg, key) != _get(default, key):
                raise ConfigError(f"config key '{section}.{key}' is set by each round; set '{instead}' instead")
    if cfg.ppo.reward.source != "model":
        raise ConfigError(f"config key 'ppo.reward.source' must be 'model' (the round's reward model), got {cfg.ppo.reward.source!r}")
    for key in ("reward_actor", "reference_actor"):
        if getattr(cfg.ray, key):
            raise ConfigError(f"config key 'ray.{key}': not with iterate (each round trains a new reward model and "
                              "moves the KL reference); the ranks hold both")
    if cfg.ray.vllm_engines:
        raise ConfigError("config key 'ray.vllm_engines': not with iterate (vLLM actors are built and tested for "
                          "ppo, grpo and rloo); iterate's PPO samples in each rank (ppo.rollout.engine)")


# ---------------------------------------------------------------------------------- pairs
def prompt_json(prompt: Prompt) -> str | list[dict[str, str]]:
    """A prompt as the data loaders read it back: the string, or a list of {role, content}."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


def pair_json(pair: PreferencePair) -> dict:
    """A PreferencePair as one prompt/chosen/rejected JSON object (optional fields kept)."""
    row: dict[str, Any] = {"prompt": prompt_json(pair.prompt), "chosen": pair.chosen, "rejected": pair.rejected}
    for key in ("margin", "soft_label", "category"):
        if getattr(pair, key) is not None:
            row[key] = getattr(pair, key)
    return row


def sample_pairs(
    policy: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 64,
    first_prompt: int = 0,
) -> list[tuple[str, str]]:
    """Two responses per prompt sampled from `policy` at `temperature`, decoded without special
    tokens: [(a_0, b_0), (a_1, b_1), ...] in the order of `prompt_ids`. Sample j of prompt i
    draws from its own RNG, seeded from (seed, 2 * (first_prompt + i) + j): the same seed gives
    the same responses whatever the batch size or the share of the prompts a rank samples
    (`prompt_ids` being prompts first_prompt, first_prompt + 1, ... of the round)."""
    from alignkit.data.tokenize import decode_response
    from alignkit.models.generate import HFGenerator, SamplingParams
    from alignkit.train.distributed import row_seeds

    rows = [list(p) for p in prompt_ids for _ in range(2)]  # the two samples of a prompt side by side
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            row_seeds=row_seeds(seed, 0, 2 * first_prompt, len(rows)))
    gen = HFGenerator(policy, tokenizer, batch_size=batch_size).generate(rows, params)
    texts = [decode_response(tokenizer, p, r) for p, r in zip(rows, gen)]  # "▁Paris" keeps its space
    return list(zip(texts[0::2], texts[1::2]))


def _side_evidence(detail: dict, chosen_is_a: bool) -> dict:
    """The judge's per-answer evidence (keys ending _a / _b) renamed to _chosen / _rejected."""
    out = {}
    for key, value in detail.items():
        if key.endswith(("_a", "_b")) and isinstance(value, (int, float, str, bool)):
            side = "chosen" if (key.endswith("_a") == chosen_is_a) else "rejected"
            out[f"{key[:-2]}_{side}"] = value
    return out


def label_pairs(
    judge: Any,
    records: Sequence[PromptOnly],
    samples: Sequence[tuple[str, str]],
    label_noise: float = 0.0,
    rng: random.Random | None = None,
    extra: dict | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Label the sampled pairs with `judge` (anything with `compare(prompts, a, b)`).

    Pairs with an empty (blank) response or two identical responses are counted and never shown
    to the judge; ties (outcome 0.5) are dropped. The winner becomes `chosen`; then, for each
    kept pair in order, one draw of `rng` flips the label when it is below `label_noise`
    (simulated annotator disagreement, as the world's preferences.jsonl). Returns the pair rows
    ({prompt, chosen, rejected, category?, flipped, the judge's evidence, **extra}) and counts
    {sampled, empty, identical, ties, flipped, pairs}.
    """
    rng = rng or random.Random(0)
    counts = {"sampled": len(samples), "empty": 0, "identical": 0, "ties": 0, "flipped": 0, "pairs": 0}
    shown = []
    for i, (a, b) in enumerate(samples):
        if not a.strip() or not b.strip():
            counts["empty"] += 1
        elif a == b:
            counts["identical"] += 1
        else:
            shown.append(i)
    verdicts = judge.compare([records[i].prompt for i in shown], [samples[i][0] for i in shown],
                             [samples[i][1] for i in shown]) if shown else []
    rows = []
    for i, v in zip(shown, verdicts):
        if v.outcome == 0.5:
            counts["ties"] += 1
            continue
        a, b = samples[i]
        chosen_is_a = v.outcome == 1.0
        flipped = rng.random() < label_noise
        if flipped:
            chosen_is_a = not chosen_is_a
            counts["flipped"] += 1
        chosen, rejected = (a, b) if chosen_is_a else (b, a)
        row: dict[str, Any] = {"prompt": prompt_json(records[i].prompt), "chosen": chosen, "rejected": rejected}
        if records[i].category is not None:
            row["category"] = records[i].category
        row["flipped"] = flipped
        row.update(_side_evidence(v.detail, chosen_is_a))
        row.update(extra or {})
        rows.append(row)
    counts["pairs"] = len(rows)
    return rows, counts


def label_policy_samples(
    policy_dir: str, world_dir: str, n_prompts: int, seed: int, max_new_tokens: int = 24,
    temperature: float = 1.0, label_noise: float | None = None, prompts: str | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Preference pairs on a policy's OWN answers, labelled by the world's gold judge with its label
    noise (the world's stand-in for people comparing a model's samples, as InstructGPT's labellers
    compared the SFT model's): `n_prompts` draws of the training prompts (`draw_prompts`, every
    prompt several times above their number), two samples each, `label_pairs`. Returns the pair
    rows and the counts of `label_pairs`."""
    from alignkit.models.load import load_model, load_tokenizer

    tok = load_tokenizer(policy_dir)
    drawn, ids = drawn_prompts(world_dir, n_prompts, seed, tok, prompts)
    samples = sample_pairs(load_model(policy_dir), tok, ids, max_new_tokens, temperature, seed)
    noise = world_noise(world_dir) if label_noise is None else label_noise
    return label_pairs(gold_judge(world_dir), drawn, samples, noise, random.Random(f"alignkit-policy-noise:{seed}"))


def drawn_prompts(world_dir: str, n_prompts: int, seed: int, tokenizer: Any,
                  prompts: str | None = None) -> tuple[list, list[list[int]]]:
    """`n_prompts` draws (`draw_prompts`, seeded) of the prompt records of `prompts` (default the
    world's training prompts) and their token ids (prompts cut to 128 tokens)."""
    from alignkit.data.load import load_records
    from alignkit.data.tokenize import TruncationLimits, tokenize_prompts

    records = load_records(prompts or str(Path(world_dir) / "train_prompts.jsonl"), kind="prompt").records
    drawn = [records[i] for i in draw_prompts(len(records), n_prompts, random.Random(seed))]
    items, _ = tokenize_prompts(tokenizer, drawn, TruncationLimits(max_prompt_len=128, max_len=None))
    return drawn, [it.prompt_ids for it in items]


def gold_judge(world_dir: str) -> Any:
    """The world's gold judge as a pairwise judge (`winrate.judge_factory`)."""
    from alignkit.eval import winrate
    from alignkit.world import load_world

    return winrate.judge_factory(winrate.Config(judge="gold", world=str(world_dir)), load_world(world_dir))()


def world_noise(world_dir: str | Path) -> float:
    """The label noise the world's preference pairs were written with (world.json)."""
    return float(_read_json(Path(world_dir) / "world.json").get("label_noise", 0.0))


# ---------------------------------------------------------------------------------- helpers
def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _stage_seeded(train_cfg: Any, k: int, resume: bool) -> Any:
    """Round k's stage settings: seed + k, in the round's own folder. A fresh iterate run starts
    the stage afresh (overwrite); a resumed one continues it from its newest checkpoint (a stage
    with none starts afresh), so a run killed inside a stage loses at most save_every steps."""
    return dataclasses.replace(train_cfg, seed=train_cfg.seed + k, overwrite=not resume, resume=resume)


def round_seed(cfg: Config, k: int) -> int:
    """Seed of round k's prompt draw and sampling."""
    return cfg.seed * 100003 + k


def draw_prompts(n_prompts: int, n: int, rng: random.Random) -> list[int]:
    """`n` prompt indices, sorted: every prompt n // n_prompts times, plus a draw without
    replacement of n % n_prompts more (n <= n_prompts: a plain draw of n distinct prompts)."""
    full, rest = divmod(n, n_prompts)
    return sorted([*range(n_prompts)] * full + rng.sample(range(n_prompts), rest))



def _win_rate(a: Sequence[float], b: Sequence[float]) -> dict:
    from alignkit.eval.winrate import win_rate_entry

    return win_rate_entry(a, b)


def _default_noise(cfg: Config) -> float:
    if cfg.label_noise is not None:
        return cfg.label_noise
    if cfg.judge == "gold" and cfg.world:
        return float(_read_json(Path(cfg.world) / "world.json").get("label_noise", 0.0))
    return 0.0


class _Run:
    """State of one iterate run: paths, data, the rows of the summary."""

    def __init__(self, cfg: Config, dist: Dist = SINGLE):
        from alignkit.data.load import load_records

        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.out)
        self.world = None
        if cfg.world:
            from alignkit.world import load_world

            self.world = load_world(cfg.world)
        w = Path(cfg.world) if cfg.world else None
        self.prompts_path = cfg.prompts or str(w / "train_prompts.jsonl")
        self.prefs_path = cfg.preferences or (str(w / "preferences.jsonl") if w else None)
        self.eval_prefs = cfg.eval_preferences or (str(w / "preferences_eval.jsonl") if w else None)
        self.label_noise = _default_noise(cfg)
        self.records = load_records(self.prompts_path, kind="prompt", on_error=cfg.ppo.data.on_error).records
        if not self.records:
            raise ValueError(f"{self.prompts_path}: no prompts")
        self.initial: list[dict] = []
        if self.prefs_path:
            pairs = load_records(self.prefs_path, kind="preference", on_error=cfg.reward.data.on_error,
                                 limit=cfg.initial_pairs).records
            self.initial = [pair_json(p) for p in pairs]
        self.eval_prompts: list = []
        if cfg.world:
            from alignkit.eval.gold import read_eval_prompts

            self.eval_prompts = read_eval_prompts(cfg.world, cfg.eval_limit)
        self.rows: list[dict] = []
        self.pending: dict = {}
        self.t0 = time.perf_counter()

    def dir(self, k: int) -> Path:
        return self.out / f"round_{k}"

    def save_summary(self, status: str, **extra: Any) -> None:
        from alignkit.config import to_dict

        summary = {"status": status, "rounds": self.rows, "label_noise": self.label_noise,
                   "initial_pairs": len(self.initial), "wall_s": time.perf_counter() - self.t0,
                   "config": to_dict(self.cfg), **extra}
        write_json_atomic(self.out / "summary.json", summary, indent=2, default=str)

    def judge(self, k: int) -> Any:
        from alignkit.eval import winrate

        wcfg = winrate.Config(judge=self.cfg.judge, world=self.cfg.world, out=str(self.dir(k)),
                              seed=round_seed(self.cfg, k), batch_size=self.cfg.generation_batch_size)
        return winrate.judge_factory(wcfg, self.world)

    # ---------------------------------------------------------------- evaluation
    def gold_eval(self, model_dir: str, k: int) -> dict:
        """Greedy answers of `model_dir` on the held-out prompts, judged; rows to round_k/eval_responses.jsonl."""
        from alignkit.eval import gold
        from alignkit.models.load import load_model, load_tokenizer

        if self.world is None:
            return {}
        gcfg = gold.Config(model=model_dir, world=self.cfg.world, max_new_tokens=self.cfg.eval_max_new_tokens,
                           seed=self.cfg.seed)
        scores, rows = gold.evaluate(load_model(model_dir), load_tokenizer(model_dir), self.world, self.eval_prompts, gcfg)
        gold.write_jsonl_atomic(self.dir(k) / "eval_responses.jsonl", rows)
        return {"gold_score": scores["gold_score"], "per_category": scores["per_category"], "eval_prompts": scores["n"]}

    def eval_scores(self, k: int) -> list[float]:
        return [r["score"] for r in read_jsonl(self.dir(k) / "eval_responses.jsonl")]

    def kl_to_start(self, model_dir: str) -> float | None:
        from alignkit.eval.gold import spread
        from alignkit.eval.policy_kl import sequence_kl
        from alignkit.models.load import load_model, load_tokenizer

        prompts = self.eval_prompts or [r.prompt for r in spread(self.records, self.cfg.eval_limit or 64)]
        return sequence_kl(load_model(model_dir), load_model(self.cfg.policy), load_tokenizer(model_dir), prompts,
                           self.cfg.eval_max_new_tokens, self.cfg.seed, self.cfg.generation_batch_size)

    def rm_eval(self, rm_dir: str, path: str | None) -> dict | None:
        """A reward model's metrics on the pairs of `path` (with gold agreement in the world)."""
        from alignkit.models.heads import load_reward_model
        from alignkit.models.load import load_tokenizer

        if not path:
            return None
        return reward_stage.evaluate_pairs(load_reward_model(rm_dir), load_tokenizer(rm_dir), self.cfg.reward.data,
                                           path, self.cfg.reward.eval_batch_size, self.cfg.world)

    def train_reward(self, k: int, init: str, data_path: Path) -> dict:
        """RM_k trained on `data_path` (collective: every rank runs the supervised loop)."""
        c = self.cfg.reward
        rcfg = dataclasses.replace(
            c, model=dataclasses.replace(c.model, path=init), train=_stage_seeded(c.train, k, self.cfg.resume),
            data=dataclasses.replace(c.data, path=str(data_path), eval_path=self.eval_prefs),
            world=self.cfg.world, out=str(self.dir(k) / "reward"),
        )
        return reward_stage.run(rcfg)

    # ---------------------------------------------------------------- across ranks
    def agree(self, value: Any) -> Any:
        """Rank 0's value on every rank (a decision all ranks must take together)."""
        return broadcast_object(value, self.dist)

    def once(self, path: Path, make: Any) -> dict:
        """The JSON result at `path`: when rank 0 has none yet, every rank runs `make()` (a
        collective stage) and rank 0 writes it; rank 0's copy is returned on every rank."""
        if not self.agree(path.is_file()):
            res = make()
            if self.dist.main:
                write_json_atomic(path, res, indent=2, default=str)
        return self.agree(_read_json(path) if self.dist.main else None)

    # ---------------------------------------------------------------- rounds
    def round_zero(self) -> dict | None:
        """Round 0's row on rank 0 (None elsewhere); RM_0 is trained on every rank when not given."""
        cfg, d, main = self.cfg, self.dir(0), self.dist.main
        d.mkdir(parents=True, exist_ok=True)
        row: dict[str, Any] = {"round": 0, "policy": cfg.policy, "pairs_new": 0, "pairs_total": len(self.initial)}
        if cfg.reward_model:
            row["reward_model"] = cfg.reward_model
            ev = self.rm_eval(cfg.reward_model, self.eval_prefs) if main else None
        else:
            data = d / "reward_data.jsonl"
            if main:
                _write_jsonl(data, self.initial)
            barrier(self.dist)
            res = self.train_reward(0, cfg.reward_base or cfg.policy, data)
            row["reward_model"] = res["model"]
            ev = res.get("eval")
        if not main:
            return None
        row.update(_rm_columns(ev))
        row.update(self.gold_eval(cfg.policy, 0))
        row["kl_to_start"] = 0.0
        return row

    def sample(self, k: int, prev: dict) -> list[dict]:
        """Round k's response pairs from policy_{k-1}: each rank samples its contiguous share of the
        drawn prompts (per-sample seeds: a pair does not depend on the rank that draws it), and
        the shares are gathered in prompt order on every rank. Collective."""
        from alignkit.data.tokenize import TruncationLimits, tokenize_prompts
        from alignkit.models.load import load_model, load_tokenizer

        cfg, seed = self.cfg, round_seed(self.cfg, k)
        idx = draw_prompts(len(self.records), cfg.prompts_per_round, random.Random(seed))
        lo, hi = share(len(idx), self.dist)
        mine: list[dict] = []
        if hi > lo:
            tok = load_tokenizer(prev["policy"])
            items, _ = tokenize_prompts(tok, [self.records[i] for i in idx[lo:hi]],
                                        TruncationLimits(max_prompt_len=cfg.ppo.data.max_prompt_len, max_len=None))
            pairs = sample_pairs(load_model(prev["policy"]), tok, [it.prompt_ids for it in items], cfg.max_new_tokens,
                                 cfg.temperature, seed, cfg.generation_batch_size, first_prompt=lo)
            mine = [{"index": i, "a": a, "b": b} for i, (a, b) in zip(idx[lo:hi], pairs)]
        return all_gather_list(mine, self.dist)

    def label(self, k: int, prev: dict) -> dict | None:
        """Rank 0: label round k's samples, write the pairs and the reward model's data; the row's
        pair columns, or None when human labels are pending (`self.pending`)."""
        from alignkit.feedback.judges import LabelsPending

        cfg, d, seed = self.cfg, self.dir(k), round_seed(self.cfg, k)
        pairs_path = d / "pairs.jsonl"
        if pairs_path.is_file():
            counts = _read_json(d / "label_counts.json")
        else:
            samples = read_jsonl(d / "samples.jsonl")
            try:
                rows, counts = label_pairs(
                    self.judge(k)(), [self.records[s["index"]] for s in samples], [(s["a"], s["b"]) for s in samples],
                    self.label_noise, random.Random(f"alignkit-iterate-noise:{seed}"), {"round": k, "judge": cfg.judge},
                )
            except LabelsPending as e:
                self.pending = {"round": k, "pairs_file": str(e.path), "n": e.n, "message": str(e)}
                return None
            write_json_atomic(d / "label_counts.json", counts, indent=2)  # before pairs.jsonl: it marks the step done
            _write_jsonl(pairs_path, rows)
        data = d / "reward_data.jsonl"
        new_rows = [r for j in range(1, k + 1) for r in read_jsonl(self.dir(j) / "pairs.jsonl")]
        if not data.is_file():
            _write_jsonl(data, self.initial + new_rows * cfg.new_pairs_repeat)
        row: dict[str, Any] = {"round": k, "pairs_sampled": counts["sampled"], "pairs_new": counts["pairs"],
                               "pairs_total": len(self.initial) + len(new_rows),
                               **{f"pairs_{x}": counts[x] for x in ("empty", "identical", "ties", "flipped")}}
        # how the previous reward model ranks the previous policy's own answers: what PPO exploited
        if counts["pairs"]:
            row["prev_rm_on_new_pairs"] = _rm_columns(self.rm_eval(prev["reward_model"], str(pairs_path)))
        return row

    def round(self, k: int, prev: dict) -> dict | None:
        """Round k from the previous round's row: the row on rank 0 (None on the others, and on
        every rank when human labels are pending: `self.pending`)."""
        cfg, d, main = self.cfg, self.dir(k), self.dist.main
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        samples_path = d / "samples.jsonl"
        if not self.agree(samples_path.is_file()):
            samples = self.sample(k, prev)
            if main:
                _write_jsonl(samples_path, samples)
        row = self.label(k, prev) if main else None
        self.pending = self.agree(self.pending)
        if self.pending:
            return None
        barrier(self.dist)  # reward_data.jsonl is written

        def reward() -> dict:
            init = prev["reward_model"] if cfg.reward_init == "previous" else (cfg.reward_base or cfg.policy)
            return self.train_reward(k, init, d / "reward_data.jsonl")

        res = self.once(d / "reward_result.json", reward)

        def ppo() -> dict:
            c = cfg.ppo
            pcfg = dataclasses.replace(
                c, model=dataclasses.replace(c.model, path=cfg.policy if cfg.ppo_init == "start" else prev["policy"]),
                data=dataclasses.replace(c.data, path=self.prompts_path),
                reward=dataclasses.replace(c.reward, source="model", model=res["model"]),
                train=_stage_seeded(c.train, k, self.cfg.resume), world=cfg.world, out=str(d / "ppo"),
                reference=cfg.policy if cfg.kl_reference == "start" else None,
            )
            return ppo_stage.run(pcfg)

        pres = self.once(d / "ppo_result.json", ppo)
        if not main:
            return None
        assert row is not None
        row["reward_model"] = res["model"]
        row.update(_rm_columns(res.get("eval")))
        row["policy"] = pres["model"]
        row.update({"ppo_kl": pres.get("kl"), "ppo_reward": pres.get("reward"), "ppo_gold_train": pres.get("gold_train")})

        row.update(self.gold_eval(row["policy"], k))
        if self.world is not None:
            mine = self.eval_scores(k)
            row["win_rate_vs_prev"] = _win_rate(mine, self.eval_scores(k - 1))
            row["win_rate_vs_start"] = _win_rate(mine, self.eval_scores(0))
        row["kl_to_start"] = self.kl_to_start(row["policy"])
        row["wall_s"] = time.perf_counter() - t0
        return row


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _rm_columns(ev: dict | None) -> dict:
    if not ev:
        return {}
    keys = {"accuracy": "rm_accuracy", "gold_agreement": "rm_gold_agreement", "ece": "rm_ece", "n_pairs": "rm_eval_pairs"}
    return {new: ev[old] for old, new in keys.items() if old in ev}




def _prepare_out(cfg: Config, main: bool = True) -> None:
    """Refuse (on every rank) or clear (rank 0) an earlier run in `out`."""
    out = Path(cfg.out)
    earlier = (out / "summary.json").is_file() or any(ROUND_DIR.fullmatch(p.name) for p in out.glob("round_*"))
    if earlier and cfg.overwrite:
        if main:
            for p in out.glob("round_*"):
                if ROUND_DIR.fullmatch(p.name) and p.is_dir():
                    shutil.rmtree(p)
            (out / "summary.json").unlink(missing_ok=True)
    elif earlier and not cfg.resume:
        raise ConfigError(f"{out} holds an earlier iterate run: set resume=true to continue it or overwrite=true to replace it")
    out.mkdir(parents=True, exist_ok=True)


def run(cfg: Config) -> dict:
    """Round 0, then `cfg.rounds` rounds of sample -> label -> reward model -> PPO; returns the summary.

    Under torchrun every rank runs this: the sampling, the reward model's training and PPO are
    split across the ranks (docs/distributed-rl.md); rank 0 labels, evaluates and writes. With
    launcher=ray the same ranks run as Ray actors (alignkit.train.ray_launch)."""
    _check(cfg)
    return run_here_or_on_ray(train, cfg)


def train(cfg: Config, reward: Any = None) -> dict:
    """This process's part of the run (`reward` is the Ray launcher's reward actor, always None here)."""
    _check(cfg)
    dist = init_dist()
    if cfg.ppo.rollout_batch % dist.world:
        raise ConfigError(f"config key 'ppo.rollout_batch' ({cfg.ppo.rollout_batch}) must be a multiple of the "
                          f"{dist.world} ranks")
    _prepare_out(cfg, dist.main)
    barrier(dist)
    r = _Run(cfg, dist)
    r.judge(1)  # a bad judge spec fails now, before any training
    for k in range(cfg.rounds + 1):
        done = r.dir(k) / "round.json"
        if r.agree(done.is_file()):
            r.rows.append(r.agree(_read_json(done) if dist.main else None))
            continue
        steps = "the starting reward model and policy" if k == 0 else \
            "sample pairs, label them, train the reward model, PPO"
        header("iterate", [f"round {k} of {cfg.rounds}: {steps}"], out=r.dir(k))
        row = r.agree(r.round_zero() if k == 0 else r.round(k, r.rows[-1]))
        if row is None:
            if dist.main:
                r.save_summary("awaiting_labels", pending=r.pending)
            barrier(dist)
            return {"status": "awaiting_labels", "out": str(r.out), **r.pending,
                    "next": "label the file, then run again with resume=true"}
        if dist.main:
            write_json_atomic(done, row, indent=2, default=str)
        r.rows.append(row)
        if dist.main:
            r.save_summary("running")
        header("iterate", [f"round {k} done", *(f"{name} {_short(row.get(key))}" for key, name in (
            ("gold_score", "gold"), ("rm_accuracy", "reward-model accuracy"), ("pairs_total", "pairs"),
            ("kl_to_start", "KL to start")) if row.get(key) is not None)])
    if dist.main:
        r.save_summary("done")
    barrier(dist)
    return {"status": "done", "out": str(r.out), "summary": str(r.out / "summary.json"),
            "rounds": [{k: row.get(k) for k in ("round", "gold_score", "rm_accuracy", "pairs_total", "kl_to_start")}
                       for row in r.rows]}
