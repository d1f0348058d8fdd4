"""`alignkit <command>`: argument parsing only; each command calls one function.

Training stages take `--config FILE.yaml` plus dotted `key=value` overrides, e.g.

    alignkit sft --config configs/sft.yaml train.lr=3e-4 data.path=my.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# command -> module with a `Config` dataclass and a `run(cfg) -> dict` function
STAGES = {
    "pretrain": ("alignkit.train.pretrain", "pre-train a causal LM (and its BPE tokenizer) on a text corpus"),
    "sft": ("alignkit.train.sft", "supervised fine-tuning on (prompt, response) pairs, loss on responses only"),
    "eval": ("alignkit.eval.gold", "generate on held-out world prompts and score them with the gold judge"),
    "reward": ("alignkit.train.reward", "train a reward model (Bradley-Terry); `alignkit reward eval ...` scores one, `alignkit reward mix ...` fits reward.ref_logprob_coef"),
    "dpo": ("alignkit.train.dpo", "DPO and its relatives (IPO, SLiC, cDPO, robust, RPO, SimPO, ORPO, KTO)"),
    "ppo": ("alignkit.train.ppo", "RLHF with PPO: reward minus a KL penalty to the reference, value head, GAE"),
    "grpo": ("alignkit.train.grpo", "GRPO: group-normalised advantages over several samples per prompt"),
    "iterate": ("alignkit.train.iterate", "iterated RLHF: sample pairs from the policy, judge them, retrain the reward model, PPO again; R rounds"),
    "rloo": ("alignkit.train.rloo", "RLOO: REINFORCE with a leave-one-out baseline over several samples per prompt"),
    "cai": ("alignkit.feedback.cai", "Constitutional AI: `cai revise` (critique + revision -> SFT data), `cai label` (AI preferences)"),
    "serve": ("alignkit.serve", "OpenAI-compatible chat-completions server (with log-probs) for a local model"),
    "compare": ("alignkit.eval.compare", "the RLHF-vs-DPO comparison table, measured: DPO and PPO from one SFT model, plus a DPO beta sweep"),
    "winrate": ("alignkit.eval.winrate", "win rate of model a against model b under a judge, with a 95%% interval"),
}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from alignkit.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError, UserError, FileNotFoundError, FileExistsError]
    from alignkit.atomic import FileProblem
    from alignkit.data.load import DataError
    from alignkit.feedback.constitution import ConstitutionError
    from alignkit.feedback.judges import EndpointError
    from alignkit.train.loop import TrainingDiverged

    errors += [DataError, EndpointError, ConstitutionError, FileProblem, TrainingDiverged]
    return tuple(errors)


# `alignkit STAGE WORD key=value ...`: a second entry point of the stage's module (config class, function)
SUBCOMMANDS = {
    "reward": {"eval": ("EvalConfig", "run_eval"), "mix": ("MixConfig", "run_mix")},
    "cai": {"revise": ("ReviseConfig", "revise"), "label": ("LabelConfig", "label")},
}

# flags some stages accept as a shorthand for `key=value` overrides
FLAGS = {
    "winrate": ("a", "b", "prompts", "judge", "world", "out", "human_labels"),
    "compare": ("demo", "out"),
    "ppo": ("launcher",),
    "grpo": ("launcher",),
    "rloo": ("launcher",),
    "iterate": ("launcher",),
}


# stages whose config has an `out` directory: they take --out, and their run folder records
# the resolved config (config.yaml) and how it was made (run.json)
OUT_STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "iterate", "rloo", "cai", "eval", "compare",
              "winrate")


def _add_stage(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    words = SUBCOMMANDS.get(name, {})
    if words:
        help_text += f" (subcommands: {', '.join(words)}; `alignkit {name} WORD --help` lists WORD's keys)"
    p = sub.add_parser(name, help=help_text, description=help_text,
                       epilog=f"`alignkit {name} --help` also lists every config key.")
    flags = FLAGS.get(name, ())
    if name in OUT_STAGES and "out" not in flags:
        flags = (*flags, "out")
    for flag in flags:
        p.add_argument(f"--{flag.replace('_', '-')}", dest=f"flag_{flag}", help=f"same as {flag}=VALUE")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit",
        description="Post-training alignment of causal language models. `alignkit COMMAND --help` "
                    "lists a training command's config keys.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, (_, help_text) in STAGES.items():
        _add_stage(sub, name, help_text)

    p = sub.add_parser("world", help="write the built-in world's data sets")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=10000, help="number of preference pairs")
    p.add_argument("--label-noise", type=float, default=0.1, help="probability a gold label is flipped")

    p = sub.add_parser("judge", help="score a response with the world's gold judge")
    p.add_argument("--prompt", required=True)
    p.add_argument("--response", required=True)
    p.add_argument("--seed", type=int, default=0, help="the world's seed")
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("inspect", help="detect a file's format, count records, report problems")
    q.add_argument("path")
    q.add_argument("--kind", choices=["sft", "preference", "unpaired", "prompt"])
    q.add_argument("--tokenizer", help="local tokenizer directory for length statistics")
    q.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q = dsub.add_parser("lint", help="data-quality report for preference pairs; optionally write a cleaned file")
    q.add_argument("path")
    q.add_argument("--out", help="directory for cleaned.jsonl, flagged.jsonl and lint.json")
    q.add_argument("--tokenizer", help="local tokenizer directory (token lengths, truncation counts)")
    q.add_argument("--max-prompt-len", type=int, default=256)
    q.add_argument("--max-len", type=int, default=512)
    q.add_argument("--near-threshold", type=float, default=0.8, help="similarity above which a pair is near-identical")
    q.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    q.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("bench", help="capability and safety benchmarks (GSM8K, MMLU, TruthfulQA, BBQ, HumanEval, toxicity)")
    p.add_argument("name", choices=["gsm8k", "mmlu", "truthfulqa", "bbq", "humaneval", "toxicity"])
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--data", required=True, help="the benchmark's file or folder in its official format")
    p.add_argument("--limit", type=int, default=0, help="score only the first N items (0: all)")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples (benchmarks that use them)")
    p.add_argument("--out", help="write metrics and per-item records to this JSON file")
    p.add_argument("options", nargs="*", metavar="key=value", help="benchmark options (see docs/evaluation.md)")

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in world")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests (about a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round2", action="store_true", help="also run iterate round 2 (stage ppo_r2: the round-1 "
                   "policy's answers gold-labelled, reward models retrained, PPO again); adds about as much time as "
                   "the other RLHF stages")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: the demo once per seed on one world, "
                                   "reported as mean, spread and every seed's figure")
    p.add_argument("--jobs", type=int, default=None,
                   help="stages trained at once, each in its own process with its share of torch's threads "
                        "(default: the cores, at most 4, and 1 with --quick, whose stages are too small for a "
                        "worker's start-up to pay; 1: one after another in this process)")

    from alignkit.label.cli import add_parser as add_label_parser

    add_label_parser(sub)
    return parser


def _run_stage(name: str, args: argparse.Namespace) -> None:
    from alignkit.config import load_config, to_dict

    module = importlib.import_module(STAGES[name][0])
    config_cls, run = module.Config, module.run
    if getattr(args, "subcommand", None):
        cls_name, fn_name = SUBCOMMANDS[name][args.subcommand]
        config_cls, run = getattr(module, cls_name), getattr(module, fn_name)
    names = [k[len("flag_"):] for k in vars(args) if k.startswith("flag_")]
    flags = [f"{k}={getattr(args, 'flag_' + k)}" for k in names if getattr(args, "flag_" + k) is not None]
    cfg = load_config(config_cls, args.config, flags + list(args.overrides))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    _quiet_libraries()
    from alignkit.runinfo import write_run_record

    # `reward eval`'s and `reward mix`'s out is a JSON file, not a run folder
    out = getattr(cfg, "out", None) if args.subcommand not in ("eval", "mix") else None
    if out and name in OUT_STAGES:
        write_run_record(Path(out), cfg, args.command_line, rerun=_rerun_command(name, args.subcommand, out))
    result = run(cfg)
    if out and name in OUT_STAGES:
        from alignkit.runinfo import write_model_card

        write_model_card(Path(out), f"{name} {args.subcommand or ''}".strip(), cfg, result)
    print(json.dumps(result, indent=2, default=str))


def _quiet_libraries() -> None:
    """transformers' per-load and per-save progress bars ("Loading weights", "Writing model
    shards") drown the stage's own output; alignkit reports progress itself."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _rerun_command(name: str, word: str | None, out: str) -> str:
    stage = f"{name} {word}" if word else name
    return f"alignkit {stage} --config {Path(out) / 'config.yaml'}"


