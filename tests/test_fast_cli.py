"""Fast to say no: `import hybridize`, `hybridize --help`, `--version`, every subcommand's `--help` and usage errors
import none of the heavy libraries (checked in `sys.modules` of a fresh process, not timed); the CLI's option
defaults, read from the config sources, equal the configs'; the lazy package keeps its public names and registers
the hybrid with transformers in any import order."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import typer.main
from tiny import tiny_hybrid, word_tokenizer

import hybridize
from hybridize import cli

HEAVY = ("torch", "transformers", "lm_eval", "ot", "matplotlib", "datasets")


def _python(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_importing_the_package_and_the_cli_imports_no_heavy_module():
    result = _python(
        f"""
        import sys
        import hybridize, hybridize.cli
        print(sorted(name for name in {HEAVY!r} if name in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_version_and_usage_errors_import_no_heavy_module(tmp_path):
    commands = sorted(typer.main.get_command(cli.app).commands)
    runs = [["--help"], ["--version"], ["convert", "llama", "--ratio", "half", "-o", tmp_path / "x"], ["convert"]]
    runs += [[command, "--help"] for command in commands]
    result = _python(
        f"""
        import contextlib, io, json, sys
        from hybridize.cli import main

        report = []
        for args in json.loads(sys.argv[1]):
            sys.argv = ["hybridize", *args]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main()
                except SystemExit as exit_:
                    code = exit_.code
            report.append([args, code, sorted(name for name in {HEAVY!r} if name in sys.modules)])
        print(json.dumps(report))
        """,
        json.dumps([[str(a) for a in args] for args in runs]),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [args for args, _, _ in report] == [[str(a) for a in args] for args in runs]
    assert {args[0]: code for args, code, _ in report[:2]} == {"--help": 0, "--version": 0}
    assert report[2][1] == 2 and report[3][1] == 2  # usage errors
    assert all(code == 0 for _, code, _ in report[4:])
    assert [(args, heavy) for args, _, heavy in report if heavy] == []


def test_version():
    result = subprocess.run([sys.executable, "-m", "hybridize", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"hybridize {hybridize.__version__}"


@pytest.mark.parametrize(
    "defaults, module, name",
    [
        (cli.AnalyzeDefaults, "hybridize.analyze", "AnalyzeConfig"),
        (cli.BenchDefaults, "hybridize.evaluate.bench", "BenchConfig"),
        (cli.ConvertDefaults, "hybridize.convert", "ConvertConfig"),
        (cli.DistillDefaults, "hybridize.distill", "DistillConfig"),
        (cli.EvalDefaults, "hybridize.evaluate.perplexity", "EvalConfig"),
        (cli.ExportDefaults, "hybridize.export", "ExportConfig"),
        (cli.FactorizeDefaults, "hybridize.compress.lowrank", "FactorizeConfig"),
        (cli.FuseDefaults, "hybridize.compress.fuse", "FuseConfig"),
        (cli.GenerateDefaults, "hybridize.generate", "GenerateConfig"),
        (cli.PruneDefaults, "hybridize.compress.prune", "PruneConfig"),
        (cli.PushDefaults, "hybridize.hub", "PushConfig"),
    ],
)
def test_option_defaults_are_the_configs(defaults, module, name):
    config_class = getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)
    expected = {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}
    assert vars(defaults) == expected


def test_distill_run_defaults_are_the_modules():
    from hybridize.distill import EVAL_EVERY, SAVE_EVERY

    assert (cli.DistillRunDefaults.EVAL_EVERY, cli.DistillRunDefaults.SAVE_EVERY) == (EVAL_EVERY, SAVE_EVERY)


def test_public_names_resolve_and_functions_stay_functions():
    """`hybridize.convert` is the function even after `hybridize.convert` the subpackage is imported (by the user, or
    by another module), as it was when the package imported everything eagerly."""
    result = _python(
        """
        import hybridize
        import hybridize.evaluate.harness, hybridize.convert.selection, hybridize.distill.data  # submodules first
        import hybridize.analyze, hybridize.export, hybridize.generate
        from hybridize import evaluate
        shadowed = ["analyze", "convert", "distill", "evaluate", "export", "generate"]
        assert all(callable(getattr(hybridize, name)) for name in shadowed), [getattr(hybridize, n) for n in shadowed]
        assert callable(evaluate) and hybridize.evaluate.__name__ == "evaluate"
        missing = [name for name in hybridize.__all__ if getattr(hybridize, name, None) is None]
        assert not missing, missing
        assert set(hybridize.__all__) <= set(dir(hybridize))
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        getattr(hybridize, "nonexistent")


@pytest.mark.parametrize(
    "load",
    [
        "import hybridize\nfrom transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained(PATH)",
        "from transformers import AutoModelForCausalLM\nimport hybridize\nAutoModelForCausalLM.from_pretrained(PATH)",
        "from hybridize.sources import load\nload(PATH)",
    ],
    ids=["hybridize-first", "transformers-first", "sources-load"],
)
def test_saved_hybrid_loads_in_a_fresh_process(tmp_path, load):
    """Registration with transformers happens whenever transformers is imported, so every way in finds the hybrid
    without trust_remote_code (the saved modeling code is tampered with, so that running it would fail)."""
    tiny_hybrid(["mamba2", "attention"] * 2).save_pretrained(tmp_path / "h")
    word_tokenizer().save_pretrained(tmp_path / "h")
    for code in (tmp_path / "h").glob("*.py"):
        code.write_text("raise SystemExit('the checkpoint\\'s own code ran')\n")
    result = _python(load.replace("PATH", repr(str(tmp_path / "h"))) + "\nprint('ok')\n", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
