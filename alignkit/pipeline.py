"""The demo pipeline on the built-in world.

    world -> tokenizer + pre-training (base) -> SFT -> reward models (+ the SFT model's own
    gold-labelled answers) -> DPO -> PPO -> over-optimised PPO -> iterate round 2 (ppo_r2) -> GRPO -> Constitutional AI (SL-CAI, RL-CAI) -> report

Each stage reads its preset from configs/, runs in this process (with `jobs` > 1, in a worker
process of its own, several at once where STAGES' graph allows: alignkit/demo_jobs.py), and adds
an entry to OUT/summary.json (`{"stages": {"base": {...}, "sft": {...}, ...}}`); report.md and
report.html are re-rendered after every stage, so a run stopped half-way still leaves a readable
report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from alignkit.config import load_config
from alignkit.memory import PeakMemory

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# --quick: small enough for the test suite
QUICK = {
    "pretrain": ["train.max_steps=60", "vocab_size=512", "model.preset=nano", "train.log_every=20"],
    "sft": ["train.max_steps=40", "train.log_every=20"],
    "eval": ["limit=48", "max_new_tokens=24"],
    "reward": ["train.max_steps=30", "train.log_every=10"],
    "dpo": ["train.max_steps=20", "train.log_every=10"],
    "ppo": ["iterations=3", "rollout_batch=16"],
    "grpo": ["iterations=3", "prompts_per_step=4", "group_size=4"],
}


# PPO against the learned reward models: configs/ppo.yaml (tuned on the gold judge) with a smaller
# learning rate; the reward models' mismatched pairs (configs/reward.yaml) keep them from paying for
# answers to other questions, and PPO scores with the mean of REWARD_ENSEMBLE of them (docs/ppo.md)
# reward.ref_logprob_coef: the SFT model's mean per-token log-prob of each answer as a second reward
# feature beside the ensemble (docs/reward.md, "The reference's likelihood as a reward feature")
PPO_RM = ["iterations=40", "kl_coef=0.05", "train.lr=5e-5", "rollout_batch=64", "reward.ref_logprob_coef=6"]
# Reward models trained for PPO (seeds seed, seed+1, ...): PPO scores with their mean (docs/ppo.md)
REWARD_ENSEMBLE = 3
# The SFT model's own answers, gold-labelled with the world's label noise (the stand-in for people,
# as InstructGPT's labellers compared their SFT model's samples), join the reward models' data:
# ONPOLICY_PROMPTS draws of the training prompts (three passes over the world's 733), two samples
# each; ties and identical pairs are dropped (docs/reward.md, "The SFT model's own answers")
ONPOLICY_PROMPTS = 2199
# The deliberate over-optimisation run: the same reward model, a tiny KL penalty and many more
# steps, so the proxy keeps rising while the gold score turns down (Gao et al. 2022)
# Iterate round 2 (stage ppo_r2): PPO from the round-1 policy against reward models retrained with
# the round-1 policy's own gold-labelled answers; fewer iterations, the KL still to the SFT model
PPO_ROUND2 = ["iterations=20", "kl_coef=0.05", "train.lr=5e-5", "rollout_batch=64"]
PPO_OVEROPT = ["iterations=150", "kl_coef=0.002", "train.lr=1e-4", "rollout_batch=32"]


def _preset(name: str) -> Path:
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


class Demo:
    """State shared by the demo's stages: the world, the eval prompts, the summary."""

    def __init__(self, out: Path, quick: bool, seed: int, world_dir: str | Path | None = None,
                 eval_overrides: Sequence[str] = ()):
        """world_dir: an existing world to use (`alignkit compare`); None writes one to OUT/world.
        eval_overrides: extra keys for the gold evaluation's config (e.g. `limit=50`)."""
        from alignkit.eval import gold
        from alignkit.world import load_world, write_world

        self.out, self.quick, self.seed = out, quick, seed
        self.persist = True  # False in a `--jobs` worker: the main process writes summary.json
        out.mkdir(parents=True, exist_ok=True)
        self.summary: dict = {
            "seed": seed,
            "quick": quick,
            "machine": machine(),
            "stages": {},
            "report": str(out / "report.md"),
        }
        if world_dir is not None:
            self.world_dir = Path(world_dir)
            self.summary["world"] = {"dir": str(self.world_dir)}
        else:
            self.world_dir = out / "world"
            start = time.perf_counter()
            info = write_world(self.world_dir, seed=seed, n_pairs=2000 if quick else 10000)
            self.summary["world"] = {"dir": str(self.world_dir), "wall_s": time.perf_counter() - start,
                                     "counts": info.get("counts", {})}
        self.world = load_world(self.world_dir)
        self.eval_cfg = load_config(gold.Config, _preset("eval"), [f"model={out}", f"world={self.world_dir}"]
                                    + self.q("eval") + list(eval_overrides))
        self.prompts = gold.read_eval_prompts(self.world_dir, self.eval_cfg.limit)  # every category keeps its share
        self.scores: dict[str, list[float]] = {}  # stage -> per-prompt gold score, for win rates

    def q(self, stage: str) -> list[str]:
        return QUICK.get(stage, []) if self.quick else []

    def config(self, module, preset: str, overrides: list[str]):
        return load_config(module.Config, _preset(preset),
                           overrides + [f"train.seed={self.seed}", "train.overwrite=true"] + self.q(preset))

    def save(self) -> None:
        from alignkit.eval.gold import write_text_atomic
        from alignkit.eval.report import write_reports

        if not self.persist:
            return
        write_text_atomic(self.out / "summary.json", json.dumps(self.summary, indent=2, default=str))
        write_reports(self.out, self.summary)

    def run_stage(self, name: str, fn: Callable[[], dict]) -> dict:
        """Run a training stage, timing it and measuring its peak memory."""
        start = time.perf_counter()
        with PeakMemory() as mem:
            result = fn()
        entry = {"wall_s": time.perf_counter() - start, "peak_mem_mb": mem.peak_mb, "dir": name,
                 "threads": torch.get_num_threads()}
        if isinstance(result, dict) and result.get("final_loss") is not None:
            entry["train_loss"] = result["final_loss"]
        self.summary["stages"][name] = entry
        return result

    def evaluate(self, name: str, model_dir: str | Path, kl_to_sft: bool = True) -> None:
        """Gold score of a model on the held-out prompts, its win rate and KL against SFT."""
        from alignkit.eval import gold
        from alignkit.eval.winrate import win_rate_entry
        from alignkit.models.load import load_model, load_tokenizer

        model_dir = Path(model_dir)
        model, tok = load_model(model_dir), load_tokenizer(model_dir)
        scores, rows = gold.evaluate(model, tok, self.world, self.prompts, self.eval_cfg)
        gold.write_jsonl_atomic(self.out / name / "eval_responses.jsonl", rows)
        self.scores[name] = [r["score"] for r in rows]
        entry = self.summary["stages"].setdefault(name, {"dir": name})
        entry.update(scores)
        entry["model"] = str(model_dir)
        if name != "sft" and "sft" in self.scores:
            entry["win_rate_vs_sft"] = win_rate_entry(self.scores[name], self.scores["sft"])
            if kl_to_sft:
                from alignkit.eval.policy_kl import sequence_kl

                ref = load_model(self.summary["stages"]["sft"]["model"])
                entry["kl"] = sequence_kl(model, ref, tok, self.prompts, self.eval_cfg.max_new_tokens, self.seed)
        elif name == "sft":
            entry["kl"] = 0.0
        self.save()


