"""Every benchmark end to end on the real public files, with a tiny random model.

    python benchmarks/bench_eval_real.py                       # all six, small limits
    python benchmarks/bench_eval_real.py --only mmlu,bbq --limit 50

For each benchmark: a byte-level BPE tokenizer is trained on a sample of that benchmark's own
text, a freshly initialised `tiny_llama("nano")` is saved next to it in a temporary directory,
and `alignkit.eval.bench.run_bench` loads it from there and runs on the real file, exactly as
`alignkit bench NAME --model DIR --data PATH` does. The model is untrained, so the figures sit
near chance (MMLU 0.25, BBQ about 1/3, TruthfulQA MC1 about 1 / number of options, GSM8K and
HumanEval 0): the point is that readers, prompts, scoring, the sandbox and the JSON output all
work on the official formats, and how long they take.

`--limit` counts items (BBQ: per file); MMLU takes `--mmlu-limit` items from each of its 57
subjects. The toxicity benchmark needs a prompt file; none ships with the shared data, so the
first human turns of HH-RLHF harmless-base (red-team requests) are written to a temporary
JSON Lines file and used as prompts.

Data: ../shared/data next to the repository (or --data-dir). When it is absent the script says
so and exits 0. Prints a line per benchmark, then as the LAST line one JSON object with all
figures.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NAMES = ("gsm8k", "mmlu", "truthfulqa", "bbq", "humaneval", "toxicity")


def _jsonl(path: Path, n: int) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return rows


def _hh_prompts(data: Path, n: int, out: Path) -> Path:
    rows = []
    for rec in _jsonl(data / "hh-rlhf" / "harmless-base-test.jsonl.gz", n):
        first = rec["chosen"].split("\n\nHuman:", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
        rows.append({"prompt": first})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def plan(data: Path, args: argparse.Namespace, tmp: Path) -> dict[str, tuple[Path, int, dict, list[str]]]:
    """name -> (data path, limit, options, tokenizer training texts)."""
    from alignkit.eval.bench import bbq, humaneval, mmlu, truthfulqa

    gsm = _jsonl(data / "gsm8k" / "test.jsonl", 400)
    mmlu_texts = []
    for path in mmlu.subject_files(data / "mmlu"):
        for it in mmlu.read_mmlu_csv(path)[:10]:
            mmlu_texts.append(
                it["question"] + "\n" + "\n".join(map(str, it["choices"])) + "\nAnswer: A B C D"
            )
    tqa = truthfulqa.read_truthfulqa_mc(data / "truthfulqa")[:300]
    bbq_items = bbq.read_bbq(data / "bbq")[::10]
    tasks = humaneval.read_humaneval(data / "humaneval")
    prompts = _hh_prompts(data, max(args.limit, 1), tmp / "toxicity_prompts.jsonl")
    return {
        "gsm8k": (
            data / "gsm8k" / "test.jsonl",
            args.limit,
            {"shots": 5, "max_new_tokens": 32},
            [r["question"] + "\n" + r["answer"] for r in gsm],
        ),
        "mmlu": (data / "mmlu", args.mmlu_limit, {"shots": 5}, mmlu_texts),
        "truthfulqa": (
            data / "truthfulqa" / "mc_task.json",
            args.limit,
            {},
            [it["question"] + "\n" + "\n".join(a for a, _ in it["mc2"]) for it in tqa],
        ),
        "bbq": (
            data / "bbq",
            args.limit,
            {},
            [it["prompt"] + " " + " ".join(it["answers"]) for it in bbq_items],
        ),
        "humaneval": (
            data / "humaneval" / "HumanEval.jsonl.gz",
            args.humaneval_limit,
            {"max_new_tokens": 48, "timeout": 10.0},
            [t["prompt"] + (t["canonical_solution"] or "") for t in tasks],
        ),
        "toxicity": (
            prompts,
            args.limit,
            {"max_new_tokens": 20},
            [r["prompt"] for r in _jsonl(prompts, 10**6)],
        ),
    }


def _compact(name: str, metrics: dict) -> dict:
    """Headline figures: nested per-subject / per-category tables are summarised."""
    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    if name == "bbq":
        out["per_category"] = {
            c: {
                k: m[k]
                for k in ("accuracy_ambig", "accuracy_disambig", "bias_score_ambig", "bias_score_disambig")
            }
            for c, m in metrics["per_category"].items()
        }
    if name == "mmlu":
        out["subjects"] = len(metrics["per_subject"])
    return out


def _quiet_progress_bars() -> None:
    """Saving and loading the tiny models would print two progress bars per benchmark."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--only", default=",".join(NAMES), help="comma list of benchmarks")
    ap.add_argument("--limit", type=int, default=20, help="items per benchmark (BBQ: per file)")
    ap.add_argument("--mmlu-limit", type=int, default=2, help="items per MMLU subject (57 subjects)")
    ap.add_argument("--humaneval-limit", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary of each tokenizer")
    ap.add_argument("--out-dir", type=Path, help="keep each result JSON here (default: a temporary dir)")
    args = ap.parse_args()

    if not args.data_dir.is_dir():
        print(f"skipped: data folder {args.data_dir} is absent")
        print(json.dumps({"skipped": f"no data folder {args.data_dir}"}))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)} (valid: {', '.join(NAMES)})")

    import torch

    from alignkit.eval.bench import run_bench
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import save_model, tiny_llama

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    _quiet_progress_bars()
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-eval-") as tmp_name:
        tmp = Path(tmp_name)
        out_dir = args.out_dir or tmp
        todo = plan(args.data_dir, args, tmp)
        for name in names:
            data_path, limit, opts, texts = todo[name]
            t0 = time.monotonic()
            tok = train_bpe_tokenizer(texts, vocab_size=args.vocab)
            model_dir = save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, tmp / f"model-{name}")
            result = run_bench(name, model_dir, data_path, limit=limit, out=out_dir / f"{name}.json", **opts)
            metrics = _compact(name, result["metrics"])
            if name == "truthfulqa":
                metrics["mc1_chance"] = sum(1 / len(r["mc1_logprobs"]) for r in result["records"]) / len(
                    result["records"]
                )
            metrics["seconds"] = round(time.monotonic() - t0, 1)
            figures[name] = metrics
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in metrics.items()
                if not isinstance(v, dict)
            )
            print(f"{name:<11} {shown}", flush=True)
            if name == "bbq":
                for c, m in metrics["per_category"].items():
                    print(
                        f"{'':<11} {c}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if v is not None)
                    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
