"""README's promises: two commands first, CI runs the test one, the quick start runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_exactly_two_commands():
    first, second = BLOCKS[0], BLOCKS[1]
    assert README.lstrip().startswith("# autoaccum")
    head = README.split("```")[0]
    assert head.strip() == "# autoaccum", "nothing but the title before the two commands"
    assert first[0] == second[0] == "bash"
    assert len(first[1].strip().splitlines()) == 1 and len(second[1].strip().splitlines()) == 1
    assert first[1].strip().endswith("autoaccum demo")
    assert second[1].strip().endswith("pytest -q")


def test_ci_runs_the_readme_test_command():
    command = BLOCKS[1][1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()


def test_quick_start_runs(capsys):
    code = next(body for lang, body in BLOCKS if lang == "python" and "import torch, autoaccum" in body)
    exec(compile(code, "README quick start", "exec"), {})
    out = capsys.readouterr().out
    assert "target 256 = 6 micro-batches [43 x4, 42 x2]" in out
    assert out.count(" micro-batches [") >= 2, "the probed plan under the tiny budget splits the batch too"