def machine() -> str:
    """The CPU, the cores and the threads torch uses: figures depend on all three."""
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
            + (", CUDA" if torch.cuda.is_available() else ""))


def demo_seeds(out: str | Path, seeds: Sequence[int], quick: bool = False, round2: bool = False,
               jobs: int = 1) -> dict:
    """The demo once per seed on one world (written with the first seed) into OUT/seed-S, and the
    means, spreads and per-seed figures in OUT/summary.json and OUT/report.{md,html}; the summary
    is rewritten after every seed, so a stopped run still reports the seeds it finished.
    jobs > 1: the stages of all seeds share `jobs` workers (demo_jobs.run_parallel)."""
    from alignkit.eval.seeds import aggregate, write_seed_reports
    from alignkit.world import write_world

    out = Path(out)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct seeds, got {list(seeds)}")
    start = time.perf_counter()
    world_dir = out / "world"
    write_world(world_dir, seed=seeds[0], n_pairs=2000 if quick else 10000)
    runs: dict[int, dict] = {}
    summary: dict = {}

    def finished(s: int, run: dict) -> None:
        nonlocal summary
        runs[s] = run
        ordered = {k: runs[k] for k in seeds if k in runs}
        summary = {**aggregate(ordered), "world_seed": seeds[0], "quick": quick, "machine": machine(), "jobs": jobs,
                   "wall_s": time.perf_counter() - start, "report": str(out / "report.md")}
        write_seed_reports(out, summary)

    if jobs == 1:
        for s in seeds:
            finished(s, demo(out / f"seed-{s}", quick, s, world_dir=world_dir, round2=round2))
    else:
        from alignkit.demo_jobs import run_parallel

        demos = [Demo(out / f"seed-{s}", quick, s, world_dir=world_dir) for s in seeds]
        for d in demos:
            d.summary["jobs"] = jobs
        run_parallel(demos, jobs, round2, on_demo_done=lambda d: finished(d.seed, d.summary))
    return summary


