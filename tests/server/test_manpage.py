"""The man page documents exactly the exit codes and the commands the key server has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tests.server.parsers import every_parser
from zfs_unlock_server import errors
from zfs_unlock_server.cli import build_parser
from zfs_unlock_server.config import Layout

MAN_PAGE = Path(__file__).parents[2] / "docs" / "man" / "zfs-unlock-server.8"
PROGRAM = "zfs-unlock-server"
# Options every command takes; OPTIONS documents them once.
GLOBAL_OPTIONS = {"-h", "--help", "--data-dir"}
# An option named in running text: two hyphens, not inside a longer word.
OPTION_IN_TEXT = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def section(name: str) -> str:
    text = MAN_PAGE.read_text()
    return text.split(f".SH {name}\n", 1)[1].split("\n.SH ", 1)[0]


def plain(roff: str) -> str:
    """ROFF's text without font escapes, with \\- as the hyphen it stands for."""
    return re.sub(r"\\f[BIRP]|\\&", "", roff).replace("\\-", "-")


def macro_arguments(line: str) -> tuple[str, list[str]]:
    """A macro line's name and its arguments, split as roff does (double quotes group)."""
    name, _, rest = line.partition(" ")
    arguments = [
        m[1].replace('""', '"') if m[1] is not None else m[2]
        for m in re.finditer(r'"((?:[^"]|"")*)"|(\S+)', rest)
    ]
    return name, arguments


def bold_words(line: str) -> str:
    """The leading bold part of a font macro line: what .B sets, or .BI/.BR's first part."""
    name, arguments = macro_arguments(line)
    if name == ".B":
        return plain(" ".join(arguments)).strip()
    if name in {".BI", ".BR"} and arguments:
        return plain(arguments[0]).strip()
    return ""


# The parser


def leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command that runs something, by its words ("init", "host add", ...): one
    without subcommands, or one whose subcommands are optional ("backup", "backup verify")."""
    leaves: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if words and not any(a.required for a in subcommands):
            leaves[" ".join(words)] = parser
        for action in subcommands:
            for name, child in action.choices.items():
                walk(child, (*words, name))

    walk(build_parser(), ())
    return leaves


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option not in GLOBAL_OPTIONS
    }


def positionals_of(parser: argparse.ArgumentParser) -> list[str]:
    return [
        action.dest.upper()
        for action in parser._actions
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction)
    ]


# The page


def command_entries() -> dict[str, tuple[str, str]]:
    """COMMANDS' entries by command: (the tag line, the entry's whole text).

    An entry is a .TP paragraph at the section's own level; the options listed
    inside it (between .RS and .RE) belong to it."""
    entries: dict[str, tuple[str, str]] = {}
    lines = section("COMMANDS").splitlines()
    depth = 0
    current: str | None = None
    for index, line in enumerate(lines):
        if line == ".RS":
            depth += 1
        elif line == ".RE":
            depth -= 1
        elif line == ".TP" and depth == 0:
            tag = lines[index + 1]
            current = bold_words(tag)
            assert current, f"COMMANDS: an entry whose tag names no command: {tag!r}"
            assert current not in entries, f"COMMANDS: {current!r} twice"
            entries[current] = (tag, "")
            continue
        if current is not None:
            tag, text = entries[current]
            entries[current] = (tag, text + line + "\n")
    assert depth == 0, "COMMANDS: .RS and .RE do not pair up"
    return entries


def synopsis_commands() -> list[str]:
    """The command each SYNOPSIS line names: its .B words other than the program's name
    and options (alternatives such as .BR raw | hex are arguments, not commands)."""
    commands = []
    for block in section("SYNOPSIS").split("\n.br\n"):
        named = [
            words.split(" -", 1)[0]  # ".B key create \-\-host": the command, then an option
            for line in block.splitlines()
            if line.startswith(".B ")
            for words in [bold_words(line)]
            if words != PROGRAM and not words.startswith("-")
        ]
        assert len(named) == 1, f"SYNOPSIS: a line that names {named}, not one command"
        commands += named
    return commands


def documented_codes() -> set[int]:
    text = section("EXIT STATUS")
    return {int(code) for code in re.findall(r"^\.TP\n\.B (\d+)$", text, re.MULTILINE)}


# Exit codes


def test_every_exit_code_is_documented_and_nothing_else() -> None:
    defined = {value for name, value in vars(errors).items() if name.startswith("EX_")}
    assert documented_codes() == defined


def test_every_error_class_maps_to_a_documented_code() -> None:
    classes = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.ServerError) and c is not errors.ServerError
    ]
    assert len(classes) > 5
    assert {c.exit_code for c in classes} <= documented_codes()


# Commands


def test_every_command_has_an_entry_and_no_entry_names_another() -> None:
    assert set(command_entries()) == set(leaf_parsers())


def test_the_synopsis_names_every_command_and_nothing_else() -> None:
    named = synopsis_commands()
    assert sorted(named) == sorted(leaf_parsers())  # each once


def test_each_entry_gives_the_command_its_arguments_and_only_its_own_options() -> None:
    entries = command_entries()
    for command, parser in leaf_parsers().items():
        tag, text = entries[command]
        for positional in positionals_of(parser):
            assert re.search(rf"\b{positional}\b", tag), f"{command}: {positional} not in {tag!r}"
        named = set(OPTION_IN_TEXT.findall(plain(text)))
        assert named - GLOBAL_OPTIONS == options_of(parser), command


def test_every_command_and_every_option_of_the_parser_is_on_the_page() -> None:
    page = plain(MAN_PAGE.read_text())
    missing = [
        f"{command or PROGRAM}: {option}"
        for command, parser in every_parser().items()
        for action in parser._actions
        for option in action.option_strings
        if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", page)
    ]
    assert missing == []
    words = {word for command in every_parser() for word in command.split()}
    assert {"host", "key", "cert-remove", "import-simplezfs"} <= words
    assert [w for w in sorted(words) if not re.search(rf"(?<![\w-]){w}(?![\w-])", page)] == []


def test_the_options_every_command_takes_are_under_options() -> None:
    lines = section("OPTIONS").splitlines()
    tags = [plain(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line == ".TP"]
    named = {option for tag in tags for option in re.findall(r"(?<![\w-])-[-\w]+", tag)}
    program = {o for a in build_parser()._actions for o in a.option_strings}
    assert program == named  # -h, --help, --data-dir, --version


def test_every_file_of_the_data_directory_is_described() -> None:
    layout = Layout(Path("/d"))
    names = {
        getattr(layout, name).name
        for name, value in vars(Layout).items()
        if isinstance(value, property)
    }
    assert len(names) >= 9
    described = plain(section("CONFIGURATION"))
    assert [n for n in sorted(names) if n not in described] == []


def test_serves_exit_code_for_a_port_in_use_is_documented() -> None:
    text = plain(section("EXIT STATUS"))
    assert errors.EX_UNAVAILABLE == 69
    assert re.search(r"^\.B 69\n\.B serve\ncannot listen", text, re.MULTILINE)
