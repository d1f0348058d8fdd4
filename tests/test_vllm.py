"""vLLM as the rollout engine (rollout.engine=vllm), held against the HF sampler, the reference.

vLLM pins its own torch and transformers, so it lives in its own venv (scripts/setup_vllm_venv.sh).
Where `vllm` is not importable here, test_suite_in_the_vllm_venv re-runs this file under the venv's
python (ALIGNKIT_VLLM_PYTHON, else /work/venvs/vllm/bin/python) and the tests below skip; where no
such python exists, everything skips with the command that builds it.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.config import load_config
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.generate import HFGenerator, SamplingParams
from alignkit.models.load import save_model, tiny_llama

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
VENV_PYTHON = os.environ.get("ALIGNKIT_VLLM_PYTHON", "/work/venvs/vllm/bin/python")
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not importable here (run under the vLLM venv by test_suite_in_the_vllm_venv)")


@pytest.mark.slow
@pytest.mark.skipif(HAVE_VLLM, reason="vllm is importable here: the tests below run directly")
def test_suite_in_the_vllm_venv():
    if not Path(VENV_PYTHON).is_file():
        pytest.skip(f"no vLLM venv at {VENV_PYTHON}: build it with `bash scripts/setup_vllm_venv.sh` "
                    "(or point ALIGNKIT_VLLM_PYTHON at a python with vllm installed)")
    probe = "import importlib.util as u, sys; sys.exit(not (u.find_spec('vllm') and u.find_spec('pytest')))"
    if subprocess.run([VENV_PYTHON, "-c", probe]).returncode != 0:
        pytest.skip(f"{VENV_PYTHON} lacks vllm or pytest (a half-built venv?): rerun `bash scripts/setup_vllm_venv.sh`")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([VENV_PYTHON, "-m", "pytest", str(Path(__file__)), "-o", "addopts=", "-q", "-x",
                        "-p", "no:cacheprovider", "-p", "no:warnings"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout[-4000:], r.stderr[-2000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]  # "7 passed, 1 skipped in ...": only this runner skips there
    assert re.match(r"\d+ passed, 1 skipped in ", summary), summary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A `tiny` Llama (head size 32: vLLM's CPU attention has no kernel for nano's 16) with our
    BPE tokenizer, saved for the stage runs."""
    root = tmp_path_factory.mktemp("vllm")
    tok = train_bpe_tokenizer(["Human: What is one plus two?\nAssistant: three . four five six seven"] * 20, vocab_size=300)
    model = tiny_llama("tiny", tokenizer=tok, seed=0)
    save_model(model, tok, root / "sft")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Human: What is {w} plus two?\nAssistant:"}) + "\n"
                                                for w in ("one", "two", "three", "four")))
    (root / "vllm_rewards.py").write_text("def count_e(prompts, responses):\n    return [r.count('e') / 4 for r in responses]\n")
    return root, tok, model


def _prompts(tok):
    texts = ["Human: What is one plus two?\nAssistant:", "Human: four", "five six seven . three", "Human: What"]
    return [tok(t)["input_ids"] for t in texts]


@needs_vllm
def test_greedy_rollouts_are_token_identical_to_the_hf_sampler(tiny):
    from alignkit.models.vllm_engine import VLLMGenerator

    _, tok, model = tiny
    model = model.float().eval()
    params = SamplingParams(max_new_tokens=12, greedy=True)
    engine = VLLMGenerator(model, tok)
    prompts = _prompts(tok) * 2
    hf = HFGenerator(model, tok).generate(prompts, params)
    out = engine.generate(prompts, params)
    assert list(out) == list(hf) and out.finished == hf.finished
    assert all(len(r) == 12 for r in out)  # untrained: no EOS, every response cut at max_new_tokens
    no_stop = SamplingParams(max_new_tokens=7, greedy=True, stop_at_eos=False)
    assert list(engine.generate(prompts, no_stop)) == list(HFGenerator(model, tok).generate(prompts, no_stop))


