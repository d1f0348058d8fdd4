"""The command line: bad input gives one clear line and exit code 2; the quick demo runs end to end."""

import json
from pathlib import Path

import pytest

from alignkit.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n', ":2: invalid JSON"),
        ('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n', ":3: "),
        ('{"prompt": "a", "response": "   "}\n', ":1: "),
        ('{"prompt": "a", "response": 7}\n', ":1: "),
        ('{"text": "no format I know"}\n', "text"),
    ],
)
def test_data_inspect_bad_input_is_one_clear_line(tmp_path, capsys, content, expected):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    code, out, err = run_cli(capsys, "data", "inspect", str(f), "--kind", "sft", "--strict")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert str(f) in lines[0] and expected in lines[0]


def test_data_inspect_skip_mode_reports_lines(tmp_path, capsys):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n{"prompt": "d", "response": "e"}\n')
    code, out, _ = run_cli(capsys, "data", "inspect", str(f), "--json")
    report = json.loads(out)
    assert code == 0
    assert report["records"] == 2 and report["skipped"] == 1
    assert report["format"] == "prompt_response"
    assert sum(report["skip_reasons"].values()) == 1
    assert report["skipped_lines"][0]["line"] == 2


def test_world_and_judge_commands(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "world", "--out", str(tmp_path / "w"), "--pairs", "200")
    assert code == 0 and (tmp_path / "w" / "preferences.jsonl").is_file()
    with open(tmp_path / "w" / "preferences.jsonl") as f:
        assert sum(1 for _ in f) == 200
    prompt = "Human: What is 2 plus 3?\nAssistant:"
    _, good, _ = run_cli(capsys, "judge", "--prompt", prompt, "--response", " 2 plus 3 is 5.", "--json")
    _, rude, _ = run_cli(capsys, "judge", "--prompt", prompt, "--response", " idk google it", "--json")
    assert json.loads(good)["total"] > json.loads(rude)["total"]


def test_stage_config_errors_name_the_key(capsys):
    code, _, err = run_cli(capsys, "sft", "train.lrr=1")
    assert code == 2 and "'train.lrr'" in err and "'train.lr'" in err
    code, _, err = run_cli(capsys, "sft", "data.path=/nonexistent/file.jsonl", "model.path=/nonexistent/model")
    assert code == 2 and "/nonexistent" in err


def test_print_config(capsys):
    code, out, _ = run_cli(capsys, "sft", "--print-config", "train.lr=0.5")
    assert code == 0 and "lr: 0.5" in out


def test_quick_demo_end_to_end(tmp_path, capsys):
    """world -> tokenizer + pre-training -> SFT -> gold eval, in the test's time budget."""
    code, _, _ = run_cli(capsys, "demo", "--out", str(tmp_path / "demo"), "--quick", "--round2")
    assert code == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for stage in ("base", "sft"):
        s = summary["stages"][stage]
        assert {"gold_score", "wall_s", "peak_mem_mb", "per_category"} <= set(s)
        assert 0.0 <= s["gold_score"] <= 1.0 and s["peak_mem_mb"] > 0
    # even 40 SFT steps teach the answer format that 60 pre-training steps cannot
    assert summary["stages"]["sft"]["gold_score"] > summary["stages"]["base"]["gold_score"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| sft |" in report and "| base |" in report
    # a quick run says at the top that it is a smoke test, in both reports
    assert "Smoke test" in report.split("| stage |")[0]
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "<b>Smoke test</b>" in page.split("<table>")[0]
    # PPO scores with the mean of 3 reward models (seeds 0, 1, 2); the over-optimised run with one
    members = summary["stages"]["reward"]["ensemble"]
    assert len(members) == 2 and all(Path(m, "model.safetensors").is_file() for m in members)
    assert summary["stages"]["ppo"]["models"][-3:] == ["reward model", "reward model 2", "reward model 3"]
    assert summary["stages"]["overopt"]["models"][-1] == "reward model"
    # the reward models also train on the SFT model's own gold-labelled pairs: 10,000 world pairs + those
    onpolicy = summary["stages"]["reward"]["onpolicy_pairs"]
    assert onpolicy["sampled"] == 64 and onpolicy["pairs"] == sum(onpolicy["by_category"].values())
    lines = (tmp_path / "demo" / "reward_data.jsonl").read_text().splitlines()
    assert len(lines) == 2000 + onpolicy["pairs"]  # --quick writes 2,000 world pairs
    # iterate round 2: gold per round, and round 2 against round 1
    rounds = summary["rounds"]
    assert [r["stage"] for r in rounds] == ["sft", "ppo", "ppo_r2"]
    assert rounds[2]["gold_score"] == summary["stages"]["ppo_r2"]["gold_score"]
    assert 0.0 <= rounds[2]["win_rate_vs_round1"]["rate"] <= 1.0


def test_stage_subcommand_takes_flags_and_overrides_after_it(capsys):
    """`alignkit cai label --config F k=v`: argparse alone ends the positional overrides at the
    first flag and rejects the k=v after it."""
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "cai.yaml")
    code, out, _ = run_cli(capsys, "cai", "label", "--config", cfg, "--print-config", "policy=p", "feedback=f")
    assert code == 0 and "policy: p" in out and "feedback: f" in out
    code, out, _ = run_cli(capsys, "reward", "eval", "--print-config", "model=m")
    assert code == 0 and "model: m" in out
    code, out, _ = run_cli(capsys, "cai", "--config", cfg, "label", "policy=p", "--print-config")  # word after a flag
    assert code == 0 and "policy: p" in out
