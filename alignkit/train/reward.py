"""Stage 3a, the reward model: a scalar head on the SFT model, fitted with the Bradley-Terry loss.

One forward over the [chosen; rejected] stack, r = RewardModel(x, y) on the last real token,
loss = -log sigmoid(r_c - r_r [- margin]) (Ouyang et al. 2022, Eq. 1; see
alignkit.losses.reward), handed to the one training loop. After training, the mean and std of
the rewards of a sample of the training responses are stored with the model
(reward_stats.json) so PPO and evaluation normalise rewards the same way.

    alignkit reward --config configs/reward.yaml model.path=runs/sft/final \\
        data.path=runs/world/preferences.jsonl out=runs/reward
    alignkit reward eval model=runs/reward/final data.path=runs/world/preferences_eval.jsonl \\
        world=runs/world

Metrics (per logged step): loss, accuracy, margin (mean r_c - r_r), reward/mean, reward/min,
reward/max (over the chosen and rejected rows of the step; with several micro-batches, min and
max are averaged over them). docs/reward.md explains them.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig, required
from alignkit.console import is_main_process, warn
from alignkit.data.batching import PreferenceBatch, bucketed_batches, collate_preference, padding_fraction
from alignkit.data.lint import check_signal
from alignkit.data.load import load_records
from alignkit.data.packing import SharedPromptPairs, collate_shared_prompt, shared_prompt_is_cheaper
from alignkit.data.records import PreferencePair, prompt_text
from alignkit.data.tokenize import TokenizedPair, TruncationLimits, tokenize_preference
from alignkit.losses.reward import bradley_terry_loss, expected_calibration_error
from alignkit.models.heads import MODES, RewardModel, RewardStats, write_reward_dir
from alignkit.train.loop import StepOutput, train


@dataclass(frozen=True)
class Config:
    """Reward model training settings. Defaults reach >= 80% gold accuracy on the world in minutes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """`model.path`: the SFT (or base) model the reward model starts from (required)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_prompt_len=64, max_len=128))
    """`data.path`: preference pairs (required); `data.eval_path`: held-out pairs scored after training."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-3, batch_size=32, epochs=1, warmup_steps=10, log_every=25)
    )
    """Training loop settings."""
    mode: Literal["head", "full", "lora"] = "full"
    """What trains: the head only (backbone frozen), everything, or LoRA adapters + the head (needs model.lora_r > 0)."""
    backbone: Literal["auto", "causal_lm", "seq_cls"] = "auto"
    """How model.path is loaded: 'auto' picks seq_cls for a *ForSequenceClassification checkpoint."""
    use_margin: bool = True
    """Use the records' `margin` (Llama 2 margin loss) when they carry one."""
    use_soft_label: bool = True
    """Use the records' `soft_label` (cross-entropy against P(chosen better)) when they carry one."""
    center_coef: float = 0.0
    """Weight of the reward-centring term (r_c + r_r)^2 (Eisenstein et al. 2023 use 0.01)."""
    mismatched_pairs: float = 0.0
    """Extra training pairs, as a fraction of the data's pairs, whose rejected response is the chosen
    response of another prompt (`add_mismatched_pairs`): they teach the model to read the prompt. 0: none."""
    number_negatives: float = 0.0
    """Extra hard-negative pairs, as a fraction of the data's distinct (prompt, chosen) answers that hold
    a number: the chosen answer above itself with its last number changed (`add_number_negatives`). 0: none."""
    copy_negatives: float = 0.0
    """Extra hard-negative pairs, as a fraction of the data's distinct (prompt, chosen) answers that repeat
    a word of their prompt: the chosen answer above itself with its copies of that word altered (another
    answer's word, one copy more or less; `add_copy_negatives`). 0: none."""
    stats_pairs: int = 1000
    """Training pairs (both responses) scored after training for reward_stats.json (0: all)."""
    eval_batch_size: int = 64
    """Pairs per forward when scoring (statistics and held-out evaluation)."""
    share_prompt: bool = True
    """Train on each pair's prompt once (one row, tree attention mask) in batches where that is less work."""
    world: str | None = None
    """Optional world directory: adds agreement with the gold judge to the held-out evaluation."""
    out: str = "runs/reward"
    """Output directory; the reward model is saved to OUT/final."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"config key 'mode': expected one of {list(MODES)}, got {self.mode!r}")
        if self.mode == "lora" and self.model.lora_r <= 0:
            raise ConfigError(
                "config key 'model.lora_r' must be > 0 with mode 'lora' (for example model.lora_r=8)"
            )
        if self.mode != "lora" and self.model.lora_r > 0:
            raise ConfigError(
                f"config key 'model.lora_r' is {self.model.lora_r} but mode is '{self.mode}': set mode=lora or model.lora_r=0"
            )
        if self.center_coef < 0:
            raise ConfigError(f"config key 'center_coef' must be >= 0, got {self.center_coef}")
        if self.mismatched_pairs < 0:
            raise ConfigError(f"config key 'mismatched_pairs' must be >= 0, got {self.mismatched_pairs}")
        if self.number_negatives < 0:
            raise ConfigError(f"config key 'number_negatives' must be >= 0, got {self.number_negatives}")
        if self.copy_negatives < 0:
            raise ConfigError(f"config key 'copy_negatives' must be >= 0, got {self.copy_negatives}")
        if self.stats_pairs < 0 or self.eval_batch_size < 1:
            raise ConfigError(
                "config keys 'stats_pairs' (>= 0) and 'eval_batch_size' (>= 1) are out of range"
            )


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation of a trained reward model (`alignkit reward eval`)."""

    model: str = required()
    """A reward model directory (OUT/final of `alignkit reward`)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_prompt_len=64, max_len=128))
    """`data.path`: preference pairs with trusted labels (required)."""
    world: str | None = None
    """Optional world directory: adds agreement with the gold judge."""
    batch_size: int = 64
    """Pairs per forward."""
    out: str | None = None
    """JSON file to write; default beside the model folder: OUT/eval-<data file name>.json for OUT/final."""


@dataclass(frozen=True)
class MixConfig:
    """Fit `reward.ref_logprob_coef` on labelled pairs (`alignkit reward mix`, reward_mix.py)."""

    model: str = required()
    """The RL stage's `reward.model` (a reward model directory)."""
    ensemble: tuple[str, ...] = ()
    """The RL stage's `reward.ensemble` (more reward model directories)."""
    ensemble_mode: Literal["mean", "min", "uwo"] = "mean"
    """The RL stage's `reward.ensemble_mode`."""
    ensemble_coef: float = 1.0
    """The RL stage's `reward.ensemble_coef` (uwo only)."""
    reference: str = required()
    """The RL stage's reference model (its SFT policy, `model.path`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """`data.path`: preference pairs with trusted labels, ideally of the policy's own samples (required)."""
    out: str | None = None
    """JSON file to write (default: print only)."""


