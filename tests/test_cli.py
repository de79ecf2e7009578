"""The top-level ``mergeflow`` command: ``--help`` lists every command without importing the heavy ones."""

import subprocess
import sys

from click.testing import CliRunner

from mergeflow.cli import LazyGroup, main


def test_lazy_help_matches_the_commands_own():
    group = main
    assert isinstance(group, LazyGroup)
    for name in LazyGroup.lazy:
        cmd = group.get_command(None, name)
        assert cmd.get_short_help_str(10**6) == LazyGroup.lazy_help[name], name


def test_help_lists_every_command():
    out = CliRunner().invoke(main, ["--help"]).output
    for name in ("check", "demo", "eval", "merge", "methods", "zoo"):
        assert f"  {name} " in out


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom mergeflow.cli import main\n"
            "assert CliRunner().invoke(main, ['--help']).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'mergeflow.zoo.commands') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
