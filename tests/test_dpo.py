"""DPO stage and reference modes: the math against plain reference code, the invariances
(three reference modes agree; stacked forward equals separate forwards; step-0 loss is ln 2),
the precomputed cache, and short end-to-end runs (DPO, KTO, optional real data)."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from alignkit.data.batching import collate_preference, collate_sft
from alignkit.data.records import PreferencePair
from alignkit.data.tokenize import TokenizedSFT, TokenizedUnpaired, TruncationLimits, tokenize_preference
from alignkit.losses.preference import PREFERENCE_LOSSES
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.load import apply_lora, save_model, tiny_llama
from alignkit.train import dpo
from alignkit.train import reference as ref_lib
from alignkit.train.dpo import Config, DPOBatch, Indexed
from alignkit.world import write_world

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LN2 = math.log(2.0)
QUIET = TrainConfig(progress=False, tensorboard=False, log_every=1, warmup_steps=0, schedule="constant")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    write_world(d, n_pairs=96, n_sft=64, n_pretrain=16, n_eval=12, n_pairs_eval=8)
    return d


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tok(world):
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in _rows(world / "preferences.jsonl")]
    texts += [r["prompt"] + r["response"] for r in _rows(world / "sft.jsonl")]
    return train_bpe_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def base(tok):
    """A nano Llama with weights scaled up, so its log-probs are far from uniform."""
    model = tiny_llama("nano", tokenizer=tok, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def items(world, tok):
    rows = _rows(world / "preferences.jsonl")[:6]
    pairs = [
        PreferencePair(r["prompt"], r["chosen"], r["rejected"], soft_label=[None, 0.8, 0.3][i % 3])
        for i, r in enumerate(rows)
    ]
    out, _ = tokenize_preference(tok, pairs, TruncationLimits(max_prompt_len=48, max_len=96))
    return out


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, base, tok):
    return save_model(base, tok, tmp_path_factory.mktemp("sft") / "final")


def _naive_logps(model, prompt, response):
    """log pi(response | prompt): one unpadded sequence, full log-softmax, summed over the response."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = F.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    start = len(prompt) - 1
    return sum(float(lp[t, targets[t]]) for t in range(start, len(targets)))


