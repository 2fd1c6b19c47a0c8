import pytest

from aofunc.cli.main import COMMANDS, main


@pytest.mark.parametrize("command", [[]] + [[name] for name in COMMANDS])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: python -m aofunc")
    for name in COMMANDS if not command else []:
        assert name in printed


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
