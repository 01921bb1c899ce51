"""The settings reference page (``docs/reference/settings.md``), generated from :class:`~iwsproxy.settings.Settings`.

    python -m iwsproxy.tools.settings_doc            # print the page
    python -m iwsproxy.tools.settings_doc --write    # rewrite docs/reference/settings.md
    python -m iwsproxy.tools.settings_doc --check    # exit 1 if the page is out of date

Every row comes from a field's declaration: its environment variable (which is also its
Flask config key), its command-line flag, its default and its help text. The groups are the
``# --- name ---`` comments that divide the fields in ``settings.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import re
import sys
from typing import Any

from ..settings import Settings

__all__ = ["PAGE", "generate", "main"]

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "reference" / "settings.md"

_GROUP_RE = re.compile(r"^\s*# --- (.+?) ---\s*$")
_FIELD_RE = re.compile(r"^\s*(\w+): .*= setting\(")

_HEADER = """\
# Settings

<!-- Generated from iwsproxy/settings.py by `python -m iwsproxy.tools.settings_doc --write`:
     edit the help texts there, not this page. tests/unit/test_docs.py fails when it is out of date. -->

Every setting is declared once, in `iwsproxy/settings.py`, with its default, its parser, its
environment variable and its help text; this page is generated from those declarations.

Each value comes from, lowest first: its default, the Flask config (an app embedding the
extension, key = the variable's name), the environment, the command line (`iwsproxy serve`).
`iwsproxy serve --print-config` prints the resolved values with their variable names (the
admin token, the resume secret and a password in the Redis URL masked).

- **Sizes** accept `65536`, `64KiB`, `5MiB`, `10kB` (KiB = 1024 bytes, kB = 1000).
- **Durations** are seconds, as a number (`0.5`, `30`).
- **Switches** accept `true/false`, `1/0`, `yes/no`, `on/off`; on the command line
  `--flag` and `--no-flag`. An empty value is refused rather than read as off.
- **Lists**: a repeatable flag, or one variable with commas between items (routes: `;`
  between routes).
- An invalid value stops the process before it listens:
  `iwsproxy: invalid setting IWSPROXY_X='...' (from environment): why`.

Settings without a flag are set through the environment or the Flask config only.
"""


def _groups() -> dict[str, str]:
    """Field name -> group name, from the ``# --- group ---`` comments in the class body."""
    groups, current = {}, "other"
    for line in inspect.getsource(Settings).splitlines():
        match = _GROUP_RE.match(line)
        if match:
            current = match.group(1)
            continue
        match = _FIELD_RE.match(line)
        if match:
            groups[match.group(1)] = current
    return groups


def _size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


def _default(f: dataclasses.Field) -> str:
    value: Any = f.default
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if f.name.endswith("_bytes"):
        return f"{_size(value)} (`{value}`)"
    if f.name.endswith("_s"):
        return f"{value:g} s"
    if isinstance(value, tuple):
        return "`" + ",".join(value) + "`"
    if value == "":
        return '`""` (none)'
    return f"`{value}`"


def _flag(f: dataclasses.Field) -> str:
    flag = f.metadata.get("flag")
    if not flag:
        return "none"
    if isinstance(f.default, bool):
        return f"`{flag}`, `--no-{flag[2:]}`"
    if isinstance(f.default, tuple):
        return f"`{flag}` (repeatable)"
    return f"`{flag}`"


def _anchor(env: str) -> str:
    return env.lower()


def generate() -> str:
    """The page's text, as ``docs/reference/settings.md`` should hold it."""
    fields = dataclasses.fields(Settings)
    groups = _groups()
    order: list[str] = []
    for f in fields:
        if groups.get(f.name, "other") not in order:
            order.append(groups.get(f.name, "other"))
    out = [_HEADER]
    out.append("## All settings\n")
    out.append("| environment variable / Flask key | flag | default |")
    out.append("|---|---|---|")
    for f in fields:
        env = f.metadata["env"]
        out.append(f"| [`{env}`](#{_anchor(env)}) | {_flag(f)} | {_default(f)} |")
    out.append("")
    for group in order:
        out.append(f"## {group[0].upper()}{group[1:]}\n")
        for f in fields:
            if groups.get(f.name, "other") != group:
                continue
            env = f.metadata["env"]
            out.append(f"### {env}\n")
            out.append(f.metadata["help"] + ".\n")
            out.append(f"- Flag: {_flag(f)}")
            out.append(f"- Environment variable and Flask config key: `{env}`")
            out.append(f"- Default: {_default(f)}")
            out.append(f"- Field: `Settings.{f.name}`")
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iwsproxy.tools.settings_doc", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {PAGE.name} in docs/reference/")
    mode.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    text = generate()
    if args.write:
        PAGE.write_text(text, encoding="utf-8")
        return 0
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE} is out of date: run python -m iwsproxy.tools.settings_doc --write", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
