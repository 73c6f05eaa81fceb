"""Each option is declared once (stages/common/config.py): the click options, their defaults in --help,
the checks and the k=v folding all come from that declaration."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from kdcache.pipeline.cli import main
from kdcache.pipeline.cli_common import build_config, handle_errors
from kdcache.pipeline.cli_options import click_options
from kdcache.pipeline.cli_train import _argv
from kdcache.stages.evaluate.config import EvaluateConfig
from kdcache.stages.precompute.config import PrecomputeConfig
from kdcache.stages.report.config import ReportConfig
from kdcache.stages.train.config import EXECUTION, TrainConfig
from kdcache.storage import codecs
from kdcache.storage.options import Option, options_of
from tests.conftest import assert_one_line_error, cli_args

# Each command's options that are not config fields.
COMMANDS = {
    "precompute": (PrecomputeConfig, {"config", "quiet", "log_json"}),
    "train": (TrainConfig, {"config", "quiet", "log_json", "parallel", "only", "seeds"}),
    "evaluate": (EvaluateConfig, {"as_json"}),
    "report": (ReportConfig, {"quiet", "log_json"}),
}
CONFIGS = [cls for cls, _ in COMMANDS.values()]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_declared_with_help(cls):
    import dataclasses

    fields = [f.name for f in dataclasses.fields(cls)]
    opts = options_of(cls)
    assert [o.name for o in opts] == fields  # no field escapes the declarations
    assert [o.name for o in opts if not o.help.strip().endswith(".")] == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_generated_command_exposes_exactly_the_declared_options(command):
    cls, own = COMMANDS[command]
    params = {p.name: p for p in main.commands[command].params if p.name != "help"}
    declared = {o.name: o for o in options_of(cls) if o.cli}
    if command == "precompute":  # each codec's own options (--top-k ...), declared in its module
        declared |= {o.name: o for o in codecs.all_options()}
    assert set(params) == set(declared) | own
    ctx = click.Context(main.commands[command])
    for name, opt in declared.items():
        param = params[name]
        assert param.opts == [opt.flag] and param.default in (None, ())
        line = param.get_help_record(ctx)[1]  # what --help prints beside the flag
        assert opt.help in line
        if opt.type is bool and opt.default is None:  # on / off / unset: the stage decides
            assert param.is_flag and param.secondary_opts == ["--no-" + opt.flag[2:]]
        elif opt.type is bool:
            assert param.is_flag and param.flag_value is (not opt.default)
        elif opt.type is dict:
            assert param.multiple
        elif opt.default is not None:
            assert f"default: {opt.default}" in line
        if opt.choices:
            assert tuple(param.type.choices) == opt.choices
        if opt.bounds():
            assert opt.bounds() in line


def test_flag_spellings_of_dict_and_negative_options():
    flags = {o.name: o.flag for c in CONFIGS for o in options_of(c) if o.cli}
    assert flags["teacher_args"] == "--teacher-arg" and flags["eval_data_args"] == "--eval-data-arg"
    assert flags["storage_options"] == "--storage-option" and flags["plots"] == "--no-plots"


def test_execution_settings_are_derived_from_the_declarations():
    assert {
        "quiet", "device", "num_workers", "prefetch", "storage_options", "ignore_fingerprint",
        "threads", "check_inputs", "verify_reads",
        # how evaluation and the causal-lm loss are chunked (issue 22), not what they compute
        "eval_batch_size", "eval_logits_mb", "fused_head", "loss_chunk_mb",
    } == EXECUTION  # fmt: skip


@pytest.mark.parametrize(
    ("command", "args", "needle"),
    [
        ("precompute", ["--batch-size", "0"], "--batch-size 0 must be >= 1"),
        ("precompute", ["--temperature", "inf"], "--temperature inf: must be a finite number"),
        ("train", ["--warmup", "1"], "--warmup 1.0 must be in [0, 1)"),
        ("train", ["--lr", "0"], "--lr 0.0 must be > 0"),
        ("train", ["--threads", "0"], "--threads 0 must be >= 1"),
        ("evaluate", ["--batch-size", "-3"], "--batch-size -3 must be >= 1"),
    ],
)
def test_a_value_out_of_its_declared_bounds_is_one_line(tmp_path, cli, command, args, needle):
    base = {
        "precompute": cli_args(tmp_path / "s"),
        "train": ["train", "--student", "m:S", "--data", "m:D", "--out", tmp_path / "o"],
        "evaluate": ["evaluate", "--checkpoint", tmp_path, "--data", "m:D"],
    }[command]
    res = cli(*base, *args)
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, needle)
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('pool = "max"', "--pool 'max': use one of avg, token-mean, cls, last, flatten"),
        ('epochs = "many"', "--epochs 'many': must be a number (int)"),
        ("alpha = 1.5", "--alpha 1.5 must be in [0, 1]"),
        ("agree_rows = 0", "--agree-rows 0 must be >= 1"),  # a flag since issue 22
    ],
)
def test_a_bad_value_in_the_config_file_is_one_line(tmp_path, cli, toml, needle):
    config = tmp_path / "job.toml"
    config.write_text(toml + "\n")
    res = cli("train", "--config", config, "--student", "m:S", "--data", "m:D", "--out", tmp_path)
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, needle)


def test_argv_of_parallel_children_reproduces_the_options():
    args = ["--student-arg", "dim=8", "--storage-option", "anon=true", "--ignore-fingerprint"]
    args += ["--epochs", "3", "--parallel", "2", "--quiet"]
    train = main.commands["train"]
    with train.make_context("train", args) as ctx:
        argv = _argv(ctx.params)
    assert "--student-arg" in argv and "--storage-option" in argv and "--parallel" not in argv
    with train.make_context("train", argv) as child:
        assert child.params == {**ctx.params, "parallel": None}


TOP_N = Option("top_n", int, 3, "Classes a test codec keeps.", minimum=1)


@click.command()
@click.option("--config")
@click_options(PrecomputeConfig, extra=(TOP_N,))
@handle_errors
def fake_precompute(**options):
    cfg = build_config(PrecomputeConfig, options.pop("config"), options, extra=(TOP_N,))
    click.echo(repr(cfg.codec_options))


@pytest.mark.parametrize(
    ("toml", "args", "want"),
    [
        ("", [], "{}"),
        ("", ["--top-n", "5"], "{'top_n': 5}"),
        ("top_n = 4", [], "{'top_n': 4}"),
        ("top_n = 4\n[codec_options]\nother = 1", ["--top-n", "6"], "{'other': 1, 'top_n': 6}"),
    ],
)
def test_codec_options_are_flags_gathered_into_one_field(tmp_path, toml, args, want):
    config = tmp_path / "c.toml"
    config.write_text(toml + "\n")
    base = ["--config", str(config), "--data", "m:D", "--out", "o"]
    res = CliRunner().invoke(fake_precompute, [*base, *args])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == want
    assert "--top-n INTEGER" in CliRunner().invoke(fake_precompute, ["--help"]).stdout


def test_a_bad_codec_option_is_one_line_and_a_clash_is_refused(tmp_path):
    res = CliRunner().invoke(fake_precompute, ["--data", "m:D", "--out", "o", "--top-n", "0"])
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--top-n 0 must be >= 1")
    with pytest.raises(ValueError, match="dtype"):
        click_options(PrecomputeConfig, extra=(Option("dtype", str, "x", "Clash."),))
    with pytest.raises(ValueError, match="collects"):
        click_options(TrainConfig, extra=(TOP_N,))
