"""absl flags for the small module commands (``python -m murajax.synthetic``,
``python -m murajax.bench``): one command-line style with ``murajax`` itself (murajax/cli.py).

This module owns how those commands parse their arguments. Each command defines its flags in
a fresh ``flags.FlagValues`` at every call (``parse``), never in absl's global ``FLAGS``: the
modules are imported by tests and by one another next to murajax/cli.py, whose flags live
there, and nothing clashes. Like argparse before, ``--help`` prints the flags and exits 0, and
a bad argument exits 2 with one line on stderr.

Spellings: every flag is accepted with dashes or underscores (``--batch-size``,
``--batch_size``), a boolean also as ``--no-<name>`` besides absl's ``--no<name>``; a flag
given in ``optional_values`` may stand alone and then takes that value (``--remat`` for
``--remat=bottleneck``).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Mapping, Sequence

from absl import flags

_HELP = ("--help", "-help", "-h", "-?", "--helpfull", "-helpfull", "--helpshort", "-helpshort")


def _flag_name(values: flags.FlagValues, name: str) -> str | None:
    """The defined flag that ``name`` spells (dashes and underscores alike), or None."""
    for candidate in (name, name.replace("_", "-"), name.replace("-", "_")):
        if candidate in values:
            return candidate
    return None


def _normalise(values: flags.FlagValues, argv: Sequence[str],
               optional_values: Mapping[str, str]) -> list[str]:
    """``argv`` with every flag spelled as it is defined (absl matches names exactly)."""
    out: list[str] = []
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            out += args[i:]
            break
        if not arg.startswith("-") or arg in ("-", "--"):
            out.append(arg)
            continue
        dashes = "--" if arg.startswith("--") else "-"
        name, equals, value = arg[len(dashes):].partition("=")
        defined = _flag_name(values, name)
        if defined is None and name[:3] in ("no-", "no_"):
            negated = _flag_name(values, name[3:])
            if negated is not None and values[negated].boolean:
                defined = "no" + negated
        if defined is None:
            out.append(arg)  # absl names it in its error
            continue
        follows = args[i + 1] if i + 1 < len(args) else None
        if defined in optional_values and not equals and (
                follows is None or follows.startswith("-")):
            arg, equals, value = "", "=", optional_values[defined]
        out.append(f"--{defined}{equals}{value}")
    return out


def parse(prog: str, description: str, define: Callable[[flags.FlagValues], None],
          argv: Sequence[str] | None = None, *,
          optional_values: Mapping[str, str] | None = None) -> flags.FlagValues:
    """Parses ``argv`` (default ``sys.argv[1:]``, without the program name) against the flags
    ``define(values)`` defines in a fresh ``FlagValues``; returns it.

    ``--help`` prints ``description`` and the flags and raises ``SystemExit(0)``; an unknown
    flag, a bad value, a missing required flag or a positional argument prints
    ``<prog>: error: ...`` to stderr and raises ``SystemExit(2)``.
    """
    values = flags.FlagValues()
    define(values)
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in _HELP for a in args[: args.index("--") if "--" in args else len(args)]):
        listing = values.get_help(include_special_flags=False).splitlines()
        listing = [line for line in listing if line.startswith(" ")]  # not the module headers
        try:
            print(f"usage: {prog} [flags]\n\n{description}\n\nflags:\n" + "\n".join(listing),
                  flush=True)
        except BrokenPipeError:  # --help | head
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    try:
        rest = values([prog] + _normalise(values, args, optional_values or {}))
    except flags.Error as e:
        _fail(prog, str(e))
    if len(rest) > 1:
        _fail(prog, f"unexpected arguments: {' '.join(rest[1:])}")
    return values


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}\nTry --help.", file=sys.stderr, flush=True)
    raise SystemExit(2)