def run_mix(cfg: MixConfig) -> dict:
    """`alignkit reward mix`: the logistic fit of the reference log-prob feature's weight beside the
    reward ensemble's score, and how often each orders the pairs as labelled."""
    from alignkit.train.reward_mix import fit_ref_logprob_coef

    if not cfg.model or not cfg.reference:
        raise ConfigError("config keys 'model' (a reward model) and 'reference' (the SFT model) are required")
    if not cfg.data.path:
        raise ConfigError("config key 'data.path' is required (labelled preference pairs)")
    pairs = load_records(cfg.data.path, kind="preference", on_error=cfg.data.on_error, limit=cfg.data.limit).records
    result = fit_ref_logprob_coef([cfg.model, *cfg.ensemble], cfg.reference, pairs, cfg.ensemble_mode,
                                  cfg.ensemble_coef)
    result.update(data=str(cfg.data.path), reference=str(cfg.reference))
    if cfg.out:
        _write_json(Path(cfg.out), result)
    return result


def add_mismatched_pairs(
    pairs: Sequence[PreferencePair], fraction: float, seed: int, tries: int = 20
) -> list[PreferencePair]:
    """round(fraction * N) new pairs (prompt_i, chosen_i, rejected = chosen_j) with j a pair of
    another prompt whose chosen text is not chosen anywhere in the data for prompt_i: an answer to
    a different question ranked below this question's answer.

    Pairs that share a prompt always differ only in the answer, so a reward model trained on them
    alone may score answers without reading the prompt, and a policy then earns reward with a
    polished answer to another question (the word "bottle" in uppercase when asked for "apple").
    Anchors i are drawn without replacement while fraction <= 1 (with replacement above); a draw
    that finds no other pair in `tries` attempts is skipped. The assumption (the other answer is
    worse here) fails where answers are interchangeable (two refusals); docs/reward.md measures
    how often the world's gold judge agrees. Deterministic in `seed`.
    """
    n = len(pairs)
    want = round(fraction * n)
    if n < 2 or want == 0:
        return []
    chosen_for: dict = {}
    for p in pairs:
        chosen_for.setdefault(p.prompt, set()).add(p.chosen)
    rng = random.Random(seed)
    anchors = rng.sample(range(n), want) if want <= n else [rng.randrange(n) for _ in range(want)]
    out = []
    for i in anchors:
        a = pairs[i]
        for _ in range(tries):
            b = pairs[rng.randrange(n)]
            if b.prompt != a.prompt and b.chosen not in chosen_for[a.prompt]:
                out.append(PreferencePair(prompt=a.prompt, chosen=a.chosen, rejected=b.chosen, category=a.category))
                break
    return out


