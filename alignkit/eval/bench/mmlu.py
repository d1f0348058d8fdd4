"""MMLU (Hendrycks et al. 2021): four-way multiple choice over 57 subjects.

    alignkit bench mmlu --model runs/sft/model --data ../shared/data/mmlu --shots 5 --limit 50

Protocol: the prompt lists the question and its four choices as "A. ...", "B. ...", and ends
with "Answer:"; the model's answer is the letter whose continuation " A" / " B" / " C" / " D" has
the highest log-likelihood. Accuracy is reported over all scored items (micro) and per subject
(the subject is the file name without "_test.csv"), plus the mean of the subject accuracies
(macro), which is the figure most papers quote as "MMLU".

Few-shot exemplars come from the same subject. The official dev split (5 items per subject) is
used when a `<subject>_dev.csv` file sits next to the test file; the data shipped in
../shared/data has no dev split, so the exemplars are then the subject's other test items (the
first k that are not the item being scored). Scores from that setting are close to, but not
the same protocol as, published 5-shot numbers. The header line before the exemplars is our own
wording, not the original one, which also moves scores slightly.

`limit` counts items per subject: `--limit 20` scores the first 20 of every subject.
"""

from __future__ import annotations

import csv
from pathlib import Path

from alignkit.config import ConfigError
from alignkit.data.load import DataError
from alignkit.eval.bench.common import argmax, as_lm, mean, truncated_count

LETTERS = ("A", "B", "C", "D")


def subject_of(path: Path) -> str:
    """The subject of a file: "high_school_biology_test.csv" -> "high_school_biology"."""
    stem = path.name[: -len(".csv")] if path.name.endswith(".csv") else path.stem
    for split in ("_test", "_dev", "_val"):
        if stem.endswith(split):
            return stem[: -len(split)]
    return stem


def read_mmlu_csv(path: str | Path) -> list[dict]:
    """Items {line, question, choices, answer} of one headerless MMLU CSV
    (question, A, B, C, D, answer letter). A bad row is a `DataError` naming file:line (the line
    where the row starts; quoted fields may span lines)."""
    path = Path(path)
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        start = 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 6:
                raise DataError(
                    path, f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}", line
                )
            answer = row[5].strip().upper()
            if answer not in LETTERS:
                raise DataError(path, f"answer should be one of A/B/C/D, got {row[5]!r}", line)
            if not row[0].strip():
                raise DataError(path, "empty question", line)
            items.append(
                {"line": line, "question": row[0], "choices": row[1:5], "answer": LETTERS.index(answer)}
            )
    if not items:
        raise DataError(path, "no records")
    return items


def subject_files(data_path: str | Path) -> list[Path]:
    p = Path(data_path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"MMLU data not found: {p}")
    files = sorted(p.glob("*_test.csv")) or sorted(f for f in p.glob("*.csv") if not f.stem.endswith("_dev"))
    if not files:
        raise FileNotFoundError(f"{p}: no MMLU '*_test.csv' files here")
    return files


def format_question(item: dict) -> str:
    lines = [item["question"].strip()]
    lines += [f"{letter}. {str(choice).strip()}" for letter, choice in zip(LETTERS, item["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def build_prompt(subject: str, item: dict, exemplars: list[dict]) -> str:
    header = f"Multiple choice questions about {subject.replace('_', ' ')}, each followed by its answer.\n\n"
    shots = "".join(f"{format_question(e)} {LETTERS[e['answer']]}\n\n" for e in exemplars)
    return header + shots + format_question(item)


def run(model, tokenizer, data_path, limit: int = 0, shots: int = 5, batch_size: int = 8) -> dict:
    """Accuracy overall (micro), macro over subjects, and per subject."""
    if shots < 0:
        raise ConfigError(f"shots must be >= 0, got {shots}")
    lm = as_lm(model, tokenizer, batch_size)
    records: list[dict] = []
    per_subject: dict[str, dict] = {}
    shot_source = "test"
    for path in subject_files(data_path):
        subject = subject_of(path)
        items = read_mmlu_csv(path)
        dev_path = path.with_name(f"{subject}_dev.csv")
        dev = read_mmlu_csv(dev_path) if shots and dev_path.is_file() else None
        if dev is not None:
            shot_source = "dev"
        scored = items[:limit] if limit > 0 else items
        prompts = []
        for i, item in enumerate(scored):
            pool = dev if dev is not None else [e for j, e in enumerate(items[: shots + 1]) if j != i][:shots]
            prompts.append(build_prompt(subject, item, pool[:shots]))
        scores = lm.loglikelihood([(p, f" {letter}") for p in prompts for letter in LETTERS])
        correct = []
        for i, item in enumerate(scored):
            s = scores[4 * i : 4 * i + 4]
            pred = argmax(s)
            correct.append(pred == item["answer"])
            records.append(
                {
                    "subject": subject,
                    "line": item["line"],
                    "gold": LETTERS[item["answer"]],
                    "prediction": LETTERS[pred],
                    "correct": pred == item["answer"],
                    "logprobs": s,
                }
            )
        per_subject[subject] = {"accuracy": mean(correct), "n": len(correct)}
    accs = [v["accuracy"] for v in per_subject.values() if v["accuracy"] is not None]
    metrics = {
        "accuracy": mean([r["correct"] for r in records]),
        "accuracy_macro": mean(accs),
        "n": len(records),
        "shots": shots,
        "shot_source": shot_source if shots else None,
        "per_subject": per_subject,
        "truncated_prompts": truncated_count(lm),
    }
    return {"metrics": metrics, "records": records}
