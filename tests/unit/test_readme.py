"""The README stays true: its command-line reference is what the parsers say, and the quick start is there."""
from pathlib import Path

from scripts import cli_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_cli_reference_matches_every_parser():
    assert cli_reference.main(["--check"]) == 0, "run: python -m scripts.cli_reference"


def test_every_cli_option_appears_in_the_readme():
    import importlib

    text = README.read_text()
    for command, module in cli_reference.CLIS:
        parser = importlib.import_module(module).build_parser()
        for action in parser._actions:
            for opt in action.option_strings:
                assert opt in text, f"{command} {opt} is missing from README.md"


def test_quick_start_commands_are_documented():
    text = README.read_text()
    assert "pip install -r requirements-dev.txt && python -m eval.runner --dataset demo --provider offline" in text
    assert "\npython -m pytest\n" in text
    assert "## Differences from the paper's release" in text