def _draw_anchors(n: int, fraction: float, rng: random.Random) -> list[int]:
    """round(fraction * n) indices of n anchors: without replacement while fraction <= 1."""
    want = round(fraction * n)
    return rng.sample(range(n), want) if want <= n else [rng.randrange(n) for _ in range(want)]


_INT = re.compile(r"(?<![\w.])\d+(?![\w])")


def add_number_negatives(pairs: Sequence[PreferencePair], fraction: float, seed: int) -> list[PreferencePair]:
    """Hard negatives of the right form with a wrong number: for round(fraction * M) of the M
    distinct (prompt, chosen) answers that hold an integer, a pair (prompt, chosen, chosen with its
    last integer v replaced by another value drawn from max(0, v - 3) .. v + 3).

    A reward model trained on the data's pairs learns form (a terse answer, a refusal, "idk") more
    than the number, because pairs that differ only in the number are rare; a policy's own samples
    differ mostly there (" It is 11." against " It is 12."). The assumption (the chosen answer's
    number is the right one) fails on mislabelled pairs; docs/reward.md measures how often the
    world's gold judge agrees. Deterministic in `seed`; anchors without replacement while
    fraction <= 1.
    """
    seen, anchors = set(), []
    for p in pairs:
        if (p.prompt, p.chosen) not in seen and _INT.search(p.chosen):
            seen.add((p.prompt, p.chosen))
            anchors.append(p)
    rng = random.Random(f"alignkit-number-negatives:{seed}")
    picks = _draw_anchors(len(anchors), fraction, rng)
    out = []
    for i in picks:
        a = anchors[i]
        m = list(_INT.finditer(a.chosen))[-1]
        v = int(m.group())
        wrong = rng.choice([x for x in range(max(0, v - 3), v + 4) if x != v])
        rejected = a.chosen[: m.start()] + str(wrong) + a.chosen[m.end():]
        out.append(PreferencePair(prompt=a.prompt, chosen=a.chosen, rejected=rejected, category=a.category))
    return out


_WORD = re.compile(r"[A-Za-z]{3,}")


def _copied_word(prompt: str, chosen: str, common: set[str]) -> str | None:
    """The prompt word (3+ letters, any case, not in `common`) that `chosen` repeats most, at least
    twice; None when the answer repeats no such word of its prompt."""
    counts: dict[str, int] = {}
    for w in _WORD.findall(chosen):
        counts[w.lower()] = counts.get(w.lower(), 0) + 1
    in_prompt = {w.lower() for w in _WORD.findall(prompt)} - common
    best = max(sorted(in_prompt), key=lambda w: counts.get(w, 0), default=None)
    return best if best is not None and counts.get(best, 0) >= 2 else None


def _common_words(prompts: set[str], share: float = 0.02) -> set[str]:
    """Words (lower case) in more than max(1, share x N) of the N distinct prompts: the template's
    and the language's own ("the", "what", "word", "times"), not a prompt's subject."""
    df: dict[str, int] = {}
    for p in prompts:
        for w in {x.lower() for x in _WORD.findall(p)}:
            df[w] = df.get(w, 0) + 1
    limit = max(1.0, share * len(prompts))
    return {w for w, n in df.items() if n > limit}


def _same_case(template: str, word: str) -> str:
    return word.upper() if template.isupper() else word.capitalize() if template[0].isupper() else word


