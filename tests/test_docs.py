"""The README and docs/: the generated reference is current, every command shown exists, every link leads
somewhere, and every setting and payload field carries its meaning (the one place it is written)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from cryid.daemon import docgen
from cryid.daemon.cli import build_parser
from cryid.daemon.config import Settings
from cryid.daemon.events import json_schemas, topics

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "reference"
GUIDES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])


def test_generated_reference_matches_the_models(tmp_path: Path) -> None:
    written = docgen.write(tmp_path)
    assert {p.name for p in written} == {"configuration.md", "payloads.md"}
    for path in written:
        committed = REFERENCE / path.name
        assert committed.is_file(), f"docs/reference/{path.name} is missing: run `{docgen.COMMAND}`"
        assert committed.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"docs/reference/{path.name} differs from the pydantic models: regenerate it with "
            f"`{docgen.COMMAND}` and commit the result"
        )


def test_check_names_a_stale_file_and_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert docgen.main(["--out", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--out", str(tmp_path)]) == 0
    page = tmp_path / "payloads.md"
    page.write_text(page.read_text(encoding="utf-8").replace("Ward room", "Ward"), encoding="utf-8")
    capsys.readouterr()
    assert docgen.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "payloads.md is stale" in err and docgen.COMMAND in err and "configuration.md" not in err


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for field in model.model_fields.values():
        for sub in (docgen.model_of(field.annotation), docgen.list_model_of(field.annotation)):
            if sub is not None and sub not in found:
                found += _models(sub)
    return found


def test_every_setting_is_described_and_in_the_reference() -> None:
    text = (REFERENCE / "configuration.md").read_text(encoding="utf-8")
    for model in _models(Settings):
        for name, field in model.model_fields.items():
            if docgen.model_of(field.annotation) or docgen.list_model_of(field.annotation):
                continue
            assert field.description, f"{model.__name__}.{name} has no Field description"
            assert f"{name}`" in text, f"{model.__name__}.{name} is not in docs/reference/configuration.md"
    for name in Settings.model_fields:
        assert f"CRYID_{name.upper()}" in text


def test_every_payload_field_is_described_and_every_topic_listed() -> None:
    text = (REFERENCE / "payloads.md").read_text(encoding="utf-8")
    schema_topics = " ".join(json_schemas())
    for topic in topics():
        if topic.payload is None:
            continue
        assert topic.name in schema_topics, f"{topic.path}: not printed by `cryid schema`"
        for model in _models(topic.payload):
            assert f"### {model.__name__}" in text
            for name, field in model.model_fields.items():
                assert field.description, f"{model.__name__}.{name} has no Field description"
                assert f"| `{name}` |" in text
    listed = {t.name for t in topics()}
    for key in json_schemas():
        for topic in key.split(" and "):
            assert topic in listed, f"`cryid schema` prints {topic}, which topics() does not list"


# --- commands ----------------------------------------------------------------------------------------
def _code_texts(text: str) -> list[str]:
    """Code blocks (fenced or indented) line by line, and inline code spans."""
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or re.match(r"^(    |\t)\s*\S", line):
            out.append(line)
        else:
            out += re.findall(r"`([^`\n]+)`", line)
    return out


def _invocations(text: str) -> list[list[str]]:
    """Each ``cryid ...`` (or ``cryid-admin ...``, which runs it as the service user) shown as a command:
    first on its line, or after ``|``, ``&&``, ``;``, ``$``, ``/`` or ``sudo``; its words up to a comment or
    the next ``cryid``."""
    found = []
    for code in _code_texts(text):
        code = code.replace("\\|", "|")
        for m in re.finditer(r"(?<![\w./-])cryid(?:-admin)?((?:\s+[^\s#]+)+)", code):
            before = code[: m.start()].rstrip()
            if before and not before.endswith(("|", "&&", ";", "$", "(", "/", "sudo")):
                continue  # an argument of another program (journalctl -u cryid), a log line, a diagram
            words = m.group(1).split()
            if not re.match(r"^(-{1,2}[a-z][\w-]*|[a-z][\w|-]*|\[.*)$", words[0]):
                continue  # `cryid <room>`: a name, not a command
            cut = next((i for i, w in enumerate(words) if w in ("cryid", "&&", ";", "/")), len(words))
            found.append(words[:cut])
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def _check_invocation(root: argparse.ArgumentParser, words: list[str]) -> str | None:
    parser, path, chosen, skip = root, ["cryid"], False, False
    for word in words:
        if skip:  # the value of the option before
            skip = False
            continue
        for flag in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", word.strip("[](){}|,`'\"")):
            if re.fullmatch(r"-v+", flag):
                continue
            action = _action(parser, flag) or _action(root, flag)
            if action is None:
                return f"`{' '.join(path)}` has no option {flag}"
            skip = action.nargs != 0 and "=" not in word and word.startswith("-")
        if word.startswith(("-", "[")):
            continue
        subs = _subparsers(parser)
        if subs and not chosen:
            names = word.split("|")
            if all(n in subs for n in names):
                if len(names) > 1:
                    return None  # "add|record|...": each checked to exist, options not
                parser, path = subs[word], [*path, word]
                continue
            if word.isupper() or word in ("...", "COMMAND", "ACTION"):
                return None
            return f"`{' '.join(path)}` has no sub-command {word}"
        chosen = True
    return None


def test_every_command_the_docs_show_exists() -> None:
    root = build_parser()
    problems, seen = [], 0
    for page in GUIDES:
        for words in _invocations(page.read_text(encoding="utf-8")):
            seen += 1
            problem = _check_invocation(root, words)
            if problem:
                problems.append(f"{page.relative_to(REPO)}: cryid {' '.join(words)}: {problem}")
    assert seen > 100  # the extraction finds the commands at all
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_missing_command_and_option() -> None:
    root = build_parser()
    assert _check_invocation(root, ["enroll", "add", "0001", "a.wav", "--room", "ward1"]) is None
    assert "no sub-command frobnicate" in (_check_invocation(root, ["enroll", "frobnicate"]) or "")
    assert "no option --colour" in (_check_invocation(root, ["eval", "--colour", "red"]) or "")


def test_every_help_page_prints() -> None:
    """`cryid ... --help` of every sub-command formats (a stray % in a help text once crashed it)."""

    def walk(parser: argparse.ArgumentParser) -> int:
        assert parser.format_help()
        return 1 + sum(walk(p) for p in {id(p): p for p in _subparsers(parser).values()}.values())

    assert walk(build_parser()) > 20


# --- links ---------------------------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    out: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*)", line)):
            slug, n = _slug(m.group(1)), 0
            while (slug if n == 0 else f"{slug}-{n}") in out:
                n += 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_link_leads_somewhere() -> None:
    problems = []
    for page in GUIDES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                problems.append(f"{page.relative_to(REPO)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{page.relative_to(REPO)}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_a_machine_dependent_default_must_be_said_in_words() -> None:
    """An absolute path default would make the reference differ from machine to machine."""
    with pytest.raises(ValueError, match="doc_default"):
        docgen.toml_value(Path("/home/someone/.local/state/cryid"))
    assert docgen.toml_value(Path("outbox.sqlite3")) == '`"outbox.sqlite3"`'
    state_dir = Settings.model_fields["state_dir"]
    assert "~/.local/state/cryid" in (docgen.doc_default(state_dir) or "")
