"""The configs that ship with murajax: one ``get_config()`` module per file, chosen by name.

    murajax --config=smoke          # the demo (the default)
    murajax --config=default        # the paper's recipe
    murajax --config=my_config.py   # a file of your own; it may start from ours:
                                    #   from murajax.configs import default

``resolve(name_or_path)`` turns what ``--config`` was given into the file that
``ml_collections.config_flags`` loads. Standard library only: the command line resolves the
config before it loads anything heavy.
"""

from __future__ import annotations

from pathlib import Path

from murajax.errors import UserError

DIRECTORY = Path(__file__).resolve().parent
NAMES = tuple(sorted(p.stem for p in DIRECTORY.glob("*.py") if not p.stem.startswith("_")))
DEFAULT = "smoke"


def path(name: str) -> str:
    """The installed file of the config called ``name`` (one of ``NAMES``)."""
    if name not in NAMES:
        raise UserError(f"no config named {name!r}; {_choices()}")
    return str(DIRECTORY / f"{name}.py")


def resolve(name_or_path: str) -> str:
    """``--config``'s value -> the path of a get_config() file.

    A name in ``NAMES`` (``smoke``, ``default``, ...) is the installed file; anything else is
    a path (relative to the current folder) and must be a file. As with ml_collections, a
    ``:argument`` suffix is passed to ``get_config`` and kept as it is. Raises ``UserError``
    (one line, listing the names) otherwise.
    """
    value = str(name_or_path)
    if value in NAMES:
        return path(value)
    if Path(value).is_file():
        return value
    head, colon, argument = value.partition(":")
    if colon and (head in NAMES or Path(head).is_file()):
        return resolve(head) + colon + argument
    if not value:
        raise UserError(f"--config is empty; {_choices()}")
    looks_like_a_path = "/" in value or value.endswith(".py")
    if not looks_like_a_path:
        raise UserError(f"--config={value}: no config named {value!r}; {_choices()}")
    stem = Path(head).stem
    hint = f" (did you mean --config={stem}?)" if stem in NAMES else ""
    problem = "is a folder, not a file" if Path(head).is_dir() else "no such file"
    raise UserError(f"--config={value}: {problem}{hint}; {_choices()}")


def _choices() -> str:
    return (f"known configs: {', '.join(NAMES)}; or give the path of a .py file with "
            "get_config()")