def add_copy_negatives(pairs: Sequence[PreferencePair], fraction: float, seed: int) -> list[PreferencePair]:
    """Hard negatives of the right form with the wrong copy: for round(fraction * M) of the M
    distinct (prompt, chosen) answers that repeat a word of their prompt (`_copied_word`; words in more
    than 2% of the prompts do not count, `_common_words`: "Here is
    window two times: window window." for "Repeat the word window two times."), a pair (prompt,
    chosen, a miscopy of chosen, `_miscopy`: e.g. "Here is window two times: wagon wagon.", with
    another answer's copied word).

    The answer restates the instruction and then must carry it out on the prompt's own word; pairs
    in which only the carried-out copy is wrong are rare in template data, while a policy's samples
    (and PPO's drift) change exactly that. The assumption (the chosen answer's copy is the right
    one) fails on mislabelled pairs; docs/reward.md measures how often the world's gold judge
    agrees. Deterministic in `seed`; anchors without replacement while fraction <= 1.
    """
    if fraction <= 0:
        return []
    seen, anchors = set(), []
    common = _common_words({prompt_text(p.prompt) for p in pairs})
    for p in pairs:
        if (p.prompt, p.chosen) in seen:
            continue
        seen.add((p.prompt, p.chosen))
        w = _copied_word(prompt_text(p.prompt), p.chosen, common)
        if w is not None:
            anchors.append((p, w))
    pool = sorted({w for _, w in anchors})
    if len(pool) < 2:
        return []
    rng = random.Random(f"alignkit-copy-negatives:{seed}")
    picks = _draw_anchors(len(anchors), fraction, rng)
    out = []
    for i in picks:
        a, w = anchors[i]
        rejected = _miscopy(a.chosen, w, rng.choice([x for x in pool if x != w]), rng)
        out.append(PreferencePair(prompt=a.prompt, chosen=a.chosen, rejected=rejected, category=a.category))
    return out


_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _miscopy(text: str, w: str, other: str, rng: random.Random) -> str:
    """`text` with its copies of `w` altered one of four ways (drawn among those that apply): the
    repeats after the first become `other` ("rest"), every copy becomes `other` ("all"), the
    longest run of consecutive copies ("w w w") gains or loses one copy ("run"), or that, and the
    number word that states the run's length ("three") says the new length ("count")."""
    hits = [m for m in _WORD.finditer(text) if m.group().lower() == w]
    runs = list(re.finditer(rf"\b({re.escape(hits[0].group())})(?: \1\b)+", text)) if hits else []
    run = max(runs, key=lambda m: len(m.group())) if runs else None
    k = len(run.group().split(" ")) if run else 0  # two copies or more
    said = _NUMBER_WORDS[k - 1] if 2 <= k <= len(_NUMBER_WORDS) else None
    said = said if said and re.search(rf"\b{said}\b", text, re.IGNORECASE) else None
    mode = rng.choice(["rest", "all"] + (["run"] if run else []) + (["count"] if said else []))
    if mode in ("run", "count") and run:
        longer = rng.random() < 0.5 and k < len(_NUMBER_WORDS)
        words = run.group().split(" ")
        words = words + words[:1] if longer else words[:-1]
        text = text[: run.start()] + " ".join(words) + text[run.end():]
        if mode == "count" and said:
            now = _NUMBER_WORDS[len(words) - 1]
            text = re.sub(rf"\b{said}\b", lambda m: _same_case(m.group(), now), text, flags=re.IGNORECASE)
        return text
    for m in reversed(hits if mode == "all" else hits[1:]):
        text = text[: m.start()] + _same_case(m.group(), other) + text[m.end():]
    return text


