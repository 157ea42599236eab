"""cli.option: a config dataclass declares each option once; the parser, the config and the checks follow."""
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli import Parser, UsageError, add_options, check_options, config_from, ints, names, option


@dataclass
class Demo:
    batch_size: int = option(8, "images per step", minimum=1)
    mode: str = option("fast", "how", choices=("fast", "slow"))
    out: Path | None = option(None, "where")
    workers: int | None = option(None, "threads", minimum=0)
    quiet: bool = option(False, "no bars")
    cache: bool = option(True, "reuse files")
    sizes: tuple | None = option(None, "sizes", parse=ints)
    tags: tuple = option((), "a tag (repeatable)", repeat=True)
    hidden: int = 3  # no option: not on the command line


def parse(argv):
    return config_from(Demo, add_options(Parser(prog="demo"), Demo).parse_args(argv))


def test_defaults_come_from_the_fields():
    assert parse([]) == Demo()


def test_flags_types_switches_and_repeats_come_from_the_fields():
    cfg = parse(["--batch-size", "4", "--mode", "slow", "--out", "x", "--workers", "2", "--quiet", "--no-cache",
                 "--sizes", "1,2", "--tags", "a", "--tags", "b"])
    assert cfg == Demo(batch_size=4, mode="slow", out=Path("x"), workers=2, quiet=True, cache=False, sizes=(1, 2),
                       tags=("a", "b"))
    assert parse(["--tags", "c"]).tags == ("c",) and Demo().tags == ()  # the default is never appended to
    with pytest.raises(UsageError, match="unrecognized arguments: --hidden"):
        parse(["--hidden", "4"])


def test_help_lists_each_option_with_its_help_and_choices():
    text = " ".join(add_options(Parser(prog="demo"), Demo).format_help().split())
    assert "--batch-size BATCH_SIZE images per step (default: 8)" in text
    assert "--mode {fast,slow} how (default: fast)" in text and "--cache, --no-cache" in text


@pytest.mark.parametrize("cfg,message", [
    (Demo(mode="medium"), "unknown mode 'medium': choose one of fast, slow"),
    (Demo(batch_size=0), "--batch-size must be >= 1, got 0"),
    (Demo(workers=-1), "--workers must be >= 0, got -1"),
])
def test_check_options_says_which_option_is_wrong(cfg, message):
    with pytest.raises(UsageError, match=message):
        check_options(cfg)
    check_options(Demo())  # None passes a minimum


def test_a_bad_value_is_a_usage_error():
    with pytest.raises(UsageError, match="comma-separated integers"):
        parse(["--sizes", "1,x"])
    with pytest.raises(UsageError, match="invalid int value"):
        parse(["--batch-size", "two"])


def test_an_option_whose_text_cannot_be_read_by_type_needs_parse():
    @dataclass
    class Bad:
        pair: tuple = option((1, 2), "two numbers")

    with pytest.raises(TypeError, match="parse="):
        add_options(Parser(prog="bad"), Bad)
    assert names("a,,b") == ("a", "b")
