"""`alignkit compare` and the report: the head-to-head table from a hand-made summary (exact
cells), hyperparameter counts of known configs, the proxy-minus-gold gap, tokens sampled,
model-state memory, DPO's implicit reward against a plain loop, the isolated runner's memory
figure, and a tiny end-to-end compare run (DPO, PPO and a two-beta sweep)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.atomic import read_jsonl
from alignkit.config import ConfigError, load_config
from alignkit.eval import compare
from alignkit.eval.report import render_html, render_markdown
from alignkit.train import dpo, ppo


def _summary() -> dict:
    """A summary as `alignkit compare` writes it, with round numbers."""
    hp_ppo = {"method": 23, "shared": 9, "changed": 7}
    hp_dpo = {"method": 2, "shared": 11, "changed": 6}
    return {
        "title": "t",
        "seed": 0,
        "stages": {
            "sft": {"dir": "sft", "gold_score": 0.6, "kl": 0.0, "per_category": {"facts": 0.6}},
            "dpo": {
                "dir": "dpo", "gold_score": 0.65, "kl": 0.05, "wall_s": 30.0, "peak_mem_mb": 700.4,
                "mem_added_mb": 150.2, "state_mb": 8.0, "models": ["policy"], "models_in_memory": 1,
                "models_note": "reference log-probs precomputed in one pass before training",
                "tokens_sampled": 0, "training": "offline: 300 steps x 32 pairs, loss ipo, beta 0.5",
                "win_rate_vs_sft": {"rate": 0.55, "lo": 0.5, "hi": 0.6, "n": 200},
                "proxy_gold_gap": {"proxy": "implicit reward", "proxy_win_rate": 0.6, "gold_win_rate": 0.55,
                                   "gap": 0.05, "n": 200},
                "hyperparameters": hp_dpo, "n_hyperparameters": 2, "per_category": {"facts": 0.7},
            },
            "ppo": {
                "dir": "ppo", "gold_score": 0.7, "kl": 0.66, "wall_s": 12.5, "sampling_s": 2.25,
                "peak_mem_mb": 800.0, "state_mb": 22.0,
                "models": ["policy", "reference", "value model", "reward model"], "models_in_memory": 4,
                "models_note": "", "tokens_sampled": 5824,
                "training": "on-policy: 20 iterations x 32 sampled responses, 2 PPO epochs, KL coef 0.1",
                "win_rate_vs_sft": {"rate": 0.605, "lo": 0.536, "hi": 0.67, "n": 200},
                "proxy_gold_gap": None, "proxy_gold_gap_note": "no run directory with evaluated answers",
                "hyperparameters": hp_ppo, "n_hyperparameters": 23, "per_category": {"facts": 0.8},
            },
        },
        "beta_sweep": [
            {"beta": 0.05, "gold_score": 0.62, "kl": 0.4, "steps": 100, "wall_s": 9.0, "margin": 1.5,
             "win_rate_vs_sft": {"rate": 0.52, "lo": 0.45, "hi": 0.59, "n": 200}},
            {"beta": 2.0, "gold_score": 0.61, "kl": 0.01, "steps": 100, "wall_s": 8.0,
             "win_rate_vs_sft": {"rate": 0.5, "lo": 0.43, "hi": 0.57, "n": 200}},
        ],
    }


def test_comparison_table_has_the_exact_cells():
    rows = {r["aspect"]: r for r in compare.comparison_table(_summary())}
    assert list(rows) == list(compare.CLAIMS)
    assert rows["Models needed"] == {
        "aspect": "Models needed",
        "rlhf_claim": "3 (policy, reward, ref)",
        "ppo": "4: policy, reference, value model, reward model",
        "dpo_claim": "2 (policy, ref)",
        "dpo": "1: policy (reference log-probs precomputed in one pass before training)",
    }
    assert rows["Memory"]["ppo"] == "peak 800 MB; model states 22.0 MB"
    assert rows["Memory"]["dpo"] == "peak 700 MB (stage: +150 MB); model states 8.0 MB"
    assert rows["Speed"]["ppo"] == "12.5 s, of which sampling 2.2 s"  # 2.25 rounds half to even
    assert rows["Speed"]["dpo"] == "30.0 s"
    assert (rows["Tokens sampled"]["ppo"], rows["Tokens sampled"]["dpo"]) == ("5,824", "0")
    assert rows["Reward hacking"]["dpo"] == "+0.05 (implicit reward 0.60 vs gold 0.55)"
    assert rows["Reward hacking"]["ppo"] == "n/a: no run directory with evaluated answers"
    assert rows["Hyperparameters"]["ppo"] == "23 method + 9 shared (7 changed from defaults)"
    assert rows["Hyperparameters"]["dpo_claim"] == "Few (β only)"
    assert rows["Performance"]["ppo"] == "gold 0.700 (SFT 0.600)"
    assert rows["Win rate vs SFT"]["ppo"] == "0.60 [0.54, 0.67] (n=200)"
    assert (rows["KL to SFT"]["ppo"], rows["KL to SFT"]["dpo"]) == ("0.660", "0.050")
    assert rows["Stability"]["ppo"] == "not measured (one seed)"


def test_missing_figures_read_na_and_the_report_shows_the_table_only_with_both_stages(tmp_path):
    s = _summary()
    del s["stages"]["ppo"]["wall_s"], s["stages"]["ppo"]["hyperparameters"]
    rows = {r["aspect"]: r for r in compare.comparison_table(s)}
    assert rows["Speed"]["ppo"] == "n/a" and rows["Hyperparameters"]["ppo"] == "n/a"

    md = render_markdown(_summary())
    assert md.startswith("# t\n")
    assert "## RLHF (PPO) vs DPO, measured" in md and "## DPO beta sweep" in md
    assert "| Models needed | 3 (policy, reward, ref) | 4: policy, reference, value model, reward model |" in md
    assert "| 0.05 | 0.620 | 0.400 | 0.52 [0.45, 0.59] (n=200) | 1.500 | 30.00 | 100 | 9.0 |" in md
    assert "| 2 | 0.610 | 0.010 | 0.50 [0.43, 0.57] (n=200) |  |  | 100 | 8.0 |" in md
    only_dpo = _summary()
    del only_dpo["stages"]["ppo"], only_dpo["beta_sweep"]
    md = render_markdown(only_dpo)
    assert "vs DPO, measured" not in md and "beta sweep" not in md

    html = render_html(_summary(), tmp_path)
    assert "<th>measured: PPO</th>" in html and html.count("data:image/png;base64,") >= 3  # gold, win, sweep


def test_hyperparameters_of_a_known_dpo_config():
    """cDPO with one loss parameter and a step budget:
        method: loss, beta, loss_params.label_smoothing                                   -> 3
        shared: model.lora_r, data.max_prompt_len, data.max_len, train.lr, .weight_decay,
                .betas, .schedule, .warmup_steps, .batch_size, .max_steps, .max_grad_norm  -> 11
                (epochs is off because max_steps is set; grad_accum and seed are not knobs)
        changed from dpo.Config's defaults: loss, loss_params.label_smoothing, train.lr,
                train.max_steps                                                           -> 4"""
    cfg = load_config(dpo.Config, None, [
        "model.path=/m", "loss=cdpo", "loss_params={label_smoothing: 0.2}", "train.lr=1e-4",
        "train.max_steps=10", "train.grad_accum=4", "train.seed=3", "reference=copy"])
    h = compare.count_hyperparameters(cfg)
    assert h["method_names"] == ["loss", "beta", "loss_params.label_smoothing"]
    assert (h["method"], h["shared"], h["changed"]) == (3, 11, 4)
    assert sorted(h["changed_names"]) == ["loss", "loss_params.label_smoothing", "train.lr", "train.max_steps"]
    assert [m[0] for m in compare.models_in_memory(cfg)] == ["policy", "reference"]
    # default: epochs counts instead of max_steps, nothing changed; precomputed reference: 1 model
    h = compare.count_hyperparameters(dpo.Config())
    assert (h["method"], h["shared"], h["changed"]) == (2, 11, 0)
    assert "train.epochs" in compare.hyperparameters(dpo.Config())
    assert [m[0] for m in compare.models_in_memory(dpo.Config())] == ["policy"]


def test_hyperparameters_of_known_ppo_configs():
    """ppo.Config(): 8 reward/rollout knobs (source, normalize, clip, missing_eos_penalty,
    ref_logprob_coef, ref_surprise_coef, max_new_tokens, temperature) + 17 top-level (iterations, rollout_batch,
    ppo_epochs, clip_eps, clip_eps_value, vf_coef, ent_coef, gamma, lam, whiten_advantages, kl_coef, kl_estimator,
    kl_target, stop_approx_kl, value_model, value_lr, loss_agg) = 25; shared: lora_r,
    max_prompt_len and 7 optimizer knobs = 9 (max_steps, epochs, max_len do not apply to RL).
    kl_target switches kl_horizon on (+1), reward.ref_logprob_coef > 0
    reward.ref_logprob_baseline (+1), reward.ref_surprise_coef > 0 reward.ref_surprise_prob (+1); a gold reward switches normalize off (-1); LoRA adds
    its three details (+3) and drops the reference copy."""
    h = compare.count_hyperparameters(ppo.Config())
    assert (h["method"], h["shared"], h["changed"]) == (25, 9, 0)
    assert compare.count_hyperparameters(ppo.Config(kl_target=6.0))["method"] == 26
    # reward.ref_logprob_baseline is a knob once the feature is on (+1)
    assert compare.count_hyperparameters(load_config(ppo.Config, None, ["reward.ref_logprob_coef=6"]))["method"] == 26
    assert compare.count_hyperparameters(load_config(ppo.Config, None, ["reward.ref_surprise_coef=2"]))["method"] == 26
    gold = load_config(ppo.Config, None, ["reward.source=gold"])
    assert compare.count_hyperparameters(gold)["method"] == 24
    lora = load_config(ppo.Config, None, ["model.lora_r=8", "model.path=/m", "reward.model=/r"])
    assert compare.count_hyperparameters(lora)["shared"] == 12
    assert compare.models_in_memory(lora) == [("policy", "/m", False), ("value model", "/r", True),
                                              ("reward model", "/r", False)]
    full = load_config(ppo.Config, None, ["model.path=/m", "reward.model=/r"])
    assert [m[0] for m in compare.models_in_memory(full)] == ["policy", "reference", "value model", "reward model"]
    ens = ["model.path=/m", "reward.model=/r", "reward.ensemble=[/r2,/r3]"]
    assert compare.models_in_memory(load_config(ppo.Config, None, ens))[-3:] == [
        ("reward model", "/r", False), ("reward model 2", "/r2", False), ("reward model 3", "/r3", False)]
    # an ensemble adds its mode (+1), and uwo its coefficient (+1); the member paths are not knobs
    assert compare.count_hyperparameters(load_config(ppo.Config, None, ens))["method"] == 26
    assert compare.count_hyperparameters(load_config(ppo.Config, None, [*ens, "reward.ensemble_mode=uwo"]))["method"] == 27


def test_proxy_gold_gap_by_hand():
    """Four prompts, policy vs SFT answers.
        proxy: 3 > 1 win, 2 > 1 win, 5 vs 5 + 1e-9 tie (within PROXY_TIE), 0 < 4 loss -> 2.5 / 4
        gold:  .9 > .5 win, .5 = .5 tie, .7 = .7 tie, .1 < .4 loss                     -> 2.0 / 4
    gap = 0.625 - 0.5 = +0.125: the proxy claims a win (prompt 2) that gold calls a tie."""
    g = compare.proxy_gold_gap([3, 2, 5, 0], [1, 1, 5 + 1e-9, 4], [0.9, 0.5, 0.7, 0.1], [0.5, 0.5, 0.7, 0.4])
    assert g == {"proxy_win_rate": 0.625, "gold_win_rate": 0.5, "gap": 0.125, "n": 4}
    # rank-based: a positive scale and a per-prompt offset (DPO's beta log Z(x)) change nothing
    offset = [10.0, -3.0, 7.0, 0.5]
    g2 = compare.proxy_gold_gap([2 * a + o for a, o in zip([3, 2, 5, 0], offset)],
                                [2 * b + o for b, o in zip([1, 1, 5, 4], offset)],
                                [0.9, 0.5, 0.7, 0.1], [0.5, 0.5, 0.7, 0.4])
    assert g2["gap"] == pytest.approx(0.125)
    # a proxy that ranks as gold does has no gap
    assert compare.proxy_gold_gap([0.9, 0.5], [0.5, 0.6], [0.9, 0.5], [0.5, 0.6])["gap"] == 0.0


def test_tokens_sampled_from_metrics_rows():
    """Mean lengths 8.125 and 8.5 over 32 responses each: 32 * 16.625 = 532 tokens."""
    rows = [{"response_length": 8.125}, {"response_length": 8.5}, {"step": 3}]
    assert compare.tokens_sampled(rows, 32) == 532


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'methods'"):
        compare.Config(methods=["rlhf"])
    with pytest.raises(ConfigError, match="'betas'"):
        compare.Config(betas=[0.1, 0.0])
    with pytest.raises(ConfigError, match="'sft'"):
        compare.run(compare.Config(out=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"'world'.*does not exist"):
        compare._check(compare.Config(sft=str(tmp_path), reward=str(tmp_path), world=str(tmp_path / "no")))
    cfg = load_config(compare.Config, "configs/compare.yaml", ["demo=/runs/d"])
    assert (cfg.sft_dir, cfg.reward_dir, cfg.world_dir) == ("/runs/d/sft/final", "/runs/d/reward/final", "/runs/d/world")


def test_ppo_uses_the_demos_reward_ensemble_unless_told_otherwise(tmp_path):
    for k in (3, 2):
        (tmp_path / f"reward_{k}" / "final").mkdir(parents=True)
    assert compare.Config(demo=str(tmp_path)).ensemble_dirs == [
        str(tmp_path / "reward_2" / "final"), str(tmp_path / "reward_3" / "final")]
    assert compare.Config(demo=str(tmp_path), reward="/rm").ensemble_dirs == []  # a reward model of one's own
    assert compare.Config(demo=str(tmp_path), reward_ensemble=[]).ensemble_dirs == []
    assert compare.Config(reward="/rm", reward_ensemble=["/a"]).ensemble_dirs == ["/a"]


# ------------------------------------------------------------------ with tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny world, a nano SFT model on its BPE tokenizer and a nano reward model."""
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.heads import RewardModel, RewardStats, save_reward_model
    from alignkit.models.load import save_model, tiny_llama
    from alignkit.world import write_world

    root = tmp_path_factory.mktemp("compare")
    world = root / "world"
    write_world(world, n_pairs=64, n_sft=32, n_pretrain=8, n_eval=12, n_pairs_eval=8, n_cai=8)
    rows = [json.loads(x) for x in (world / "preferences.jsonl").read_text().splitlines()]
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=300)
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, root / "sft")
    rm = RewardModel.from_model(tiny_llama("nano", tokenizer=tok, seed=1), seed=1)
    save_reward_model(rm, tok, root / "rm", RewardStats(mean=0.0, std=1.0, n=1))
    return root, tok