def reward_step(
    model: torch.nn.Module,
    batch: PreferenceBatch,
    use_margin: bool = True,
    use_soft_label: bool = True,
    center_coef: float = 0.0,
) -> StepOutput:
    """Bradley-Terry loss of one [chosen; rejected] micro-batch (two rows per pair, or one with its
    prompt once: `SharedPromptPairs`): the per-pair SUM and the pair count."""
    shared = isinstance(batch, SharedPromptPairs)
    if shared:
        rewards = model(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids,
                        last_index=batch.last_index)  # (2B,)
    else:
        rewards = model(batch.input_ids, batch.attention_mask)  # (2B,)
    r_c, r_r = batch.split(rewards)  # (B,), (B,)
    out = bradley_terry_loss(
        r_c,
        r_r,
        margin=batch.margin if use_margin else None,
        soft_label=batch.soft_label if use_soft_label else None,
        center_coef=center_coef,
    )
    r = rewards.detach().float()
    acc, margin, mean, lo, hi, ntok = torch.stack(
        [
            out.accuracy.mean(),
            out.margin.mean(),
            r.mean(),
            r.min(),
            r.max(),
            torch.tensor(float(batch.tokens)) if shared else batch.attention_mask.sum().float(),
        ]
    ).tolist()
    metrics = {"accuracy": acc, "margin": margin, "reward/mean": mean, "reward/min": lo, "reward/max": hi}
    return StepOutput(loss=out.losses.sum(), weight=r_c.shape[0], metrics={**metrics, "ntokens": ntok})


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module, items: Sequence[TokenizedPair], pad_id: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) rewards of the chosen and of the rejected responses, in the order of `items`.

    Pairs go through in length-sorted batches (little padding); the model is left in eval mode.
    """
    model.eval()
    device = next(model.parameters()).device
    r_c = torch.empty(len(items), dtype=torch.float32)
    r_r = torch.empty(len(items), dtype=torch.float32)
    lengths = [len(x) for x in items]
    for idx in bucketed_batches(lengths, batch_size, seed=0, epoch=0, shuffle=False):
        batch = collate_preference([items[i] for i in idx], pad_id)
        rewards = model(batch.input_ids.to(device), batch.attention_mask.to(device)).float().cpu()
        c, r = batch.split(rewards)
        index = torch.tensor(idx)
        r_c[index], r_r[index] = c, r
    return r_c, r_r


def preference_metrics(
    r_c: torch.Tensor, r_r: torch.Tensor, soft_label: torch.Tensor | None = None, n_bins: int = 10
) -> dict[str, float]:
    """Held-out metrics of (N,) chosen / rejected rewards.

    accuracy and loss as in `bradley_terry_loss` (soft labels respected); margin = mean r_c - r_r;
    ece = expected calibration error of P = sigmoid(r_a - r_b) over BOTH orders of every pair
    (labels p and 1 - p, p = soft label or 1), so the labelled winner is not always "a".
    """
    out = bradley_terry_loss(r_c, r_r, soft_label=soft_label)
    d = r_c - r_r
    p = torch.ones_like(d) if soft_label is None else soft_label.to(d.dtype)
    probs = torch.cat([torch.sigmoid(d), torch.sigmoid(-d)])
    labels = torch.cat([p, 1.0 - p])
    rewards = torch.cat([r_c, r_r])
    return {
        "n_pairs": int(d.numel()),
        "accuracy": float(out.accuracy.mean()),
        "loss": float(out.losses.mean()),
        "margin": float(d.mean()),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
    }


def gold_metrics(
    world, pairs: Sequence[PreferencePair], r_c: torch.Tensor, r_r: torch.Tensor
) -> dict[str, float]:
    """Agreement with the world's gold judge.

    gold_agreement: fraction of pairs (gold ties left out) where the reward model and the gold
    judge pick the same winner. label_gold_agreement: the same for the data's labels (1 - the
    label noise). gold_pearson: correlation of rewards with gold scores over all responses.
    """
    g_c = torch.tensor([world.score(p.prompt, p.chosen) for p in pairs], dtype=torch.float64)
    g_r = torch.tensor([world.score(p.prompt, p.rejected) for p in pairs], dtype=torch.float64)
    gd = g_c - g_r
    decided = gd != 0
    n = int(decided.sum())
    rd = (r_c - r_r).double()
    agree = ((rd > 0) == (gd > 0))[decided].double()
    g = torch.cat([g_c, g_r])
    r = torch.cat([r_c, r_r]).double()
    pearson = float(torch.corrcoef(torch.stack([g, r]))[0, 1]) if g.std() > 0 and r.std() > 0 else 0.0
    return {
        "gold_pairs": n,
        "gold_agreement": float(agree.mean()) if n else float("nan"),
        "label_gold_agreement": float((gd[decided] > 0).double().mean()) if n else float("nan"),
        "gold_pearson": pearson,
    }


def _tokenize_aligned(tokenizer, pairs: Sequence[PreferencePair], limits: TruncationLimits):
    """Tokenise pairs, keeping the records that survive next to their items."""
    kept_pairs, items = [], []
    for p in pairs:
        toks, _ = tokenize_preference(tokenizer, [p], limits)
        if toks:
            kept_pairs.append(p)
            items.append(toks[0])
    return kept_pairs, items


def _soft_labels(items: Sequence[TokenizedPair]) -> torch.Tensor | None:
    if all(x.soft_label is None for x in items):
        return None
    return torch.tensor([1.0 if x.soft_label is None else x.soft_label for x in items])


def evaluate_pairs(
    model: RewardModel,
    tokenizer,
    data: DataConfig,
    path: str,
    batch_size: int = 64,
    world_dir: str | None = None,
) -> dict:
    """Score the pairs of `path` with `model` and return `preference_metrics` (+ `gold_metrics`)."""
    loaded = load_records(path, kind="preference", on_error=data.on_error, limit=data.limit)
    limits = TruncationLimits(max_prompt_len=data.max_prompt_len, max_len=data.max_len)
    pairs, items = _tokenize_aligned(tokenizer, loaded.records, limits)
    if not items:
        raise ValueError(f"{path}: no preference pair left to evaluate after tokenisation")
    r_c, r_r = score_pairs(model, items, tokenizer.pad_token_id, batch_size)
    result = {"data": str(path), "skipped": len(loaded.skipped), "dropped": len(loaded.records) - len(items)}
    result.update(preference_metrics(r_c, r_r, _soft_labels(items)))
    cats = sorted({p.category for p in pairs if p.category})
    if cats:
        right = (r_c > r_r).double()
        result["accuracy_by_category"] = {
            c: float(right[torch.tensor([p.category == c for p in pairs])].mean()) for c in cats
        }
    if world_dir:
        from alignkit.world import load_world

        result.update(gold_metrics(load_world(world_dir), pairs, r_c, r_r))
    return result


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def make_collate(pad_id: int, share_prompt: tuple[int, int] | None = None):
    """Pairs -> a `PreferenceBatch`, or with `share_prompt` = (hidden, intermediate size) of the
    backbone a `SharedPromptPairs` where that is less arithmetic (`shared_prompt_is_cheaper`)."""

    def collate(items: list[TokenizedPair]) -> PreferenceBatch | SharedPromptPairs:
        if share_prompt is not None and shared_prompt_is_cheaper(items, *share_prompt):
            return collate_shared_prompt(items, pad_id)
        return collate_preference(items, pad_id)

    return collate


def sharing_prompts(model: RewardModel, share_prompt: bool = True) -> tuple[int, int] | None:
    """(hidden, intermediate size) of a decoder backbone whose attention takes a custom mask, or None."""
    from alignkit.models.chunked import supports_custom_mask

    if not share_prompt or model.pooling != "last" or not supports_custom_mask(model.backbone):
        return None
    conf = model.backbone.config
    hidden = int(getattr(conf, "hidden_size", 0) or 0)
    return (hidden, int(getattr(conf, "intermediate_size", None) or 4 * hidden)) if hidden > 0 else None


def run(cfg: Config) -> dict:
    """Train a reward model; returns a summary (the model is at OUT/final)."""
    from alignkit.models.load import load_tokenizer

    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is required (the SFT model directory)")
    if not cfg.data.path:
        raise ConfigError("config key 'data.path' is required (the preference data file)")
    out = Path(cfg.out)
    loaded = load_records(cfg.data.path, kind="preference", on_error=cfg.data.on_error, limit=cfg.data.limit)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer of {cfg.model.tokenizer or cfg.model.path} has no pad or eos token")
    limits = TruncationLimits(max_prompt_len=cfg.data.max_prompt_len, max_len=cfg.data.max_len)
    items, trunc = tokenize_preference(tokenizer, loaded.records, limits)
    warn(trunc.warnings(limits, cfg.data.path))
    signal = check_signal(loaded.records, cfg.data.path, cfg.data.max_no_signal)
    if signal:
        warn(signal)
    if not items:
        raise ValueError(f"{cfg.data.path}: no preference pair left after tokenisation")
    n_data = len(items)  # reward_stats.json describes the data's own responses
    extra = add_mismatched_pairs(loaded.records, cfg.mismatched_pairs, cfg.train.seed)
    if extra:
        items = items + tokenize_preference(tokenizer, extra, limits)[0]
        warn(f"mismatched_pairs={cfg.mismatched_pairs} adds {len(extra)} synthetic pairs (a prompt's chosen "
             f"answer above another prompt's) to the {n_data} pairs of {cfg.data.path}; "
             "set mismatched_pairs=0 to train on the data alone")
    negatives = add_number_negatives(loaded.records, cfg.number_negatives, cfg.train.seed)
    if negatives:
        items = items + tokenize_preference(tokenizer, negatives, limits)[0]
        warn(f"number_negatives={cfg.number_negatives} adds {len(negatives)} hard negatives (a chosen answer "
             "above itself with another number) to the data's pairs")
    copies = add_copy_negatives(loaded.records, cfg.copy_negatives, cfg.train.seed)
    if copies:
        items = items + tokenize_preference(tokenizer, copies, limits)[0]
        warn(f"copy_negatives={cfg.copy_negatives} adds {len(copies)} hard negatives (a chosen answer above "
             "itself with the word it copies from the prompt replaced) to the data's pairs")

    torch.manual_seed(cfg.train.seed)
    model = RewardModel.from_pretrained(
        cfg.model.path, mode=cfg.mode, backbone=cfg.backbone, lora=cfg.model, seed=cfg.train.seed
    )
    pad_id = tokenizer.pad_token_id
    lengths = [len(x) for x in items]

    def plan(epoch: int) -> list[list[int]]:
        return bucketed_batches(lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch)

    def step(m: torch.nn.Module, batch: PreferenceBatch) -> StepOutput:
        return reward_step(m, batch, cfg.use_margin, cfg.use_soft_label, cfg.center_coef)

    n_ref = n_data if cfg.stats_pairs == 0 else min(cfg.stats_pairs, n_data)
    ref = [items[i] for i in sorted(random.Random(cfg.train.seed).sample(range(n_data), n_ref))]
    stats_box: list[RewardStats] = []

    def save_fn(m: RewardModel, d: Path) -> None:
        r_c, r_r = score_pairs(m, ref, pad_id, cfg.eval_batch_size)
        stats = RewardStats.of(torch.cat([r_c, r_r]))
        stats_box.append(stats)
        write_reward_dir(m, tokenizer, d, stats, extra={"base_model": str(cfg.model.path)})

    result = train(
        model,
        step,
        items,
        make_collate(pad_id, sharing_prompts(model, cfg.share_prompt)),
        plan,
        cfg.train,
        out,
        save_fn=save_fn,
        trainable_params=model.trainable_parameters(),
        weight_fn=lambda b: float(b.num_pairs),
        name="reward",
    )
    summary = {
        "model": str(result.final_dir),
        "mode": cfg.mode,
        "records": len(loaded.records),
        "mismatched_pairs": len(items) - n_data - len(negatives) - len(copies),
        "number_negatives": len(negatives),
        "copy_negatives": len(copies),
        "skipped": len(loaded.skipped),
        "format": loaded.format,
        "truncation": trunc.report(),
        "padding_fraction": padding_fraction(lengths, plan(0)),
        "final_loss": result.metrics.get("loss"),
        "final_accuracy": result.metrics.get("accuracy"),
        "steps": result.step,
        "wall_s": result.wall_time_s,
        "peak_mem_mb": result.peak_memory_mb,
        "reward_stats": stats_box[-1].__dict__ if stats_box else None,
    }
    if cfg.data.eval_path and is_main_process():  # under torchrun rank 0 evaluates and writes
        ev = evaluate_pairs(model, tokenizer, cfg.data, cfg.data.eval_path, cfg.eval_batch_size, cfg.world)
        _write_json(out / "eval.json", ev)
        summary["eval"] = ev
    return summary


def run_eval(cfg: EvalConfig) -> dict:
    """`alignkit reward eval`: held-out accuracy, margin, ECE (+ gold agreement), written to JSON."""
    from alignkit.models.heads import load_reward_model
    from alignkit.models.load import load_tokenizer

    if not cfg.model:
        raise ConfigError("config key 'model' is required (a reward model directory)")
    if not cfg.data.path:
        raise ConfigError("config key 'data.path' is required (held-out preference pairs)")
    model = load_reward_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    result = evaluate_pairs(model, tokenizer, cfg.data, cfg.data.path, cfg.batch_size, cfg.world)
    result["model"] = str(cfg.model)
    # beside the model folder, never inside it: OUT/final is a model that others load as it is
    model_dir = Path(cfg.model).resolve()
    out = (
        Path(cfg.out) if cfg.out
        else model_dir.parent / f"{'' if model_dir.name == 'final' else model_dir.name + '-'}"
                                f"eval-{Path(cfg.data.path).name.split('.')[0]}.json"
    )
    _write_json(out, result)
    result["out"] = str(out)
    return result


evaluate = run_eval