def reward_data(d: Demo, sft_model: str, n_prompts: int | None = None) -> tuple[Path, dict]:
    """The reward models' training pairs: the world's preferences.jsonl plus pairs of the SFT
    model's own answers labelled by the gold judge with the world's label noise
    (`iterate.label_policy_samples`), written to OUT/reward_data.jsonl. Returns the file and the
    labelling counts (with the new pairs per category)."""
    from collections import Counter

    from alignkit.atomic import write_text_atomic
    from alignkit.data.load import load_records
    from alignkit.train.iterate import label_policy_samples, pair_json

    n = (64 if d.quick else ONPOLICY_PROMPTS) if n_prompts is None else n_prompts
    rows, counts = label_policy_samples(sft_model, str(d.world_dir), n, d.seed) if n else ([], {"pairs": 0})
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected", "category") if k in r} for r in rows]
    base = [pair_json(p) for p in load_records(d.world_dir / "preferences.jsonl", kind="preference").records]
    path = d.out / "reward_data.jsonl"
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in base + rows))
    return path, {**counts, "by_category": dict(Counter(r.get("category") for r in rows))}


def train_reward_ensemble(d: Demo, init_model: str, data_path: str | Path, name: str, lr: float | None = None,
                          member_inits: Sequence[str] = ()) -> dict:
    """REWARD_ENSEMBLE reward models of configs/reward.yaml from `init_model` on `data_path`, with
    seeds d.seed, d.seed + 1, ... in OUT/NAME, OUT/NAME_2, ...: the first model's summary with the
    others' under "members". member_inits: the other members' starting models (default
    `init_model`); lr: the learning rate (default the preset's)."""
    from alignkit.train import reward

    w = d.world_dir
    cfg = d.config(reward, "reward", [
        f"model.path={init_model}", f"data.path={data_path}", f"data.eval_path={w / 'preferences_eval.jsonl'}",
        f"world={w}", f"out={d.out / name}", *([f"train.lr={lr}"] if lr is not None else [])])
    first = reward.run(cfg)
    inits = list(member_inits) or [init_model] * (REWARD_ENSEMBLE - 1)
    members = [reward.run(dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, seed=d.seed + k), out=str(d.out / f"{name}_{k + 1}"),
        model=dataclasses.replace(cfg.model, path=inits[k - 1])))
        for k in range(1, REWARD_ENSEMBLE)]
    return {**first, "members": members}