def test_weights_and_state_mb_read_the_safetensors_headers(tiny):
    from safetensors.torch import load_file

    root, _ = tiny
    exact = sum(t.numel() * t.element_size() for t in load_file(str(root / "sft" / "model.safetensors")).values())
    assert compare.weights_mb(root / "sft") == pytest.approx(exact / 2**20, rel=1e-12)
    rm = compare.weights_mb(root / "rm")  # backbone + head files
    # PPO: policy trained (x4), reference (x1), value model trained (x4, reward model's size), reward model (x1)
    models = [("policy", str(root / "sft"), True), ("reference", str(root / "sft"), False),
              ("value model", str(root / "rm"), True), ("reward model", str(root / "rm"), False)]
    assert compare.state_mb(models) == pytest.approx(5 * exact / 2**20 + 5 * rm)
    assert compare.weights_mb(root) is None and compare.state_mb([("x", str(root), True)]) is None


def test_implicit_reward_against_a_plain_loop(tiny):
    """beta * (sum_t log pi(y_t | x, y_<t) - the same under the reference), computed token by
    token with a full forward of prompt + response; the reference itself scores exactly 0."""
    from alignkit.data.tokenize import encode_pair
    from alignkit.models.load import load_model, tiny_llama

    root, tok = tiny
    ref = load_model(root / "sft")
    policy = tiny_llama("nano", tokenizer=tok, seed=7).eval()
    prompts, answers = ["Human: What is 2 plus 3?\nAssistant:", "Human: Hi\nAssistant:"], [" 5.", " Hello there."]
    got = compare.implicit_rewards(policy, ref, tok, prompts, answers, beta=0.5)

    def plain(model, p, r):
        e = encode_pair(tok, p, r)
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        n = len(e.prompt_ids)
        return sum(float(lp[t - 1, ids[0, t]]) for t in range(n, ids.shape[1]))

    want = [0.5 * (plain(policy, p, r) - plain(ref, p, r)) for p, r in zip(prompts, answers)]
    assert got == pytest.approx(want, abs=1e-4)
    assert compare.implicit_rewards(ref, ref, tok, prompts, answers, beta=0.5) == [0.0, 0.0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="host RSS test; on CUDA the stage reports the GPU allocator's peak")
