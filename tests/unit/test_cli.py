"""key=value argument parsing shared by the console scripts."""

import pytest

from sd3train.cli import parse_key_values


def test_values_are_typed_by_the_override_grammar():
    args = parse_key_values(["seeds=[1,2]", "ema=false", "out=a/b", "shift=3.0"], prog="p",
                            allowed={"seeds", "ema", "out", "shift"})
    assert args == {"seeds": [1, 2], "ema": False, "out": "a/b", "shift": 3.0}


@pytest.mark.parametrize("argv, message", [
    (["colour=red"], "p: unknown argument(s) colour; valid: out"),
    ([], "p: out=... required"),
    (["out"], "p: arguments must be key=value, got out"),
])
def test_usage_errors_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_key_values(argv, prog="p", allowed={"out"}, required=("out",))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