def stage_help(name: str, word: str | None) -> str:
    """Every config key of a stage (or of its subcommand WORD): type, default, description;
    required keys first, then one example command."""
    from alignkit.config import describe

    module = importlib.import_module(STAGES[name][0])
    cls = getattr(module, SUBCOMMANDS[name][word][0]) if word else module.Config
    rows = describe(cls)
    rows.sort(key=lambda r: not r["required"])
    title = f"alignkit {name}{' ' + word if word else ''}"
    lines = [f"{title}: {STAGES[name][1]}", "",
             f"usage: {title} [--config FILE.yaml] [--print-config] [key=value ...]", ""]
    if name in SUBCOMMANDS and not word:
        lines += [f"subcommands: {', '.join(SUBCOMMANDS[name])} (`{title} WORD --help` lists WORD's keys)", ""]
    lines.append("config keys (set in the YAML file or as key=value; * = required):")
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        mark = "*" if r["required"] else " "
        default = "" if r["required"] else f" [default: {r['default']!r}]"
        lines.append(f" {mark} {r['key']:<{width}}  {r['type']}{default}")
        if r["doc"]:
            lines.append(f"   {'':<{width}}  {r['doc']}")
    req = " ".join(f"{r['key']}=..." for r in rows if r["required"])
    lines += ["", f"example: {title} --config configs/{name}.yaml {req}".rstrip(),
              "(`--print-config` shows the resolved values; Hugging Face names such as learning_rate are "
              "translated in the error message)"]
    return "\n".join(lines)


