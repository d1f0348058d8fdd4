"""The GPU checks of issues 11 and 16, as one prepared run (on a lent CUDA machine; `--small`
runs the same code on CPU in seconds, to try the script before a GPU is spent on it).

    PYTHONPATH=$PWD python3 scripts/gpu_check.py --out DIR           # CUDA, bf16
    PYTHONPATH=$PWD python3 scripts/gpu_check.py --out DIR --small   # CPU, tiny shapes, fp32

1. Chunked head at a 0.5B shape (a Llama with Qwen2.5-0.5B's sizes: hidden 896, 24 layers, 14
   heads / 2 KV heads, MLP 4864, vocabulary 151,936, tied head), bf16: one SFT step (forward +
   backward of the response-token loss) on 4 x 2,048 tokens, with the chunked head
   (train.logprob_chunk default) and with full logits: peak CUDA memory (max_memory_allocated
   above the model and its gradients) and median step time; loss difference.
   `rl`: the same for the RL update's policy pass (GRPO/PPO: response log-probs with a gradient,
   entropies without) on 4 x (512 prompt + 1,536 response) tokens.
2. Sampling on the same model: alignkit's HF sampler (KV cache, seeded rows) vs transformers'
   `generate` (sampling, same lengths): new tokens per second.
3. The stages through the CLI on a ~100M-parameter Llama (hidden 768, 12 layers, vocabulary
   32,000) and the built-in world, bf16: SFT (30 steps) and GRPO on the gold judge (3
   iterations), each in one process and under `torchrun --nproc_per_node 1` with
   train.strategy=fsdp2 (NCCL): tokens/s, rollout tokens/s, and the metric differences.

Writes DIR/gpu_check.json; its last line on stdout is the same JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _llama(vocab: int, hidden: int, layers: int, heads: int, kv: int, mlp: int, tied: bool, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=mlp, tie_word_embeddings=tied,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _measure(model, device, loss_of, steps: int) -> dict:
    """Median seconds of `steps` (loss, backward) repeats after a warm-up, peak CUDA memory above
    the model and its (kept) gradients, and the last loss; bf16 autocast on CUDA."""
    times, loss = [], None
    model.zero_grad(set_to_none=True)
    base = 0
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value = loss_of()
        value.backward()
        _sync(device)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
        loss = float(value.detach())
        model.zero_grad(set_to_none=False)  # the gradients stay allocated: the peak above them
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return {"step_s": statistics.median(times), "peak_mb_above_model": peak, "loss": loss}


def _ratios(out: dict, tokens: int) -> dict:
    for v in out.values():
        v["tokens_per_s"] = tokens / v["step_s"]
    out["loss_abs_diff"] = abs(out["chunked"]["loss"] - out["full"]["loss"])
    out["peak_ratio_chunked_vs_full"] = out["chunked"]["peak_mb_above_model"] / out["full"]["peak_mb_above_model"]
    out["speed_ratio_chunked_vs_full"] = out["full"]["step_s"] / out["chunked"]["step_s"]
    return out


def chunked_vs_full(model, device, rows: int, length: int, steps: int, blocks: tuple[int, ...] = ()) -> dict:
    """One SFT step (loss, backward) per repeat, chunked head vs full logits; `blocks`: more
    chunked runs with chunked.MAX_BLOCK (logit elements per chunk) set to each value."""
    from alignkit.models import chunked
    from alignkit.models.chunked import DEFAULT_CHUNK, sft_loss_of_model

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : length // 4] = -100  # a quarter of every row is prompt

    def loss_of(chunk):
        def f():
            loss_sum, n = sft_loss_of_model(model, ids, mask, labels, chunk)
            return loss_sum / n
        return f

    out = {}
    default_block = chunked.MAX_BLOCK
    runs = [("chunked", DEFAULT_CHUNK, default_block), ("full", 0, default_block)]
    runs += [(f"chunked_block_2e{b.bit_length() - 1}", 1 << 20, b) for b in blocks]
    for name, chunk, block in runs:
        chunked.MAX_BLOCK = block
        out[name] = _measure(model, device, loss_of(chunk), steps)
    chunked.MAX_BLOCK = default_block
    out = _ratios(out, rows * length)
    out["default_block"] = default_block
    return out


def rl_chunked_vs_full(model, device, rows: int, prompt: int, response: int, steps: int) -> dict:
    """The RL update's policy pass (GRPO/PPO: response log-probs with a gradient and entropies
    without one, `rollout.response_token_stats`), loss -mean(logp * advantage), chunked head vs
    full (B, T, V) logits."""
    from alignkit.models.chunked import DEFAULT_CHUNK
    from alignkit.train.rollout import response_token_stats

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (rows, prompt + response), generator=g).to(device)
    mask = torch.ones_like(ids)
    adv = torch.randn(rows, response, generator=g).to(device)

    def loss_of(chunk):
        def f():
            lp, ent = response_token_stats(model, ids, mask, ids[:, prompt:], 1.0, chunk, entropy=True)
            return -(lp * adv).mean() + 0.0 * ent.mean()
        return f

    out = {name: _measure(model, device, loss_of(chunk), steps) for name, chunk in (("chunked", DEFAULT_CHUNK), ("full", 0))}
    return _ratios(out, rows * (prompt + response))


def sampling(model, device, prompts: int, prompt_len: int, new: int, others: dict | None = None,
             rounds: int = 3) -> dict:
    """alignkit's HF sampler (and `others`: name -> another HFGenerator class) vs transformers'
    `generate`, sampling `new` tokens per prompt, all under the same bf16 autocast on CUDA:
    medians over `rounds` after a warm-up round."""
    from alignkit.models.generate import HFGenerator, SamplingParams

    model.eval()
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, model.config.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(prompts)]
    params = SamplingParams(max_new_tokens=new, stop_at_eos=False, row_seeds=tuple(range(prompts)))
    ids = torch.tensor(rows, device=device)

    def hf_generate():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=new,
                              min_new_tokens=new, top_k=0, top_p=1.0, pad_token_id=0)

    samplers = {"alignkit": HFGenerator, **(others or {})}
    names = [*samplers, "hf_generate"]
    times: dict[str, list[float]] = {n: [] for n in names}
    res: dict = {"prompts": prompts, "new_tokens": new}
    # the first full-size call of a process is ~3x slower on CUDA (kernel selection, allocator
    # growth): one untimed full-size call each, then `rounds` timed rounds in alternating order
    for r in range(rounds + 1):
        for name in (names if r % 2 else names[::-1]):
            cls = samplers.get(name)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                _sync(device)
                t0 = time.perf_counter()
                got = cls(model, batch_size=prompts).generate(rows, params) if cls is not None else hf_generate()
                _sync(device)
                wall = time.perf_counter() - t0
            n = sum(len(x) for x in got) if cls is not None else int((got.shape[1] - prompt_len) * got.shape[0])
            if r:
                times[name].append(n / wall)
    for name in names:
        res[f"{name}_tokens_per_s"] = statistics.median(times[name])
        res[f"{name}_tokens_per_s_rounds"] = times[name]
    for name in samplers:
        res[f"{name}_vs_hf_generate"] = res[f"{name}_tokens_per_s"] / res["hf_generate_tokens_per_s"]
    model.train()
    return res


def _cli(args: list[str], torchrun: bool, env: dict) -> float:
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun else [sys.executable]
    t0 = time.perf_counter()
    done = subprocess.run([*pre, "-m", "alignkit.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - t0


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def stages(root: Path, small: bool) -> dict:
    """SFT and GRPO through the CLI, one process vs torchrun + FSDP2 (1 rank)."""
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import save_model
    from alignkit.world import write_world

    write_world(root / "world", n_pairs=256, n_sft=512, n_pretrain=64, n_eval=16, n_pairs_eval=8)
    rows = [json.loads(x) for x in (root / "world" / "sft.jsonl").read_text().splitlines()]
    texts = [r["prompt"] + r["response"] for r in rows]
    tok = train_bpe_tokenizer(texts, vocab_size=512 if small else 4096)
    dims = (1024, 64, 2, 4, 2, 256) if small else (32000, 768, 12, 12, 12, 2048)
    model = _llama(*dims, tied=False, dtype=torch.float32, device=torch.device("cpu"))
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    save_model(model, tok, root / "base")
    n_params = sum(p.numel() for p in model.parameters())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    precision = "fp32" if small else "bf16"
    res: dict = {"params_m": round(n_params / 1e6, 1)}
    sft = ["sft", f"model.path={root / 'base'}", f"data.path={root / 'world' / 'sft.jsonl'}", "train.lr=3e-4",
           f"train.max_steps={4 if small else 30}", "train.batch_size=16", f"train.precision={precision}",
           "train.log_every=1", "train.progress=false", "train.tensorboard=false"]
    for name, extra, tr in (("sft", [], False), ("sft_fsdp2", ["train.strategy=fsdp2"], True)):
        wall = _cli([*sft, *extra, "--out", str(root / name)], tr, env)
        rows = [r for r in _rows(root / name) if "loss" in r]
        res[name] = {"wall_s": round(wall, 1), "last_loss": rows[-1]["loss"],
                     "tokens_per_s": rows[-1].get("tokens_per_s", rows[-1].get("tok_per_s"))}
    a, b = [r["loss"] for r in _rows(root / "sft") if "loss" in r], [r["loss"] for r in _rows(root / "sft_fsdp2") if "loss" in r]
    res["sft_fsdp2_max_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
    grpo = ["grpo", f"model.path={root / 'sft' / 'final'}", f"world={root / 'world'}", "reward.source=gold",
            f"iterations={2 if small else 3}", f"prompts_per_step={4 if small else 32}", "group_size=4",
            f"rollout.max_new_tokens={8 if small else 64}", f"train.batch_size={8 if small else 64}",
            f"train.precision={precision}", "train.progress=false", "train.tensorboard=false", "eval_limit=8"]
    for name, extra, tr in (("grpo", [], False), ("grpo_fsdp2", ["train.strategy=fsdp2"], True)):
        wall = _cli([*grpo, *extra, "--out", str(root / name)], tr, env)
        rows = _rows(root / name)
        res[name] = {"wall_s": round(wall, 1), "rollout_s": [r.get("rollout_s") for r in rows],
                     "iteration_s": [r.get("iteration_s") for r in rows], "reward": [r.get("reward") for r in rows]}
        n_rows = (4 if small else 32) * 4  # prompts_per_step x group_size
        res[name]["rollout_tokens_per_s"] = [round(r["response_length"] * n_rows / r["rollout_s"], 1) for r in rows]
    first = [_rows(root / n)[0] for n in ("grpo", "grpo_fsdp2")]
    keys = [k for k, v in first[0].items() if isinstance(v, float) and k in first[1] and not k.endswith("_s")]
    res["grpo_fsdp2_first_iteration_max_rel_diff"] = max(
        abs(first[0][k] - first[1][k]) / max(1e-8, abs(first[0][k])) for k in keys)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--small", action="store_true", help="CPU, tiny shapes: try the script")
    ap.add_argument("--parts", default="head,rl,sampling,stages")
    ap.add_argument("--blocks", default="", help="comma-separated chunked.MAX_BLOCK values to try too, e.g. 134217728")
    ap.add_argument("--sampler-file", default="", help="another generate.py whose HFGenerator is timed too")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    import transformers

    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "transformers": transformers.__version__}
    parts = args.parts.split(",")
    if "head" in parts or "sampling" in parts or "rl" in parts:
        dims = (4096, 64, 2, 4, 2, 256) if args.small else (151936, 896, 24, 14, 2, 4864)
        model = _llama(*dims, tied=True, dtype=torch.float32, device=device)  # fp32 master weights, bf16 autocast
        res["model_0p5b_params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        if "head" in parts:
            res["head"] = chunked_vs_full(model, device, rows=2 if args.small else 4, length=128 if args.small else 2048,
                                          steps=2 if args.small else 5,
                                          blocks=tuple(int(x) for x in args.blocks.split(",") if x))
            print(json.dumps({"head": res["head"]}), flush=True)
        if "rl" in parts:
            res["rl"] = rl_chunked_vs_full(model, device, rows=2 if args.small else 4, prompt=32 if args.small else 512,
                                           response=96 if args.small else 1536, steps=2 if args.small else 5)
            print(json.dumps({"rl": res["rl"]}), flush=True)
        if "sampling" in parts:
            others = {}
            if args.sampler_file:
                import importlib.util

                spec = importlib.util.spec_from_file_location("other_generate", args.sampler_file)
                mod = importlib.util.module_from_spec(spec)
                sys.modules["other_generate"] = mod  # its dataclasses look their module up
                spec.loader.exec_module(mod)
                others["other"] = mod.HFGenerator
            res["sampling"] = sampling(model, device, prompts=4 if args.small else 64, prompt_len=16 if args.small else 128,
                                       new=8 if args.small else 128, others=others)
            print(json.dumps({"sampling": res["sampling"]}), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "stages" in parts:
        res["stages"] = stages(out / "runs", args.small)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