@dataclasses.dataclass(frozen=True)
class Round2:
    """How the demo's iterate round 2 (stage `ppo_r2`) collects pairs, trains its reward models and
    runs PPO (docs/ppo.md, "Iterate round 2 in the demo": the experiments behind the defaults)."""

    pairs: str = "policy"
    """'policy': two samples of the round-1 policy per prompt; 'cross': one sample of the round-1
    policy against one of the SFT model, twice per prompt (the drift from SFT is what is labelled)."""
    reward_init: str = "sft"
    """'sft': the reward models are trained afresh from the SFT model on all the data so far;
    'round1': each continues from its round-1 counterpart on the new pairs plus `replay` old ones."""
    replay: int = 2000
    """Old reward-data pairs (a seeded draw) trained on again beside the new ones (reward_init='round1')."""
    reward_lr: float = 1e-4
    """Learning rate of the continued reward models (reward_init='round1'; afresh: configs/reward.yaml)."""
    ppo_init: str = "round1"
    """Round 2's PPO starts from the round-1 policy ('round1') or from the SFT model ('sft'); its KL
    is to the SFT model either way."""
    ppo: tuple[str, ...] = tuple(PPO_ROUND2)
    """PPO overrides of round 2 (configs/ppo.yaml plus these)."""

    def __post_init__(self):
        for key, allowed in (("pairs", ("policy", "cross")), ("reward_init", ("sft", "round1")),
                             ("ppo_init", ("round1", "sft"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"Round2.{key}: expected one of {allowed}, got {getattr(self, key)!r}")


def round2_pairs(d: Demo, sft_model: str, policy: str, opts: Round2) -> tuple[list[dict], dict]:
    """Round 2's new gold-labelled pairs (prompt, chosen, rejected, category) and their counts:
    ONPOLICY_PROMPTS draws of the training prompts sampled by the round-1 policy (opts.pairs)."""
    from alignkit.train.iterate import label_policy_samples

    n = 64 if d.quick else ONPOLICY_PROMPTS
    if opts.pairs == "policy":
        rows, counts = label_policy_samples(policy, str(d.world_dir), n, d.seed + 1)
    else:
        rows, counts = label_cross_samples(policy, sft_model, str(d.world_dir), n, d.seed + 1)
    keep = ("prompt", "chosen", "rejected", "category")
    return [{k: r[k] for k in keep if k in r} for r in rows], counts


def label_cross_samples(policy: str, other: str, world_dir: str, n_prompts: int, seed: int) -> tuple[list[dict], dict]:
    """Gold-labelled pairs (world label noise) of `policy`'s answers against `other`'s: the prompts
    of `label_policy_samples` (n_prompts draws), two samples of each model per prompt, paired
    first with first and second with second."""
    import random

    from alignkit.models.load import load_model, load_tokenizer
    from alignkit.train.iterate import drawn_prompts, gold_judge, label_pairs, sample_pairs, world_noise

    tok = load_tokenizer(policy)
    drawn, ids = drawn_prompts(world_dir, n_prompts, seed, tok)
    mine, theirs = (sample_pairs(load_model(m), tok, ids, 24, 1.0, seed) for m in (policy, other))
    samples = [(a[j], b[j]) for j in (0, 1) for a, b in zip(mine, theirs)]
    return label_pairs(gold_judge(world_dir), drawn * 2, samples, world_noise(world_dir),
                       random.Random(f"alignkit-cross-noise:{seed}"))


def round2_reward_data(d: Demo, data_path: str | Path, rows: list[dict], opts: Round2) -> Path:
    """OUT/reward_data_r2.jsonl: all of `data_path` plus the new pairs (reward_init='sft'), or the new
    pairs plus `opts.replay` old pairs drawn with d.seed (reward_init='round1')."""
    import random

    from alignkit.atomic import write_text_atomic

    old = [line for line in Path(data_path).read_text().splitlines() if line.strip()]
    if opts.reward_init == "round1":
        old = random.Random(f"alignkit-replay:{d.seed}").sample(old, min(opts.replay, len(old)))
    path = d.out / "reward_data_r2.jsonl"
    write_text_atomic(path, "".join(line + "\n" for line in old) + "".join(json.dumps(r) + "\n" for r in rows))
    return path


def second_round(d: Demo, sft_model: str, policy: str, data_path: str | Path, opts: Round2 = Round2(),
                 rows: tuple[list[dict], dict] | None = None) -> None:
    """The iterate step (stage `ppo_r2`): the round-1 PPO policy's own answers, gold-labelled with
    the world's label noise (`round2_pairs`, or `rows` given), join the reward data; the reward
    ensemble is trained again (afresh from SFT or continued from round 1's, `opts.reward_init`);
    PPO runs again (from the round-1 policy or SFT, KL to the SFT model) against it. Records gold
    and win rate per round in summary["rounds"]."""
    from alignkit.eval.winrate import pairwise_outcomes, sign_test, win_rate_entry
    from alignkit.train import ppo

    def stage() -> dict:
        new, counts = rows if rows is not None else round2_pairs(d, sft_model, policy, opts)
        path = round2_reward_data(d, data_path, new, opts)
        if opts.reward_init == "sft":
            rms = train_reward_ensemble(d, sft_model, path, "reward_r2")
        else:
            r1 = d.summary["stages"]["reward"]
            rms = train_reward_ensemble(d, r1["model"], path, "reward_r2", lr=opts.reward_lr,
                                        member_inits=list(r1.get("ensemble", [])))
        start = policy if opts.ppo_init == "round1" else sft_model
        cfg = d.config(ppo, "ppo", [f"model.path={start}", f"reference={sft_model}", f"world={d.world_dir}",
                                    f"out={d.out / 'ppo_r2'}", "reward.source=model", f"reward.model={rms['model']}",
                                    *opts.ppo])
        cfg = dataclasses.replace(cfg, reward=dataclasses.replace(
            cfg.reward, ensemble=tuple(m["model"] for m in rms["members"])))
        return {**ppo.run(cfg), "pairs": counts["pairs"], "reward_heldout_accuracy": rms.get("eval", {}).get("accuracy")}

    res = d.run_stage("ppo_r2", stage)
    d.summary["stages"]["ppo_r2"]["notes"] = (
        f"iterate round 2: {res['pairs']} gold-labelled pairs of the round-1 policy's answers "
        f"({'against the SFT model' if opts.pairs == 'cross' else 'two samples'}) added, {REWARD_ENSEMBLE} reward "
        f"models {'continued from round 1' if opts.reward_init == 'round1' else 'retrained'}, PPO from "
        f"{'round 1' if opts.ppo_init == 'round1' else 'the SFT model'}")
    d.summary["stages"]["ppo_r2"]["round2"] = dataclasses.asdict(opts)
    d.evaluate("ppo_r2", res["model"])
    st = d.summary["stages"]
    outcomes = pairwise_outcomes(d.scores["ppo_r2"], d.scores["ppo"])
    wins, losses = outcomes.count(1.0), outcomes.count(0.0)
    st["ppo_r2"]["win_rate_vs_round1"] = {**win_rate_entry(d.scores["ppo_r2"], d.scores["ppo"]), "wins": wins,
                                          "losses": losses, "sign_test_p": sign_test(wins, losses)}
    d.summary["rounds"] = [
        {"round": k, "stage": name, "gold_score": st[name].get("gold_score"), "per_category": st[name].get("per_category"),
         "win_rate_vs_sft": st[name].get("win_rate_vs_sft")}
        for k, name in ((0, "sft"), (1, "ppo"), (2, "ppo_r2"))]
    d.summary["rounds"][2]["win_rate_vs_round1"] = st["ppo_r2"]["win_rate_vs_round1"]
    d.save()


def _stage_base(d: Demo, round2: bool) -> None:
    from alignkit.train import pretrain

    res = d.run_stage("base", lambda: pretrain.run(d.config(
        pretrain, "pretrain", [f"corpus={d.world_dir / 'pretrain.jsonl'}", f"out={d.out / 'base'}"])))
    d.evaluate("base", res["model"], kl_to_sft=False)


def _stage_sft(d: Demo, round2: bool) -> None:
    from alignkit.train import sft

    base_model = d.summary["stages"]["base"]["model"]
    res = d.run_stage("sft", lambda: sft.run(d.config(sft, "sft", [
        f"model.path={base_model}", f"data.path={d.world_dir / 'sft.jsonl'}", f"out={d.out / 'sft'}"])))
    d.summary["stages"]["sft"]["padding_fraction"] = res.get("padding_fraction")
    d.evaluate("sft", res["model"])


def _stage_reward(d: Demo, round2: bool) -> None:
    sft_model = d.summary["stages"]["sft"]["model"]

    def train_reward_models() -> dict:
        rm_data, onpolicy = reward_data(d, sft_model)
        return {**train_reward_ensemble(d, sft_model, rm_data, "reward"), "onpolicy_pairs": onpolicy,
                "data": str(rm_data)}

    res = d.run_stage("reward", train_reward_models)
    ev = res.get("eval", {})
    member_acc = [m.get("eval", {}).get("accuracy") for m in res["members"]]
    d.summary["stages"]["reward"].update({
        "onpolicy_pairs": res["onpolicy_pairs"],
        "model": res["model"],
        "data": res["data"],
        "heldout_accuracy": ev.get("accuracy"),
        "gold_agreement": ev.get("gold_agreement"),
        "ece": ev.get("ece"),
        "ensemble": [m["model"] for m in res["members"]],
        "ensemble_heldout_accuracy": member_acc,
        "notes": f"held-out pair accuracy {ev.get('accuracy', float('nan')):.3f} against the gold labels, "
                 f"calibration error {ev.get('ece', float('nan')):.3f}"
                 + (f"; {len(member_acc)} more seeds for PPO's ensemble: "
                    + ", ".join(f"{a if a is not None else float('nan'):.3f}" for a in member_acc)
                    if member_acc else ""),
    })
    d.save()


def _stage_dpo(d: Demo, round2: bool) -> None:
    from alignkit.eval.compare import annotate_stage
    from alignkit.train import dpo

    cfg = d.config(dpo, "dpo", [f"model.path={d.summary['stages']['sft']['model']}",
                                f"data.path={d.world_dir / 'preferences.jsonl'}", f"out={d.out / 'dpo'}"])
    res = d.run_stage("dpo", lambda: dpo.run(cfg))
    d.summary["stages"]["dpo"]["notes"] = "offline preference optimisation on the 0.1-noise gold-labelled pairs"
    d.evaluate("dpo", res["model"])
    annotate_stage(d.summary, "dpo", cfg, res)


def _ppo_stage(d: Demo, name: str) -> None:
    """`ppo` (pipeline.PPO_RM against the reward ensemble) or `overopt` (PPO_OVEROPT on the first
    reward model alone, the second one as the monitor's judge, docs/ppo.md)."""
    from alignkit.eval.compare import annotate_stage, rlhf_notes
    from alignkit.train import ppo

    rm = d.summary["stages"]["reward"]
    ensemble = tuple(rm.get("ensemble", ()))
    overrides, notes = {
        "ppo": (PPO_RM, rlhf_notes(REWARD_ENSEMBLE)),
        "overopt": (PPO_OVEROPT, "deliberate over-optimisation: PPO on the first reward model alone, beta 0.002 "
                                 "and 150 iterations; proxy and gold against KL in the plot"),
    }[name]
    cfg = d.config(ppo, "ppo", [f"model.path={d.summary['stages']['sft']['model']}", f"world={d.world_dir}",
                                f"out={d.out / name}", "reward.source=model", f"reward.model={rm['model']}", *overrides])
    if name == "ppo":  # the over-optimised run keeps one reward model
        cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, ensemble=ensemble))
    elif ensemble:  # ... and the monitor's judge is the second one, held out of its reward (docs/ppo.md)
        cfg = dataclasses.replace(cfg, monitor=dataclasses.replace(cfg.monitor, judge=ensemble[0]))
    res = d.run_stage(name, lambda: ppo.run(cfg))
    d.summary["stages"][name]["notes"] = notes
    d.evaluate(name, res["model"])
    annotate_stage(d.summary, name, cfg, res)