def _data(args: argparse.Namespace) -> int:
    tokenizer = None
    if args.tokenizer:
        from alignkit.models.load import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    on_error = "raise" if args.strict else "skip"
    if args.data_command == "lint":
        from alignkit.data.lint import format_lint, lint_file

        report = lint_file(args.path, out_dir=args.out, tokenizer=tokenizer, max_prompt_len=args.max_prompt_len,
                           max_len=args.max_len, on_error=on_error, near_threshold=args.near_threshold)
        print(json.dumps(report, default=str) if args.json else format_lint(report))
        return 0
    from alignkit.data.load import format_inspect, inspect_file

    report = inspect_file(args.path, args.kind, tokenizer, on_error=on_error)
    print(json.dumps(report, default=str) if args.json else format_inspect(report))
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in STAGES:
        _run_stage(args.command, args)
        return 0
    if args.command == "world":
        from alignkit.world import write_world

        summary = write_world(args.out, seed=args.seed, n_pairs=args.pairs, label_noise=args.label_noise)
        print(json.dumps(summary, indent=2, default=str))
        return 0
    if args.command == "judge":
        from alignkit.world import judge_cli

        verdict = judge_cli(args.prompt, args.response, seed=args.seed)
        if args.json:
            print(json.dumps(verdict))
        else:
            print(f"score {verdict['total']:.3f}  ({verdict.get('reason', '')})")
        return 0
    if args.command == "data":
        return _data(args)
    if args.command in ("bench", "demo"):
        _quiet_libraries()
    if args.command == "bench":
        from alignkit.eval.bench import parse_options, run_bench

        result = run_bench(args.name, args.model, args.data, args.limit, args.out, shots=args.shots,
                           **parse_options(args.name, args.options))
        print(json.dumps(result["metrics"], indent=2, default=str))
        return 0
    if args.command == "label":
        from alignkit.label.cli import run as run_label

        return run_label(args)
    if args.command == "demo":
        from alignkit.demo_jobs import default_jobs
        from alignkit.pipeline import demo, demo_seeds

        jobs = (1 if args.quick else default_jobs()) if args.jobs is None else args.jobs
        if jobs < 1:
            raise UserError(f"--jobs: expected a number of stages >= 1, got {jobs}")
        if args.seeds:
            try:
                seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
            except ValueError:
                raise UserError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
            summary = demo_seeds(args.out, seeds, quick=args.quick, round2=args.round2, jobs=jobs)
        else:
            summary = demo(args.out, quick=args.quick, seed=args.seed, round2=args.round2, jobs=jobs)
        print(f"wrote {summary['report']}")
        return 0
    raise UserError(f"unknown command {args.command}")


def _take_subcommand(argv: list[str]) -> str | None:
    """Remove and return a stage's subcommand word (`alignkit cai [flags] label [flags] k=v`): the
    first argument after the stage that is neither a flag nor --config's value. argparse alone
    would end the positional overrides at the first flag and reject the `k=v` after it."""
    words = SUBCOMMANDS.get(argv[0], {}) if argv else {}
    i = 1
    while i < len(argv):
        if argv[i] == "--config":
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return argv.pop(i) if argv[i] in words else None
    return None


def _flags_first(argv: list[str]) -> list[str]:
    """A stage's flags (with their values) before its `key=value` overrides: argparse ends the
    overrides at the first flag, so `alignkit sft --out D train.lr=1e-3` would reject train.lr."""
    if not argv or argv[0] not in STAGES:
        return argv
    flags, rest, i = [], [], 1
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" not in a and a not in ("--print-config", "--help"):
            flags += argv[i : i + 2]
            i += 2
            continue
        (flags if a.startswith("-") else rest).append(a)
        i += 1
    return [argv[0], *flags, *rest]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_line = ["alignkit", *argv]
    word = _take_subcommand(argv)
    if argv and argv[0] in STAGES and ("-h" in argv or "--help" in argv):
        print(stage_help(argv[0], word))
        return 0
    args = build_parser().parse_args(_flags_first(argv))
    args.subcommand = word
    args.command_line = command_line
    try:
        return _dispatch(args)
    except _user_errors() as e:
        msg = str(e)
        if isinstance(e, FileNotFoundError) and e.filename:
            msg = f"file not found: {e.filename}"
        print(f"alignkit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