@pytest.fixture(scope="module")
def lora_policy(base):
    """(peft policy with non-zero LoRA weights, the same policy merged into a plain model)."""
    peft = apply_lora(copy.deepcopy(base), ModelConfig(lora_r=4, lora_alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    merged = copy.deepcopy(peft).merge_and_unload()
    return peft.eval(), merged.eval()


def _three_modes(cfg, base, policy_peft, policy_plain, items, pad):
    """Step outputs of copy, precomputed and lora reference modes on the same batch."""
    pairs = collate_preference(items, pad)
    copy_step = dpo.make_preference_step(cfg, ref_lib.CopyReference(copy.deepcopy(base), cfg.average_logps))
    table = ref_lib.precompute_logps(base, dpo.preference_columns(items), pad, cfg.average_logps, batch_size=4)
    pre = ref_lib.PrecomputedReference(table)
    pre_batch = dpo.make_preference_collate(pad, pre)(list(Indexed(items)))
    lora_step = dpo.make_preference_step(cfg, ref_lib.LoraReference(cfg.average_logps))
    with torch.no_grad():
        return {
            "copy": copy_step(policy_plain, DPOBatch(pairs)),
            "precomputed": dpo.make_preference_step(cfg, pre)(policy_plain, pre_batch),
            "lora": lora_step(policy_peft, DPOBatch(pairs)),
        }


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_three_reference_modes_give_the_same_loss(base, items, tok, lora_policy, loss):
    """Policy = base + non-zero LoRA; reference = base. Copy and precomputed see the merged
    policy, lora sees the adapter (disabled for the reference): same numbers to 1e-5."""
    cfg = Config(loss=loss, beta=0.1)
    peft, merged = lora_policy
    outs = _three_modes(cfg, base, peft, merged, items, tok.pad_token_id)
    n = len(items)
    losses = {k: float(o.loss) / o.weight for k, o in outs.items()}
    assert abs(outs["copy"].metrics["rewards/margins"]) > 1e-2  # the policy really differs from the reference
    for k in ("precomputed", "lora"):
        assert losses[k] == pytest.approx(losses["copy"], abs=1e-5, rel=1e-6)
        assert outs[k].weight == n
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert outs[k].metrics[name] == pytest.approx(outs["copy"].metrics[name], abs=1e-5)
        # float32 sums of ~100 nats: equal to a few ulps
        assert outs[k].metrics["logps/chosen"] == pytest.approx(outs["copy"].metrics["logps/chosen"], rel=1e-6)


def test_step0_loss_is_ln2_in_every_mode(base, items, tok):
    """Policy == reference: every log-ratio is 0, so -log sigmoid(0) = ln 2 per pair (for any
    soft label p: p ln 2 + (1-p) ln 2) and margins are 0. Copy and lora run the same forward
    on the same batch, so the ratios are exactly 0 and accuracy is 0 (ties count as wrong);
    precomputed values come from differently padded batches, equal only up to rounding."""
    cfg = Config(loss="sigmoid", beta=0.1)
    peft = apply_lora(copy.deepcopy(base), ModelConfig(lora_r=4)).eval()  # lora_B = 0: a no-op
    outs = _three_modes(cfg, base, peft, base, items, tok.pad_token_id)
    for o in outs.values():
        assert float(o.loss) / o.weight == pytest.approx(LN2, abs=1e-6)
        assert o.metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert outs["copy"].metrics["rewards/accuracies"] == 0.0
    assert outs["lora"].metrics["rewards/accuracies"] == 0.0


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep`: exercises the full-logits fallback."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


@pytest.mark.parametrize("compact", [True, False])
def test_stacked_forward_equals_separate_forwards_and_naive(base, items, tok, compact):
    model = base if compact else _NoLogitsToKeep(base)
    pad = tok.pad_token_id
    pairs = collate_preference(items, pad)
    with torch.no_grad():
        sums, counts = ref_lib.response_logps(model, pairs.input_ids, pairs.attention_mask, pairs.labels)
        chosen_sep = collate_sft([TokenizedSFT(x.prompt_ids, x.chosen_ids) for x in items], pad)
        rejected_sep = collate_sft([TokenizedSFT(x.prompt_ids, x.rejected_ids) for x in items], pad)
        c, _ = ref_lib.response_logps(model, chosen_sep.input_ids, chosen_sep.attention_mask, chosen_sep.labels)
        r, _ = ref_lib.response_logps(model, rejected_sep.input_ids, rejected_sep.attention_mask, rejected_sep.labels)
    stacked_c, stacked_r = pairs.split(sums)
    torch.testing.assert_close(stacked_c, c, atol=1e-5, rtol=0)
    torch.testing.assert_close(stacked_r, r, atol=1e-5, rtol=0)
    naive_c = torch.tensor([_naive_logps(base, x.prompt_ids, x.chosen_ids) for x in items])
    naive_r = torch.tensor([_naive_logps(base, x.prompt_ids, x.rejected_ids) for x in items])
    torch.testing.assert_close(stacked_c, naive_c, atol=1e-4, rtol=0)
    torch.testing.assert_close(stacked_r, naive_r, atol=1e-4, rtol=0)
    assert counts.tolist() == [len(x.chosen_ids) for x in items] + [len(x.rejected_ids) for x in items]


@pytest.fixture(scope="module")
def naive(base, items, lora_policy):
    """Plain per-sequence log-probs (summed) of policy and reference, and response lengths."""
    _, merged = lora_policy

    def col(model, which):
        return torch.tensor([_naive_logps(model, x.prompt_ids, getattr(x, which)) for x in items])

    return {
        "pc": col(merged, "chosen_ids"), "pr": col(merged, "rejected_ids"),
        "rc": col(base, "chosen_ids"), "rr": col(base, "rejected_ids"),
        "nc": torch.tensor([float(len(x.chosen_ids)) for x in items]),
        "nr": torch.tensor([float(len(x.rejected_ids)) for x in items]),
    }


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_every_loss_gets_the_inputs_its_paper_uses(base, items, tok, lora_policy, naive, name):
    """The step against plain code: summed log-probs, except per-token averages for ipo/simpo/orpo;
    chosen_nll = -(mean log-prob of chosen) for rpo/orpo; soft labels passed through; reference
    ignored for simpo/orpo."""
    _, merged = lora_policy
    beta = {"simpo": 2.0}.get(name, 0.1)
    cfg = Config(loss=name, beta=beta)
    reference = ref_lib.CopyReference(copy.deepcopy(base), cfg.average_logps)
    if not cfg.uses_reference:
        reference = ref_lib.NoReference()
    out = dpo.make_preference_step(cfg, reference)(merged, DPOBatch(collate_preference(items, tok.pad_token_id)))

    avg = name in ("ipo", "simpo", "orpo")
    nc, nr = (naive["nc"], naive["nr"]) if avg else (1.0, 1.0)
    pc, pr, rc, rr = naive["pc"] / nc, naive["pr"] / nr, naive["rc"] / nc, naive["rr"] / nr
    soft = torch.tensor([1.0 if x.soft_label is None else x.soft_label for x in items])
    kwargs = {}
    if name in ("rpo", "orpo"):
        kwargs["chosen_nll"] = -naive["pc"] / naive["nc"]
    refs = (None, None) if name in ("simpo", "orpo") else (rc, rr)
    expected = PREFERENCE_LOSSES[name](pc, pr, *refs, beta=beta, soft_label=soft, **kwargs).losses.sum()
    assert float(out.loss) == pytest.approx(float(expected), abs=1e-4)
    assert out.metrics["logps/chosen"] == pytest.approx(float(pc.mean()), abs=1e-4)


def test_precomputed_cache_is_reused_without_the_model(base, items, tok, naive, tmp_path):
    columns = dpo.preference_columns(items)
    sizes = {k: len(v) for k, v in columns.items()}
    key = ref_lib.cache_key(ref_lib.fingerprint_model(base), ref_lib.fingerprint_sequences(columns), False, "fp32")
    calls = []

    def compute():
        calls.append(1)
        return ref_lib.precompute_logps(base, columns, tok.pad_token_id, average=False)

    first, hit1 = ref_lib.load_or_precompute(tmp_path, key, sizes, compute)
    assert (hit1, len(calls)) == (False, 1)
    assert ref_lib.cache_path(tmp_path, key).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

    def no_model():
        raise AssertionError("the cache hit must not need the reference model")

    second, hit2 = ref_lib.load_or_precompute(tmp_path, key, sizes, no_model)
    assert hit2
    for k in first:
        torch.testing.assert_close(first[k], second[k], atol=0, rtol=0)
    torch.testing.assert_close(second["chosen"], naive["rc"], atol=1e-4, rtol=0)
    torch.testing.assert_close(second["rejected"], naive["rr"], atol=1e-4, rtol=0)


def test_fingerprint_changes_with_model_data_and_normalisation(base, items, tmp_path, tok):
    columns = dpo.preference_columns(items)
    fp_model, fp_data = ref_lib.fingerprint_model(base), ref_lib.fingerprint_sequences(columns)
    changed = copy.deepcopy(base)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert ref_lib.fingerprint_model(changed) != fp_model
    assert ref_lib.fingerprint_model(copy.deepcopy(base)) == fp_model
    other = dict(columns, rejected=[(p, r[:-1] + [r[-1] + 1]) for p, r in columns["rejected"]])
    assert ref_lib.fingerprint_sequences(other) != fp_data
    keys = {
        ref_lib.cache_key(fp_model, fp_data, False, "fp32"),
        ref_lib.cache_key(fp_model, fp_data, True, "fp32"),
        ref_lib.cache_key(fp_model, fp_data, False, "bf16"),
        ref_lib.cache_key(ref_lib.fingerprint_model(changed), fp_data, False, "fp32"),
    }
    assert len(keys) == 4
    a, b = save_model(base, tok, tmp_path / "a"), save_model(changed, tok, tmp_path / "b")
    assert ref_lib.fingerprint_files(a) != ref_lib.fingerprint_files(b)
    assert ref_lib.fingerprint_files(a) == ref_lib.fingerprint_files(save_model(base, tok, tmp_path / "c"))


def _cfg(sft_dir, data_path, out, **kw) -> Config:
    train = kw.pop("train", {})
    data = kw.pop("data", {})
    return Config(
        model=ModelConfig(path=str(sft_dir)),
        data=DataConfig(path=str(data_path), max_prompt_len=48, max_len=96, **data),
        train=TrainConfig(**{**QUIET.__dict__, "batch_size": 8, "max_steps": 2, **train}),
        out=str(out),
        **kw,
    )


def test_short_run_raises_margins_and_a_rerun_reuses_the_cache(sft_dir, tmp_path, monkeypatch):
    """Toy pairs where the chosen answer is always ' Yes.' and the rejected ' No.': margins start
    at exactly 0 (policy == reference) and must grow. A second run on the same model and data
    finds the precomputed table and never runs the reference pass; other data gets another key."""
    path = tmp_path / "toy.jsonl"
    prompts = [f"Human: Is {a} plus {b} a number?\nAssistant:" for a in range(8) for b in range(4)]
    path.write_text("".join(json.dumps({"prompt": p, "chosen": " Yes.", "rejected": " No."}) + "\n" for p in prompts))
    cache = str(tmp_path / "cache")
    first = dpo.run(_cfg(sft_dir, path, tmp_path / "a", cache_dir=cache, train={"max_steps": 12, "lr": 3e-3}))
    lines = _rows(tmp_path / "a" / "metrics.jsonl")
    assert lines[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert lines[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert lines[-1]["rewards/margins"] > 0.5
    assert lines[-1]["rewards/accuracies"] == 1.0
    assert first["steps"] == 12 and Path(first["model"], "config.json").is_file()
    assert first["reference"] == "precomputed" and first["reference_cache"]["hit"] is False

    def boom(*a, **k):
        raise AssertionError("precompute must not run on a cache hit")

    monkeypatch.setattr(ref_lib, "precompute_logps", boom)
    second = dpo.run(_cfg(sft_dir, path, tmp_path / "b", cache_dir=cache, train={"max_steps": 1}))
    assert second["reference_cache"]["hit"] is True
    assert second["reference_cache"]["key"] == first["reference_cache"]["key"]
    monkeypatch.undo()
    third = dpo.run(_cfg(sft_dir, path, tmp_path / "c", cache_dir=cache, data={"limit": 24}, train={"max_steps": 1}))
    assert third["reference_cache"]["hit"] is False
    assert third["reference_cache"]["key"] != first["reference_cache"]["key"]


def test_kto_mismatched_partners_are_a_derangement():
    ex = [TokenizedUnpaired([1, i], [10 + i, 2], desirable=i % 2 == 0) for i in range(7)]
    items = dpo.make_kto_items(ex, max_len=None, seed=3)
    partners = [it.kl_completion_ids[0] - 10 for it in items]
    assert sorted(partners) == list(range(7))  # every completion used once
    assert all(p != j for j, p in enumerate(partners))  # never its own
    cut = dpo.make_kto_items(ex, max_len=3, seed=3)
    assert all(len(it.example.prompt_ids) + len(it.kl_completion_ids) <= 3 for it in cut)


def test_kto_run_trains_on_unpaired_data(sft_dir, world, tmp_path):
    path = tmp_path / "kto.jsonl"
    rows = _rows(world / "preferences.jsonl")[:16]
    lines = []
    for r in rows:
        lines.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        lines.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = dpo.run(_cfg(sft_dir, path, tmp_path / "kto", loss="kto", reference="copy",
                       train={"max_steps": 2, "lr": 1e-3, "precision": "fp32"},  # bf16 on a GPU rounds the two passes apart
                       eval_world=str(world), eval_limit=6, eval_max_new_tokens=4))
    first = _rows(tmp_path / "kto" / "metrics.jsonl")[0]
    # step 0: policy == reference, so every reward and z0 is 0 and each loss is lambda - lambda*sigmoid(0)
    assert first["kl"] == 0.0 and first["loss"] == pytest.approx(0.5, abs=1e-6)
    assert res["steps"] == 2 and math.isfinite(res["final_loss"]) and res["metrics"]["kl"] >= 0.0
    ev = res["eval"]  # the optional gold evaluation: counts add up, one row per prompt on disk
    assert ev["n"] == 6 and ev["wins"] + ev["losses"] + ev["ties"] == 6
    assert ev["win_rate"] == pytest.approx((ev["wins"] + 0.5 * ev["ties"]) / 6)
    assert ev["ci_low"] <= ev["win_rate"] <= ev["ci_high"]
    assert len(_rows(tmp_path / "kto" / "eval_responses.jsonl")) == 6


def test_kto_z0_is_one_estimate_over_the_global_batch(sft_dir, world, tmp_path):
    """z0 is computed once per optimizer step over the global batch, so grad_accum=2 (two
    micro-batches of 4) trains exactly like one micro-batch of 8; a z0 per micro-batch would differ
    from step 2 on, once the policy has moved away from the reference (at step 1 z0 is 0)."""
    from safetensors.torch import load_file

    path = tmp_path / "kto.jsonl"
    rows = _rows(world / "preferences.jsonl")[:32]  # all desirable: the policy raises every
    # completion's likelihood, mismatched ones too, so z0 leaves its clamp at 0
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"], "label": True}) + "\n"
                            for r in rows))
    runs = {}
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        dpo.run(_cfg(sft_dir, path, out, loss="kto", reference="copy", beta=0.5,
                     train={"max_steps": 4, "lr": 1e-2, "precision": "fp32", "grad_accum": accum}))
        runs[accum] = ([r["kl"] for r in _rows(out / "metrics.jsonl")], load_file(str(out / "final" / "model.safetensors")))
    (kl1, w1), (kl2, w2) = runs[1], runs[2]
    assert kl1[0] == 0.0 and max(kl1[1:]) > 1e-4  # the estimate moves once the policy does
    assert kl2 == pytest.approx(kl1, rel=1e-5)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-5


def test_bad_loss_name_lists_valid_names():
    with pytest.raises(ConfigError, match=r"'sigmod'.*valid names: cdpo, hinge, ipo, kto, orpo, robust, rpo, sigmoid"):
        Config(loss="sigmod")


def test_bad_loss_param_and_lora_without_adapter_are_config_errors():
    with pytest.raises(ConfigError, match=r"loss_params.gama.*valid: gamma"):
        Config(loss="simpo", beta=2.0, loss_params={"gama": 0.5})
    with pytest.raises(ConfigError, match=r"lora_r > 0"):
        Config(reference="lora")


def test_beta_outside_sane_range_warns_and_sane_beta_does_not():
    with pytest.warns(UserWarning, match=r"beta=0.001 is below the sane range \[0.01, 0.5\].*'sigmoid'"):
        Config(beta=0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Config(beta=0.1)
        Config(loss="simpo", beta=2.0)


def test_gold_outcomes_win_tie_loss():
    from alignkit.eval.winrate import pairwise_outcomes

    assert pairwise_outcomes([1.0, 0.3, 0.5, 0.0], [0.5, 0.3, 1.0, 0.0]) == [1.0, 0.5, 0.0, 0.5]
    with pytest.raises(ValueError):
        pairwise_outcomes([1.0], [])


REAL = [
    ("hh-rlhf/harmless-base-test.jsonl.gz", "hh"),
    ("llama_factory/dpo_en_demo.json", "llama_factory"),
]


@pytest.mark.parametrize("rel,name", REAL)
def test_real_data_runs_a_few_steps(rel, name, tmp_path):
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    from alignkit.data.load import load_records
    from alignkit.data.records import prompt_text

    sample = load_records(path, kind="preference", on_error="skip", limit=64).records
    tok = train_bpe_tokenizer([prompt_text(r.prompt) + r.chosen + r.rejected for r in sample], vocab_size=400)
    model_dir = save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, tmp_path / "m")
    cfg = Config(
        model=ModelConfig(path=str(model_dir)),
        data=DataConfig(path=str(path), on_error="skip", limit=16, max_prompt_len=64, max_len=128),
        train=TrainConfig(**{**QUIET.__dict__, "batch_size": 4, "max_steps": 2, "lr": 1e-3}),
        out=str(tmp_path / "run"),
    )
    res = dpo.run(cfg)
    first = _rows(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-5)
    assert res["steps"] == 2 and math.isfinite(res["final_loss"])


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_packed_run_equals_padded_run(sft_dir, world, tmp_path, loss):
    """`alignkit dpo` with train.packing on and off (precomputed reference, 2 steps of 8): the same
    final loss and metrics, fp32 (tests/test_packing.py compares the steps and their gradients)."""
    if loss == "kto":
        rows = _rows(world / "preferences.jsonl")
        path = tmp_path / "unpaired.jsonl"
        path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}) + "\n"
                                for r in rows[:24] for k in ("chosen", "rejected")))
    else:
        path = world / "preferences.jsonl"
    out = {}
    for packing in (True, False):
        out[packing] = dpo.run(_cfg(sft_dir, path, tmp_path / str(packing), loss=loss, cache_dir=tmp_path / "cache",
                                    train={"packing": packing, "precision": "fp32", "lr": 1e-3}))
    assert out[True]["final_loss"] == pytest.approx(out[False]["final_loss"], rel=1e-5, abs=1e-6)
    assert out[False]["final_loss"] > 0 and out[False]["steps"] == 2 and "rewards/chosen" in out[False]["metrics"]
    for k, v in out[False]["metrics"].items():
        assert out[True]["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-5), k