@needs_vllm
def test_after_an_optimizer_step_the_synced_engine_decodes_like_the_trained_model(tiny):
    """A few AdamW steps on a next-token loss change the greedy decode; the engine started before
    the steps then decodes exactly like the trained model (weights pushed in memory), including
    responses that stop at EOS (finished True) next to ones cut at max_new_tokens."""
    from alignkit.models.vllm_engine import VLLMGenerator

    _, tok, model = tiny
    model = tiny_llama("tiny", tokenizer=tok, seed=1).float()
    engine = VLLMGenerator(model, tok)
    prompts = _prompts(tok)
    params = SamplingParams(max_new_tokens=10, greedy=True)
    before = engine.generate(prompts, params)
    assert list(before) == list(HFGenerator(model, tok).generate(prompts, params))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    three = tok(" three .")["input_ids"]
    model.train()
    for _ in range(12):  # teach prompts 0 and 1 to answer " three ." and stop
        loss = sum(model(input_ids=t, labels=t).loss for t in
                   (torch.tensor([p + three + [tok.eos_token_id]]) for p in prompts[:2]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    trained = HFGenerator(model, tok).generate(prompts, params)
    assert list(trained) != list(before)
    after = engine.generate(prompts, params)
    assert list(after) == list(trained) and after.finished == trained.finished
    assert any(trained.finished) and not all(trained.finished), trained.finished


@needs_vllm
def test_a_lora_policy_is_merged_for_the_push(tiny):
    """A peft LoRA policy with non-zero adapters: the engine decodes like the wrapped model (the
    adapters reach vLLM merged), and the policy's own weights are unmerged again afterwards."""
    from alignkit.config import ModelConfig
    from alignkit.models.load import apply_lora
    from alignkit.models.vllm_engine import VLLMGenerator

    _, tok, _ = tiny
    policy = apply_lora(tiny_llama("tiny", tokenizer=tok, seed=2).float(), ModelConfig(path="x", lora_r=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
    policy.eval()
    prompts, params = _prompts(tok), SamplingParams(max_new_tokens=8, greedy=True)
    hf = HFGenerator(policy, tok).generate(prompts, params)
    with policy.disable_adapter():
        base = HFGenerator(policy, tok).generate(prompts, params)
    assert list(hf) != list(base)  # the adapters matter
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    assert list(VLLMGenerator(policy, tok).generate(prompts, params)) == list(hf)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


@needs_vllm
def test_sampling_params_map_onto_vllm(tiny):
    """Seeded sampling is reproducible, rows of one prompt get different seeds, and a top_k=1
    sample is the greedy decode (the filters reach vLLM)."""
    from alignkit.models.vllm_engine import VLLMGenerator

    _, tok, model = tiny
    engine = VLLMGenerator(model.float().eval(), tok)
    prompts = [_prompts(tok)[0]] * 4
    params = SamplingParams(max_new_tokens=8, temperature=1.3, seed=7)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert list(a) == list(b)
    assert len({tuple(r) for r in a}) > 1  # one seed per row, not one per batch
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=8, greedy=True))
    assert list(engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=3))) == list(greedy)
    sp = engine.sampling_params(SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=4, seed=11), row=2)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (5, 0.7, 0.9, 4, 13)
    assert list(sp.stop_token_ids) == [tok.eos_token_id]
    # per-row seeds (the RL stages' row_seeds): a row draws the same tokens wherever it sits, so
    # sampling 4 rows at once equals sampling them 2 + 2, as two ranks would
    seeds = (101, 202, 303, 404)
    whole = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.3, row_seeds=seeds))
    halves = [engine.generate(prompts[i:i + 2], SamplingParams(max_new_tokens=8, temperature=1.3, row_seeds=seeds[i:i + 2]))
              for i in (0, 2)]
    assert list(whole) == list(halves[0]) + list(halves[1])
    assert len({tuple(r) for r in whole}) > 1


