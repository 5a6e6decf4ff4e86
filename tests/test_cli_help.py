"""`run.py --help`: every flag with its meaning and default; the config's field metadata behind it."""

import dataclasses
import subprocess
import sys

import pytest

from grokjax.train.cli import build_parser
from grokjax.train.config import MODADD_FIELDS, NON_SCIENCE_FIELDS, TrainConfig
from grokjax.train.replicas import kept_param_steps
from grokjax.train.schedule import eval_steps

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
NON_SCIENCE = {"out", "overwrite", "chunk", "full_save_secs", "progress", "cache_dir", "idx_dir", "time_limit",
               "monitor", "keep_params"}


def _blocks(text: str) -> dict[str, str]:
    """Each option's entry of the help text (invocation and help, whitespace collapsed), by option string."""
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = [line]
            for token in line.replace(",", " ").split():
                if token.startswith("-"):
                    blocks[token] = current
        elif line.startswith("   ") and current is not None:
            current.append(line)
        else:
            current = None
    return {k: " ".join(" ".join(v).split()) for k, v in blocks.items()}


@pytest.fixture(scope="module")
def help_text() -> str:
    return build_parser().format_help()


def test_every_field_has_help_and_science_metadata():
    for f in dataclasses.fields(TrainConfig):
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip(), f.name
        assert "%" not in f.metadata["help"], f.name  # argparse would read it as a format directive
        assert isinstance(f.metadata.get("science"), bool), f.name


def test_every_flag_is_in_help_with_text_and_default(help_text):
    blocks = _blocks(help_text)
    for name in FIELDS:
        assert f"--{name}" in blocks, name
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in actions} >= set(FIELDS) | {"seeds", "wds", "export", "export_params", "export_params_at",
                                                      "coordinator_address", "num_processes", "process_id",
                                                      "distributed", "initialization_timeout"}
    for a in actions:
        assert isinstance(a.help, str) and a.help.strip(), a.dest
        for flag in a.option_strings:
            assert flag in blocks, flag
            assert "(default: " in blocks[flag], (flag, blocks[flag])


def test_field_help_is_the_flag_help():
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert by_dest[f.name].help == f.metadata["help"]
        assert by_dest[f.name].default == f.default


def test_steps_help_gives_the_default_and_the_time(help_text):
    block = _blocks(help_text)["--steps"]
    assert "1e7" in block and "10^7" in block, block
    assert "steps/s" in block and "GPU" in block, block
    assert "(default: 10000000)" in block, block


def test_keep_params_defaults_to_log_and_its_counts_are_the_readmes(help_text):
    """The README's disk table: at 10^7 steps `log` keeps 217 of the 299 evaluated steps' params."""
    assert TrainConfig().keep_params == "log"
    block = _blocks(help_text)["--keep_params"]
    assert "(default: log)" in block and "ablation" in block, block
    cfg = TrainConfig()
    steps = eval_steps(cfg.steps, cfg.log_points_per_decade, cfg.authors_grid)
    counts = {k: len(kept_param_steps(dataclasses.replace(cfg, keep_params=k), steps)) for k in ("all", "log", "none")}
    assert counts == {"all": 299, "log": 217, "none": 0}


def test_help_command_exits_zero(root):
    r = subprocess.run([sys.executable, str(root / "experiments" / "run.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    blocks = _blocks(r.stdout)
    assert "--skip_zero_pixels" in blocks and "--export" in blocks and "--initialization_timeout" in blocks


def test_science_fields_unchanged():
    assert set(NON_SCIENCE_FIELDS) == NON_SCIENCE and len(NON_SCIENCE_FIELDS) == len(NON_SCIENCE)
    cfg = TrainConfig()
    expected = [(k, v) for k, v in cfg.to_dict().items() if k not in NON_SCIENCE]
    assert list(cfg.science().items()) == expected
    # an MLP config leaves out the task field and the transformer's (--task modadd) fields
    assert set(cfg.science()) == set(FIELDS) - NON_SCIENCE - {"task", *MODADD_FIELDS}
    assert cfg.science()["steps"] == 10_000_000 and cfg.science()["skip_zero_pixels"] == "subset"
    assert cfg.science()["fc1_weight_grad"] == "pretransposed"
    # the non-science fields leave science() alone; a science field changes it
    other = TrainConfig(out="elsewhere", overwrite=True, chunk=64, full_save_secs=1.0, progress=False,
                        cache_dir="c", idx_dir="i", time_limit=5.0, monitor=False, keep_params="none")
    assert other.science() == cfg.science()
    assert TrainConfig(wd=0.01).science() != cfg.science()


def test_parser_defaults_are_the_config_defaults():
    args = vars(build_parser().parse_args([]))
    assert TrainConfig(**{k: args[k] for k in FIELDS}) == TrainConfig()
