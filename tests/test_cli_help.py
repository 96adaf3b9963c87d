"""Every command line's --help prints and exits 0 (argparse formats help strings with %, so a stray "50%" in one
crashes --help: fast_bench's method labels did)."""

import importlib
from pathlib import Path

import pytest

from vlm_efficient import cli

EVALS = Path(__file__).resolve().parent.parent / "evals"
# every evals module run as `python -m` (it defines main(argv)), found by its source so a new one is covered
MODULES = sorted(".".join(path.relative_to(EVALS).with_suffix("").parts) for path in EVALS.rglob("*.py")
                 if "def main(argv" in path.read_text())  # fmt: skip


def _subcommands() -> list[str]:
    (sub,) = [a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    return [name for name, p in sub.choices.items() if p.add_help]


def test_the_modules_are_found():
    assert {"fast_bench", "hallucination_report", "testbed.lm_train"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_help(module, capsys):
    main = importlib.import_module(f"vlm_efficient.evals.{module}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_every_subcommand_help(capsys):
    names = _subcommands()
    assert {"compare", "methods", "eval", "sweep", "bench"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exit_:
            cli.main([name, "--help"])
        assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out, name