def test_isolated_run_measures_the_stage_alone(tmp_path, monkeypatch):
    """A stage that holds 200 MB raises its fresh process's peak RSS by that much, and the
    imports' transient peak (torch's is larger than 200 MB) does not count."""
    (tmp_path / "fat_stage.py").write_text(
        "import time\n"
        "def run(cfg):\n"
        "    block = bytearray(cfg * 2**20)\n"
        "    block[::4096] = b'x' * len(block[::4096])\n"
        "    return {'held_mb': len(block) / 2**20}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rec = compare.run_isolated("fat_stage", 200)
    assert rec["result"] == {"held_mb": 200.0}
    assert 195 <= rec["peak_mem_mb"] - rec["base_mem_mb"] <= 230 and rec["wall_s"] > 0


def test_compare_end_to_end(tiny, tmp_path):
    """DPO and PPO from one nano SFT model, then a two-beta sweep: every figure of the table is
    filled, the PPO metrics feed the over-optimisation plot, the report shows table and sweep."""
    root, _ = tiny
    quiet = ["train.progress=false", "train.tensorboard=false", "train.log_every=1"]
    cfg = compare.Config(
        sft=str(root / "sft"), reward=str(root / "rm"), world=str(root / "world"), out=str(tmp_path / "cmp"),
        dpo_overrides=["train.max_steps=2", "train.batch_size=8", *quiet],
        ppo_overrides=["iterations=2", "rollout_batch=4", "train.batch_size=4", "ppo_epochs=1",
                       "rollout.max_new_tokens=6", "eval_limit=4", "data.limit=8", *quiet],
        betas=[0.05, 0.5], sweep_steps=1, sweep_overrides=["train.batch_size=8", *quiet],
        eval_limit=6, eval_max_new_tokens=6, isolate=False,
    )
    summary = compare.run(cfg)
    out = tmp_path / "cmp"
    assert json.loads((out / "summary.json").read_text())["stages"].keys() == {"sft", "dpo", "ppo"}
    d, p = summary["stages"]["dpo"], summary["stages"]["ppo"]
    assert d["models"] == ["policy"] and p["models"] == ["policy", "reference", "value model", "reward model"]
    assert d["tokens_sampled"] == 0
    rows = read_jsonl(out / "ppo" / "metrics.jsonl")
    assert p["tokens_sampled"] == round(4 * sum(r["response_length"] for r in rows)) > 0
    for s in (d, p):
        assert s["proxy_gold_gap"]["n"] == 6 and -1.0 <= s["proxy_gold_gap"]["gap"] <= 1.0
        assert s["win_rate_vs_sft"]["n"] == 6 and math.isfinite(s["kl"]) and s["state_mb"] > 0
    assert d["proxy_gold_gap"]["proxy"] == "implicit reward" and p["proxy_gold_gap"]["proxy"] == "reward model"
    assert [r["beta"] for r in summary["beta_sweep"]] == [0.05, 0.5]
    assert all(r["steps"] == 1 and r["loss"] == "sigmoid" for r in summary["beta_sweep"])
    md = (out / "report.md").read_text()
    assert "## RLHF (PPO) vs DPO, measured" in md and "## DPO beta sweep" in md
    html = (out / "report.html").read_text()
    assert "Over-optimisation: proxy and gold reward against KL" in html


def test_report_html_renders_notes_bold_and_escapes():
    from alignkit.eval.report import _md_table_to_html

    html = _md_table_to_html("- **ppo**: reward < gold & <script>\n| a | b |\n|---|---|\n| 1 | 2 |")
    assert "<p>&bull; <b>ppo</b>: reward &lt; gold &amp; &lt;script&gt;</p>" in html
    assert "<tr><th>a</th><th>b</th></tr>" in html and "<tr><td>1</td><td>2</td></tr>" in html


def test_binned_means_by_hand():
    from alignkit.eval.report import binned_means

    nan = float("nan")
    # sorted by x: (0, 1) (1, 3) (2, nan) (3, 5) (4, 7) -> groups of sizes 2, 3 (5 points, 2 bins)
    x, y = [3.0, 0.0, 4.0, 1.0, 2.0], [5.0, 1.0, 7.0, 3.0, nan]
    assert binned_means(x, y, 2) == ([0.5, 3.0], [2.0, 6.0])
    assert binned_means(x, y, 1) == ([2.0], [4.0])
    assert binned_means([1.0, 2.0], [nan, 4.0], 5) == ([2.0], [4.0])  # at most one bin per point; NaN-only dropped


def test_the_report_states_parallel_stages_and_the_total_wall_time():
    md = render_markdown({**_summary(), "machine": "x86_64, 2 CPUs", "jobs": 2, "wall_s": 738.0})
    assert "run on x86_64, 2 CPUs, 2 stages at a time (each in its own process), 12.3 min in all." in md
    md = render_markdown({**_summary(), "machine": "x86_64, 2 CPUs", "jobs": 1, "wall_s": 90.0})
    assert "run on x86_64, 2 CPUs, 1.5 min in all." in md
    assert "run on x86_64, 2 CPUs." in render_markdown({**_summary(), "machine": "x86_64, 2 CPUs"})
