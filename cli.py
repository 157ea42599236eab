"""The one way every fastpix command reports bad input: a line that says what to fix, exit code 2.

Commands raise `UsageError` anywhere below `main`; `run` turns it into that line, so no user ever sees a
traceback for a mistake they can fix. Real bugs still raise normally.
"""
import argparse
import sys


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
    """Call main(argv) and exit with its code; UsageError -> one line on stderr and exit 2."""
    try:
        code = main(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