@needs_vllm
@pytest.mark.parametrize("stage_name", ["grpo", "rloo"])
def test_grpo_first_steps_equal_with_vllm_and_hf(tiny, monkeypatch, stage_name):
    """The same GRPO/RLOO run with rollout.engine=hf and =vllm. The samplers draw from different
    RNGs, so both rollouts are made greedy (SamplingParams patched in rollout.py): the rollouts must
    then be token-identical and every metric of the first two steps equal. A greedy group holds G
    identical responses, whose group-relative advantages are all 0; the test swaps the advantage for
    a fixed baseline (score - 0.5) so step 1 is a real update, and step 2 must sample the changed
    policy: the engine got the new weights."""
    from alignkit.train import grpo, rloo, rollout

    stage = {"grpo": grpo, "rloo": rloo}[stage_name]
    root, _, _ = tiny
    monkeypatch.syspath_prepend(str(root))

    def greedy_params(**kw):
        return SamplingParams(**{**kw, "greedy": True})

    monkeypatch.setattr(rollout, "SamplingParams", greedy_params)
    monkeypatch.setitem(grpo.ADVANTAGES, stage_name, lambda r, g: r - 0.5)
    sampled: list = []
    make = rollout.make_generator

    def recording(*args, **kwargs):
        gen = make(*args, **kwargs)

        class Rec:
            def generate(self, prompts, params):
                out = gen.generate(prompts, params)
                sampled.append((type(gen).__name__, list(out)))
                return out

        return Rec()

    monkeypatch.setattr(rollout, "make_generator", recording)
    rows = {}
    for engine in ("hf", "vllm"):
        out = root / f"{stage_name}-{engine}"
        cfg = load_config(stage.Config, None, [
            f"model.path={root / 'sft'}", f"data.path={root / 'prompts.jsonl'}", f"out={out}",
            "reward.source=function", "reward.function=vllm_rewards:count_e", "iterations=2", "prompts_per_step=2",
            "group_size=2", "rollout.max_new_tokens=6", "train.batch_size=4", "train.lr=5e-2",
            "train.precision=fp32", f"rollout.engine={engine}", "eval_every=0",
        ])
        stage.run(cfg)
        rows[engine] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [name for name, _ in sampled] == ["HFGenerator"] * 2 + ["VLLMGenerator"] * 2
    assert sampled[0][1] == sampled[2][1] and sampled[1][1] == sampled[3][1]
    assert sampled[0][1] != sampled[1][1]  # step 1 changed the greedy decode
    for step in (0, 1):
        for key in ("reward", "reward_raw", "kl", "kl_k3", "loss", "entropy", "approx_kl", "grad_norm",
                    "response_length", "truncated_fraction"):
            assert rows["vllm"][step][key] == pytest.approx(rows["hf"][step][key], rel=1e-5, abs=1e-6), (step, key)
    assert rows["hf"][0]["grad_norm"] > 1e-3


@needs_vllm
def test_ppo_two_steps_equal_with_vllm_and_hf(tiny, monkeypatch):
    """PPO (separate critic, so greedy rollouts still have non-zero GAE advantages) with
    rollout.engine=hf and =vllm, rollouts made greedy: every metric of two iterations equal, and
    step 2's rollout follows the updated policy in both."""
    from alignkit.train import ppo, rollout

    root, _, _ = tiny
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(rollout, "SamplingParams", lambda **kw: SamplingParams(**{**kw, "greedy": True}))
    rows = {}
    for engine in ("hf", "vllm"):
        out = root / f"ppo-{engine}"
        cfg = load_config(ppo.Config, None, [
            f"model.path={root / 'sft'}", f"data.path={root / 'prompts.jsonl'}", f"out={out}",
            "reward.source=function", "reward.function=vllm_rewards:count_e", "iterations=2", "rollout_batch=4",
            "train.batch_size=2", "ppo_epochs=2", "rollout.max_new_tokens=6", "value_model=separate",
            "train.lr=5e-2", "train.precision=fp32", f"rollout.engine={engine}",
        ])
        ppo.run(cfg)
        rows[engine] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for step in (0, 1):
        for key in ("reward", "kl", "entropy", "approx_kl", "value_loss", "response_length"):
            assert rows["vllm"][step][key] == pytest.approx(rows["hf"][step][key], rel=1e-5, abs=1e-6), (step, key)
    assert rows["hf"][1]["kl"] != pytest.approx(0.0, abs=1e-6)


def test_engine_is_a_config_key_with_a_clear_error():
    from alignkit.config import ConfigError
    from alignkit.train import grpo

    with pytest.raises(ConfigError, match="rollout.engine"):
        load_config(grpo.Config, None, ["model.path=x", "rollout.engine=vlm"])


def test_missing_vllm_says_how_to_install_it(monkeypatch):
    from alignkit.models import vllm_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError even if installed
    with pytest.raises(ImportError, match="setup_vllm_venv.sh"):
        vllm_engine.import_vllm()


def test_the_weight_folder_keeps_one_copy_of_tied_weights(tmp_path):
    """The folder an engine reloads from: a tied head (lm_head = embed_tokens) is written once."""
    from safetensors.torch import load_file

    from alignkit.models.vllm_engine import ModelSpec, _write_model_dir

    emb, other = torch.arange(6.0).reshape(3, 2), torch.ones(2)
    spec = ModelSpec(config_json="{}", generation_json=None, dtype="float32", eos_ids=(0,))
    _write_model_dir(str(tmp_path), spec, [("embed_tokens.weight", emb), ("norm.weight", other),
                                           ("lm_head.weight", emb), ("copy.weight", emb.clone())])
    out = load_file(tmp_path / "model.safetensors")
    assert sorted(out) == ["copy.weight", "embed_tokens.weight", "norm.weight"]
    assert torch.equal(out["embed_tokens.weight"], emb) and torch.equal(out["copy.weight"], emb)
