"""HumanEval (Chen et al. 2021): write a Python function from its signature and docstring.

    alignkit bench humaneval --model runs/sft/model --data ../shared/data/humaneval/HumanEval.jsonl.gz
    alignkit bench humaneval ... n_samples=20 temperature=0.8        # pass@1 and pass@10

Protocol: the model continues the task's `prompt` (imports, signature, docstring); the
continuation is cut before the first stop sequence ("\\ndef ", "\\nclass ", "\\nif __name__",
"\\nprint(", "\\n#", after decoding), so only the function body is kept. The program
`prompt + completion + test + check(entry_point)` then runs in a separate process (see
`alignkit.eval.bench.sandbox`: time limit, no network, throwaway directory). A sample passes only
when `check(entry_point)` returns normally, proven by a per-run nonce the harness writes after it
(OpenAI human-eval's rule): an exit of any kind, even `sys.exit(0)`, fails. The sandbox's
isolation mode is reported as `metrics["sandbox"]`.

pass@k is the unbiased estimator of Chen et al. 2021 (section 2.1, and their numerically stable
form): with n samples per task of which c pass,

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

averaged over tasks; it is reported for k in {1, 10, 100} up to n. Greedy decoding (the default)
needs n = 1; several samples need temperature > 0.

Model-written code is executed. docs/security.md says what the sandbox isolates on which
platform; run this benchmark inside a VM or container without network when the model is untrusted.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alignkit.config import ConfigError
from alignkit.data.load import DataError
from alignkit.eval.bench.common import GenOptions, as_lm, field, find_file, mean, read_jsonl, truncated_count
from alignkit.eval.bench.sandbox import isolation, run_program

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct)
    passes: 1 - C(n-c, k) / C(n, k), as the product prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def read_humaneval(path: str | Path) -> list[dict]:
    """Tasks {line, task_id, prompt, test, entry_point} from HumanEval JSON Lines (`.gz` or not)."""
    path = find_file(path, ("HumanEval.jsonl.gz", "HumanEval.jsonl"), "HumanEval")
    tasks = []
    for line, rec in read_jsonl(path):
        entry = field(rec, "entry_point", path, line)
        if not entry.isidentifier():
            raise DataError(path, f"entry_point {entry!r} is not a Python identifier", line)
        tasks.append(
            {
                "line": line,
                "task_id": field(rec, "task_id", path, line),
                "prompt": field(rec, "prompt", path, line),
                "test": field(rec, "test", path, line),
                "entry_point": entry,
                "canonical_solution": rec.get("canonical_solution"),
            }
        )
    if not tasks:
        raise DataError(path, "no records")
    return tasks


def build_program(task: dict, completion: str) -> str:
    """The file the sandbox runs: the prompt, the model's body, the tests, and the call to them."""
    return f"{task['prompt']}{completion}\n\n{task['test']}\n\ncheck({task['entry_point']})\n"


def run(
    model,
    tokenizer,
    data_path,
    limit: int = 0,
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    timeout: float = 10.0,
    workers: int = 2,
    seed: int = 0,
    batch_size: int = 8,
) -> dict:
    """pass@k over the tasks (k = 1, 10, 100 up to `n_samples`)."""
    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
    if n_samples > 1 and temperature <= 0:
        raise ConfigError("n_samples > 1 needs temperature > 0 (greedy decoding gives n identical samples)")
    tasks = read_humaneval(data_path)
    if limit > 0:
        tasks = tasks[:limit]
    lm = as_lm(model, tokenizer, batch_size)
    opts = GenOptions(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n_samples, seed=seed, stop=STOP
    )
    completions = lm.generate_texts([t["prompt"] for t in tasks], opts)
    jobs = [(t, comp) for t, samples in zip(tasks, completions) for comp in samples]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda job: run_program(build_program(*job), timeout=timeout), jobs))
    records = []
    for i, (task, samples) in enumerate(zip(tasks, completions)):
        mine = results[i * n_samples : (i + 1) * n_samples]
        c = sum(r.passed for r in mine)
        records.append(
            {
                "task_id": task["task_id"],
                "n": n_samples,
                "passed": c,
                "samples": [
                    {"completion": comp, "status": r.status, "error": r.stderr[-300:] if not r.passed else ""}
                    for comp, r in zip(samples, mine)
                ],
            }
        )
    metrics: dict = {
        f"pass@{k}": mean([pass_at_k(r["n"], r["passed"], k) for r in records]) for k in KS if k <= n_samples
    }
    metrics.update(
        {
            "n_tasks": len(records),
            "n_samples": n_samples,
            "temperature": temperature,
            "timeouts": sum(r.status == "timeout" for r in results),
            "sandbox": isolation(),
            "truncated_prompts": truncated_count(lm),
        }
    )
    return {"metrics": metrics, "records": records}
