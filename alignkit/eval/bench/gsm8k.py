"""GSM8K (Cobbe et al. 2021): grade-school maths word problems, exact match on the final number.

    alignkit bench gsm8k --model runs/sft/model --data ../shared/data/gsm8k/test.jsonl --shots 5

Protocol: a chain-of-thought few-shot prompt, greedy generation, then the final number is taken
from the generation ("#### N" when the model writes it, else the last number in the text) and
compared with the gold "#### N" after normalisation (thousands commas, "$", trailing zeros of a
decimal: "1,600" == "1600" == "1600.00").

The k exemplars are the file's own first k items (question and worked answer, with the
calculator annotations "<<48/2=24>>" removed); those items are then not scored, so with k shots
the first scored item is item k+1 and `n` counts only scored items.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from alignkit.config import ConfigError
from alignkit.data.load import DataError
from alignkit.eval.bench.common import GenOptions, as_lm, field, find_file, read_jsonl, truncated_count

STOP = ("\n\n", "Question:")
"""Generation ends at a blank line or where the model starts a new exemplar."""

_CALC = re.compile(r"<<[^<>]*>>")
# a number with thousands commas, a plain integer/decimal, or a bare decimal fraction
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
_FINAL = re.compile(r"####\s*\$?\s*(" + _NUMBER.pattern + ")")


def normalize_number(text: str) -> str | None:
    """Canonical string of a number ("1,600.50" -> "1600.5", "18.0" -> "18", "$7" -> "7");
    None when `text` is not a number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(generation: str) -> str | None:
    """The model's final number: after the first "####" when one is followed by a number,
    otherwise the last number in the text; normalised. None when there is no number."""
    m = _FINAL.search(generation)
    if m:
        return normalize_number(m.group(1))
    numbers = _NUMBER.findall(generation)
    return normalize_number(numbers[-1]) if numbers else None


def gold_answer(answer: str) -> str | None:
    """The normalised number after the last "####" of a GSM8K answer (None if absent)."""
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1])


def read_gsm8k(path: str | Path) -> list[dict]:
    """Items {line, question, answer, gold} from GSM8K JSON Lines (`question`, `answer` ending in
    "#### N"); a bad record is a `DataError` naming file:line."""
    path = find_file(path, ("test.jsonl", "test.jsonl.gz"), "GSM8K")
    items = []
    for line, rec in read_jsonl(path):
        question = field(rec, "question", path, line)
        answer = field(rec, "answer", path, line)
        gold = gold_answer(answer)
        if gold is None:
            raise DataError(path, "field 'answer' does not end in '#### <number>'", line)
        items.append({"line": line, "question": question, "answer": answer, "gold": gold})
    if not items:
        raise DataError(path, "no records")
    return items


def format_exemplar(item: dict) -> str:
    worked = _CALC.sub("", item["answer"]).strip()
    return f"Question: {item['question']}\nAnswer: {worked}\n\n"


def build_prompt(question: str, exemplars: list[dict]) -> str:
    return "".join(format_exemplar(e) for e in exemplars) + f"Question: {question}\nAnswer:"


def run(
    model,
    tokenizer,
    data_path,
    limit: int = 0,
    shots: int = 5,
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> dict:
    """Exact-match accuracy of the final number, greedy, with `shots` exemplars from the file."""
    items = read_gsm8k(data_path)
    if shots < 0 or shots >= len(items):
        raise ConfigError(f"shots must be in [0, {len(items) - 1}] for this file, got {shots}")
    exemplars, scored = items[:shots], items[shots:]
    if limit > 0:
        scored = scored[:limit]
    lm = as_lm(model, tokenizer, batch_size)
    prompts = [build_prompt(it["question"], exemplars) for it in scored]
    opts = GenOptions(max_new_tokens=max_new_tokens, stop=STOP)
    generations = [samples[0] for samples in lm.generate_texts(prompts, opts)]
    records = []
    for it, gen in zip(scored, generations):
        pred = extract_answer(gen)
        records.append(
            {
                "line": it["line"],
                "question": it["question"],
                "gold": it["gold"],
                "prediction": pred,
                "correct": pred is not None and pred == it["gold"],
                "generation": gen,
            }
        )
    n = len(records)
    metrics = {
        "exact_match": sum(r["correct"] for r in records) / n if n else None,
        "n": n,
        "shots": shots,
        "no_number": sum(r["prediction"] is None for r in records),
        "truncated_prompts": truncated_count(lm),
    }
    return {"metrics": metrics, "records": records}
