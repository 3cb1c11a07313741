"""The ``sigmoid-moe`` command line: the demo runs for real and bad input is a clean error."""

import re

import pytest

from sigmoid_moe.cli import main


def test_demo_prints_a_routing_table_and_balances(capsys):
    argv = ["demo", "--tokens", "512", "--experts", "8", "--groups", "2", "--topk-groups", "1"]
    assert main([*argv, "--steps", "100", "--rate", "1e-2", "--show", "3"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+) \| (.+)$", out, flags=re.M)
    assert [int(t) for t, _ in rows] == [0, 1, 2]
    for _, pairs in rows:
        ids = [int(e) for e in re.findall(r"(\d+) \(", pairs)]
        weights = [float(w) for w in re.findall(r"\(([\d.]+)\)", pairs)]
        assert len(ids) == 2 and len(set(ids)) == 2
        assert len({e // 4 for e in ids}) == 1  # topk_groups=1: one group of 4 experts
        assert abs(sum(weights) - 1.0) < 2e-3
    before = float(re.search(r"^bias 0\s+([\d.]+)", out, flags=re.M).group(1))
    after = float(re.search(r"^after 100 sign updates\s+([\d.]+)", out, flags=re.M).group(1))
    assert after < before / 2


def test_bad_config_is_a_clean_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--experts", "4", "--top-k", "5", "--groups", "1", "--topk-groups", "1"])
    assert exc.value.code == 2
    assert "top_k=5 exceeds num_experts=4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--experts", "4x"], "argument --experts: invalid int value: '4x'"),
        (["demo", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["train"], "invalid choice: 'train'"),
    ],
)
def test_bad_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_harness_does_not_know_the_top_level_command_line():
    # The import circle cli -> harness/cli -> harness/multiprocess -> cli is gone: a job's
    # processes start as the command itself (cli.py builds that command line), and no
    # harness module imports sigmoid_moe.cli.
    import ast
    import pathlib

    import sigmoid_moe.harness

    for path in pathlib.Path(sigmoid_moe.harness.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert "sigmoid_moe.cli" not in names, path.name
