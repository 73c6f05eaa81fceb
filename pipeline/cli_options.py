"""A command's click options, generated from the declarations in stages/common/config.py.

Every generated option defaults to None (a flag too), so that "not on the command line" is
visible and the TOML file or the declared default fills it in `build_config`. The click parameter
is named after the field, so `--teacher-arg` arrives as `teacher_args` and `--no-plots` as `plots`.
"""

from __future__ import annotations

from collections.abc import Iterable

import click

from kdcache.storage.options import Option, options_of


def click_options(cls, extra: Iterable[Option] = ()):
    """Decorator adding one click option per CLI field of `cls`, then one per `extra` option
    (a codec's own options, gathered by `build_config` into the field declared `collects`)."""
    extra = tuple(extra)
    declared = options_of(cls)
    clash = {o.name for o in extra} & {o.name for o in declared}
    if clash:
        raise ValueError(f"extra options {sorted(clash)} are already fields of {cls.__name__}")
    if extra and not any(o.collects for o in declared):
        raise ValueError(f"{cls.__name__} has no field declared collects=True for extra options")
    options = [o for o in declared if o.cli] + list(extra)

    def decorate(fn):
        for opt in reversed(options):  # click lists options in the order decorators are written
            fn = click_option(opt)(fn)
        return fn

    return decorate


def click_option(opt: Option):
    kw: dict = {"help": help_text(opt), "default": None}
    if opt.type is bool and opt.default is None:  # on, off, or unset (the stage decides)
        off = "--no-" + opt.flag.removeprefix("--")
        return click.option(f"{opt.flag}/{off}", opt.name, default=None, help=opt.help)
    if opt.type is bool:
        kw.update(is_flag=True, flag_value=not opt.default)  # --force sets True, --no-plots False
    elif opt.type is dict:
        kw.update(multiple=True, metavar="KEY=VALUE", default=())
    elif opt.choices is not None:
        kw["type"] = click.Choice(list(opt.choices))
    else:
        kw["type"] = opt.type
    return click.option(opt.flag, opt.name, **kw)


def help_text(opt: Option) -> str:
    """The declared help plus, like click's own, the default and the allowed range."""
    notes = []
    if opt.default is not None and opt.type not in (bool, dict):
        notes.append(f"default: {opt.default}")
    if opt.bounds():
        notes.append(opt.bounds())
    return f"{opt.help}  [{'; '.join(notes)}]" if notes else opt.help
