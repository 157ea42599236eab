"""The one way every fastpix command reads its options and reports bad input.

Options are declared once, as fields of the command's config dataclass (`option`): the flag, its type,
default, help and limits all come from the field, `add_options` builds the argparse options from them,
`config_from` the config from the parsed arguments, and `check_options` is the one check of the declared
limits, for configs from the command line and from code alike.

Bad input is a line that says what to fix, exit code 2: commands raise `UsageError` anywhere below `main`;
`run` turns it into that line, so no user ever sees a traceback for a mistake they can fix. Real bugs still
raise normally.
"""
import argparse
import math
import sys
import types
import typing
from dataclasses import field, fields


class UsageError(Exception):
    """Bad input the user can fix; the message is the one line they will read."""


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default once: a help that states its default in words keeps only the words."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose own complaints are UsageErrors too, and whose --help shows every default."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsOnce)
        super().__init__(**kwargs)

    def error(self, message):
        raise UsageError(message)


def run(main, argv=None):
    """Call main(argv) and exit with its code; UsageError (or a folder another process writes) -> one line on
    stderr and exit 2."""
    from files import Busy

    try:
        code = main(argv)
    except (UsageError, Busy) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)


# ----------------------------------------------------------------------------------------------- Options

def option(default, help, *, choices=None, minimum=None, maximum=None, parse=None, metavar=None,
           repeat=False):
    """A config field that is also a command-line option, e.g. `net: str = option("flat", "model", choices=NETS)`.

    The flag is --<field name with dashes>; the value is read as the field's type
    (`X | None` reads as X), or by `parse` where the type cannot say how (lists, words like "auto"). A bool
    is a switch: --x when it defaults to False, --x / --no-x when it defaults to True. `choices`, `minimum` and
    `maximum` (None always passes) are checked by `check_options`, as is every float being finite; repeat: the flag may be given again, each value
    (text, or read by `parse`) appended to a tuple (the default must be a tuple)."""
    spec = dict(help=help, choices=choices, minimum=minimum, maximum=maximum, parse=parse, metavar=metavar,
                repeat=repeat)
    return field(default=default, metadata={"option": spec})


def options(cls):
    """(field, its option spec) for every field of `cls` declared with `option`, in declaration order."""
    return [(f, f.metadata["option"]) for f in fields(cls) if "option" in f.metadata]


def flag(name):
    return "--" + name.replace("_", "-")


def value_type(hint, name):
    """The type a flag's text is read as: the field's type, or X for `X | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [t for t in typing.get_args(hint) if t is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else None
    if hint not in (str, int, float) and not (isinstance(hint, type) and hint.__module__ == "pathlib"):
        raise TypeError(f"option {name!r}: say how to read its text with parse=")
    return hint


def add_options(parser, cls):
    """One argparse option per `option` field of `cls`; returns the parser."""
    hints = typing.get_type_hints(cls)
    for f, spec in options(cls):
        kwargs = dict(dest=f.name, default=f.default, help=spec["help"].replace("%", "%%"))
        if spec["choices"] is not None:
            kwargs["metavar"] = "{" + ",".join(spec["choices"]) + "}"
        if spec["metavar"] is not None:
            kwargs["metavar"] = spec["metavar"]
        if hints[f.name] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
            kwargs.pop("metavar", None)
        elif spec["repeat"]:  # each value is read by parse, or kept as text
            kwargs.update(action="append", default=list(f.default), type=spec["parse"])
        else:
            kwargs["type"] = spec["parse"] or value_type(hints[f.name], f.name)
        parser.add_argument(flag(f.name), **kwargs)
    return parser


def config_from(cls, args):
    """The config of parsed `args` (an argparse Namespace; attributes that are no option are ignored)."""
    values = {f.name: tuple(getattr(args, f.name)) if spec["repeat"] else getattr(args, f.name)
              for f, spec in options(cls)}
    return cls(**values)


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit: a larger or negative one fails deep inside a run


def seed_option(help):
    """A --seed: an integer numpy and torch both accept."""
    return option(0, help, minimum=0, maximum=SEED_MAX)


def check_options(cfg):
    """The one check of every option's declared choices and limits, and of every float being finite (nan and
    inf pass every comparison or overflow later, far from the flag), as one UsageError line."""
    for f, spec in options(type(cfg)):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag(f.name)} must be a finite number, got {value}")
        if spec["choices"] is not None and value not in spec["choices"]:
            raise UsageError(f"unknown {f.name.replace('_', ' ')} {value!r}: choose one of "
                             f"{', '.join(spec['choices'])}")
        if spec["minimum"] is not None and value is not None and value < spec["minimum"]:
            raise UsageError(f"{flag(f.name)} must be >= {spec['minimum']}, got {value}")
        if spec["maximum"] is not None and value is not None and value > spec["maximum"]:
            raise UsageError(f"{flag(f.name)} must be <= {spec['maximum']}, got {value}")


def ints(text):
    """An option's text as a tuple of integers: "4,1,1" -> (4, 1, 1)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def names(text):
    """An option's text as a tuple of names: "ema,flip_tta" -> ("ema", "flip_tta"); empty parts dropped."""
    return tuple(v for v in text.split(",") if v)
