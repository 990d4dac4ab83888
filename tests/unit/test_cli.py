"""The console script: every command has --help; bad roles are refused clearly."""

from __future__ import annotations

import pytest

from broadcast.runtime.cli import build_parser, main


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["run"],
        ["migrate"],
        ["topics"],
        ["stack"],
        ["stack", "up"],
        ["stack", "down"],
        ["stack", "status"],
        ["stack", "env"],
    ],
)
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: broadcast-server" in capsys.readouterr().out


def test_roles_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["run", "--roles", "api,relay"]).roles == {"api", "relay"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--roles", "api,bogus"])
    assert "roles must be" in capsys.readouterr().err