def _stage_round2(d: Demo, round2: bool) -> None:
    st = d.summary["stages"]
    second_round(d, st["sft"]["model"], st["ppo"]["model"], st["reward"]["data"])


def _stage_grpo(d: Demo, round2: bool) -> None:
    from alignkit.train import grpo

    res = d.run_stage("grpo", lambda: grpo.run(d.config(grpo, "grpo", [
        f"model.path={d.summary['stages']['sft']['model']}", f"world={d.world_dir}", f"out={d.out / 'grpo'}"])))
    d.summary["stages"]["grpo"]["notes"] = "rewards from the world's gold judge (the machinery, not RLHF proper)"
    d.evaluate("grpo", res["model"])


def _stage_cai(d: Demo, round2: bool) -> None:
    from alignkit.world.cai_demo import cai_stage

    cai_stage(d)  # Constitutional AI from the base model: SL-CAI and RL-CAI (docs/cai.md)


# The demo's stages in report order: (the stages each needs, its function, rough minutes at one
# thread on the 2-core machine, from the README's 3-seed run: what `--jobs` schedules by). CAI
# starts from the base model but waits for SFT so that its win rate against SFT is reported.
STAGES: dict[str, tuple[tuple[str, ...], Callable[[Demo, bool], None], float]] = {
    "base": ((), _stage_base, 6.5),
    "sft": (("base",), _stage_sft, 0.7),
    "reward": (("sft",), _stage_reward, 4.0),
    "dpo": (("sft",), _stage_dpo, 1.2),
    "ppo": (("reward",), lambda d, r2: _ppo_stage(d, "ppo"), 1.8),
    "overopt": (("reward",), lambda d, r2: _ppo_stage(d, "overopt"), 3.0),
    "ppo_r2": (("ppo",), _stage_round2, 7.0),
    "grpo": (("sft",), _stage_grpo, 0.8),
    "cai": (("base", "sft"), _stage_cai, 3.4),
}


def stage_names(round2: bool) -> list[str]:
    """The stages `demo` runs, in report order (ppo_r2 only with round2)."""
    return [s for s in STAGES if round2 or s != "ppo_r2"]


def demo(out: str | Path, quick: bool = False, seed: int = 0, world_dir: str | Path | None = None,
         round2: bool = False, jobs: int = 1) -> dict:
    """Run the pipeline; returns the summary (also written to OUT/summary.json). world_dir: an
    existing world to use instead of writing one with `seed` (the multi-seed demo shares one).
    round2: also run iterate round 2 (stage ppo_r2; opt-in: it costs about as much as the rest of
    the RLHF stages and did not yet beat round 1 in the runs measured, docs/ppo.md).
    jobs: stages trained at once, each in its own process (`demo_jobs`); 1 runs them one after
    another in this process."""
    start = time.perf_counter()
    d = Demo(Path(out), quick, seed, world_dir=world_dir)
    d.summary["jobs"] = jobs
    if jobs == 1:
        for name in stage_names(round2):
            STAGES[name][1](d, round2)
    else:
        from alignkit.demo_jobs import run_parallel

        run_parallel([d], jobs, round2)
    d.summary["wall_s"] = time.perf_counter() - start
    d.save()
    return d.summary
