"""Every command line's --help prints and exits 0 (argparse formats help strings with %, so a stray "50%" in one
crashes --help: fast_bench's method labels did)."""

import importlib

import pytest

from vlm_efficient import cli

MODULES = ["act_search", "dyvte_train", "fast_bench", "hallucination_report", "host_overhead", "kernel_bench",
           "kernel_checks", "sweep_diff", "sync_report", "testbed.evaluate", "testbed.lm_train", "testbed.train"]  # fmt: skip


def _subcommands() -> list[str]:
    (sub,) = [a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    return [name for name, p in sub.choices.items() if p.add_help]


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
