"""A resolved config as YAML that loads back (`--print-config` on train, prepare and the autotuner): every key with
its value and the comment written beside it in the schema (config.py, model.py), so the schema's comments are its
one documentation."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize

import yaml

from dist_gpt.config import SECTIONS, Config

PRINT_CONFIG_HELP = "print the resolved config as YAML (every key, its value and what it means) and exit"


def add_print_config(parser, examples: list[str], overriding: str = "section.key=value overrides any key") -> None:
    """--print-config, and a --help that says how to list the keys and shows a few command lines."""
    parser.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    shown = "\n".join(f"  {example}" for example in examples)
    parser.epilog = f"every key, with its value and meaning: add --print-config. {overriding}, e.g.\n{shown}"


def render_config(config: Config) -> str:
    """The config as YAML that loads back (--config FILE) to the same config: every key with its value and the
    comment written next to it in the schema (config.py, model.py)."""
    lines = [_key_line("name", config.name, key_comments(Config).get("name"), indent="")]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        comments = key_comments(cls)
        lines += [_key_line(f.name, getattr(getattr(config, section), f.name), comments.get(f.name)) for f in dataclasses.fields(cls)]
    return "\n".join(lines)


def _key_line(key: str, value, comment: str | None, indent: str = "  ") -> str:
    scalar = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("\n...\n").strip()
    return f"{indent}{key}: {scalar}" + (f"  # {comment}" if comment else "")


@functools.lru_cache(maxsize=None)
def key_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line in the class body (a subclass's wins), read from the source: the
    schema's comments are its documentation, kept in one place."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        lines: dict[int, list[tokenize.TokenInfo]] = {}
        for token in tokenize.generate_tokens(io.StringIO(textwrap.dedent(inspect.getsource(klass))).readline):
            if token.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.NEWLINE):
                lines.setdefault(token.start[0], []).append(token)
        for tokens in lines.values():  # a field: `    name: type = default  # comment`, one level in
            first, second, last = tokens[0], tokens[1] if len(tokens) > 1 else None, tokens[-1]
            if first.type == tokenize.NAME and first.start[1] == 4 and second and second.string == ":" and last.type == tokenize.COMMENT:
                comments[first.string] = last.string.lstrip("#").strip()
    return comments
