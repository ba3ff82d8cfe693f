"""README.md against the CLI, in the style of sqlite-utils' docs tests.

(a) every `carv-attrib COMMAND ...` line in a README code block (and in an inline code span, and in
    a `### \\`COMMAND ...\\`` section heading) names a command of the Typer app, and every option
    it uses (--long or -s) exists on that command (global options before the command: on the app);
(b) for each `### \\`COMMAND ...\\`` section with an option table (rows starting "| `--"), every
    option the table's first column names exists on the command, and every option the command has
    (its click params, --help aside) appears in the table or elsewhere in the section;
(c) a table's default column matches the click default where both are simple literals
    ("17" vs 17, "1e-2" vs 0.01, "120 s" vs 120.0, "off" vs False, "auto" vs "auto").

Each test collects every mismatch and reports them all at once, with README line numbers.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer

from carv_attrib.cli.app import app

README = Path(__file__).resolve().parents[1] / "README.md"
PROG = "carv-attrib"

# An option token: --long-name or -s, not part of a longer word (so "carv-attrib", "1e-2" and
# "x-y" are not options). A "--" alone is not an option either.
OPTION_RE = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*|-[A-Za-z])(?![\w-])")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
COMMAND_HEADING_RE = re.compile(r"^`([a-z][\w-]*)((?:\s[^`]*)?)`")
# A code span may wrap onto the next line of its paragraph, never across a blank line.
INLINE_CODE_RE = re.compile(r"(?<!`)`((?:[^`\n]|\n(?![ \t]*\n))+)`(?!`)")
PROG_RE = re.compile(rf"(?:^|(?<=[\s(]))({re.escape(PROG)})\s+(?=\S)")
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}


# -- the CLI ----------------------------------------------------------------------------------------


# Duck-typed: typer >= 0.20 builds its commands on a vendored click (typer._click), so isinstance
# checks against the installed `click` package would fail.


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", None) == "option"


def _group() -> Any:
    group = typer.main.get_command(app)
    assert isinstance(getattr(group, "commands", None), dict), f"the app is not a command group: {group!r}"
    return group


def _option_names(cmd: Any) -> set[str]:
    names = {"--help"}
    for p in cmd.params:
        if _is_option(p):
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


# every command's -v/-q and --config FILE, documented once (README, "Conventions", "Resume without retyping")
COMMON = {"verbose_", "quiet_", "config_file"}


def _options(cmd: Any) -> list[Any]:
    return [p for p in cmd.params if _is_option(p) and "--help" not in p.opts and p.name not in COMMON]


def _label(opt: Any) -> str:
    return "/".join(sorted(opt.opts, key=lambda o: (not o.startswith("--"), o)))


# -- the README -------------------------------------------------------------------------------------


@dataclass
class Usage:
    line: int  # 1-based README line
    where: str  # "code block", "inline code", "heading"
    text: str


@dataclass
class TableRow:
    line: int
    cells: list[str]


@dataclass
class Section:
    command: str
    line: int
    heading: str
    lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, text), heading included

    @property
    def text(self) -> str:
        return "\n".join(t for _, t in self.lines)

    def table(self) -> tuple[list[str], list[TableRow]]:
        """(header cells, option rows) of the section's option table; ([], []) when it has none."""
        header: list[str] = []
        rows: list[TableRow] = []
        in_code = False
        previous_was_table = False
        for no, text in self.lines:
            if FENCE_RE.match(text):
                in_code = not in_code
            if in_code or not text.lstrip().startswith("|"):
                previous_was_table = False
                continue
            cells = _split_row(text)
            if all(re.fullmatch(r":?-{3,}:?", c.strip()) for c in cells if c.strip()):
                previous_was_table = True
                continue  # the |---|---| separator
            if not previous_was_table and not header:
                header = [c.strip().lower() for c in cells]
            elif cells and cells[0].strip().startswith("`-"):
                rows.append(TableRow(no, cells))
            previous_was_table = True
        return (header, rows) if rows else ([], [])


def _split_row(line: str) -> list[str]:
    """Cells of a markdown table row; a | inside `code` or escaped as \\| does not split."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    cells, cur, in_code, i = [], [], False, 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            cur.append("|")
            i += 2
            continue
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    cells.append("".join(cur))
    return cells


def _readme_lines() -> list[str]:
    return README.read_text(encoding="utf-8").splitlines()


def _usages(lines: list[str]) -> list[Usage]:
    """Every `carv-attrib ...` command line the README shows, in README order."""
    out: list[Usage] = []
    in_code = False
    pending: tuple[int, str] | None = None  # a code line continued with a trailing backslash
    prose: list[str] = []  # the README with code blocks blanked, for code spans across lines
    for no, text in enumerate(lines, start=1):
        fence = FENCE_RE.match(text)
        prose.append("" if in_code or fence else text)
        if fence:
            in_code = not in_code
            pending = None
            continue
        if in_code:
            start, joined = (pending[0], pending[1] + " " + text) if pending else (no, text)
            if joined.rstrip().endswith("\\"):
                pending = (start, joined.rstrip()[:-1])
                continue
            pending = None
            if PROG_RE.search(joined):
                out.append(Usage(start, "code block", joined.strip()))
            continue
        heading = HEADING_RE.match(text)
        if heading and len(heading.group(1)) == 3:
            m = COMMAND_HEADING_RE.match(heading.group(2))
            if m:
                out.append(Usage(no, "heading", f"{PROG} {m.group(1)}{m.group(2)}"))
    text = "\n".join(prose)
    for m in INLINE_CODE_RE.finditer(text):
        span = " ".join(m.group(1).split())
        if PROG_RE.search(span):
            out.append(Usage(text.count("\n", 0, m.start()) + 1, "inline code", span))
    return sorted(out, key=lambda u: u.line)


def _invocations(text: str) -> list[list[str]]:
    """The argument lists after each `carv-attrib` in a shell line, comments and redirections cut."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:  # unbalanced quotes in prose-like code: fall back to whitespace
        tokens = text.split("#", 1)[0].split()
    runs: list[list[str]] = []
    current: list[str] | None = None
    for tok in tokens:
        if tok == PROG:
            current = []
            runs.append(current)
        elif current is not None:
            if tok in SHELL_OPERATORS:
                current = None
            else:
                current.append(tok)
    return runs


def _sections(lines: list[str]) -> list[Section]:
    """README sections headed ### `COMMAND ...`, each up to the next heading of level <= 3."""
    sections: list[Section] = []
    current: Section | None = None
    in_code = False
    for no, text in enumerate(lines, start=1):
        if FENCE_RE.match(text):
            in_code = not in_code
        heading = None if in_code else HEADING_RE.match(text)
        if heading and len(heading.group(1)) <= 3:
            current = None
            m = COMMAND_HEADING_RE.match(heading.group(2)) if len(heading.group(1)) == 3 else None
            if m:
                current = Section(m.group(1), no, heading.group(2))
                sections.append(current)
        if current is not None:
            current.lines.append((no, text))
    return sections


def _named_options(cell: str) -> list[str]:
    return OPTION_RE.findall(cell)


# -- (a) command lines ------------------------------------------------------------------------------


def test_readme_command_lines_use_existing_commands_and_options() -> None:
    group = _group()
    usages = _usages(_readme_lines())
    assert any(u.where == "code block" for u in usages), (
        "no `carv-attrib ...` line found in README code blocks"
    )
    global_opts = _option_names(group)
    problems: list[str] = []
    checked = 0
    for u in usages:
        for args in _invocations(u.text):
            checked += 1
            i = 0
            while i < len(args) and args[i].startswith("-"):  # options of the app itself
                opt = args[i].split("=", 1)[0]
                if opt not in global_opts:
                    problems.append(f"README:{u.line} ({u.where}) `{u.text}`: no global option {opt}")
                i += 1
            if i == len(args):
                continue  # `carv-attrib --version` and the like
            name = args[i]
            if name.startswith("<") or name.isupper():
                continue  # a placeholder such as `carv-attrib <command> --help`
            cmd = group.commands.get(name)
            if cmd is None:
                problems.append(
                    f"README:{u.line} ({u.where}) `{u.text}`: no command {name!r} "
                    f"(commands: {', '.join(sorted(group.commands))})"
                )
                continue
            known = _option_names(cmd)
            for tok in args[i + 1 :]:
                if tok == "--":
                    break
                opt = tok.split("=", 1)[0]
                if OPTION_RE.fullmatch(opt) and opt not in known:
                    problems.append(f"README:{u.line} ({u.where}) `{u.text}`: `{name}` has no option {opt}")
    assert checked, "found no carv-attrib invocation to check"
    assert not problems, f"{len(problems)} README command line problem(s):\n" + "\n".join(problems)


# -- (b) option tables ------------------------------------------------------------------------------


def _table_sections() -> list[tuple[Section, list[str], list[TableRow]]]:
    out = []
    for s in _sections(_readme_lines()):
        header, rows = s.table()
        if rows:
            out.append((s, header, rows))
    return out


def test_readme_option_tables_match_the_commands() -> None:
    group = _group()
    tables = _table_sections()
    assert tables, "no README section headed ### `COMMAND ...` with an option table found"
    problems: list[str] = []
    for section, _, rows in tables:
        cmd = group.commands.get(section.command)
        where = f"README:{section.line} section {section.heading}"
        if cmd is None:
            problems.append(f"{where}: the app has no command {section.command!r}")
            continue
        known = _option_names(cmd)
        for row in rows:
            for opt in _named_options(row.cells[0]):
                if opt not in known:
                    problems.append(
                        f"{where}, table row README:{row.line}: documented option {opt} does not exist on "
                        f"`{section.command}`"
                    )
        mentioned = set(_named_options(section.text))
        for opt in _options(cmd):
            names = set(opt.opts) | set(opt.secondary_opts)
            if not names & mentioned:
                problems.append(
                    f"{where}: option {_label(opt)} of `{section.command}` is missing from its table and prose"
                )
    assert not problems, f"{len(problems)} README option table problem(s):\n" + "\n".join(problems)


# -- (c) defaults -----------------------------------------------------------------------------------

FALSE_WORDS = {"off", "false", "no", "disabled", "none"}
TRUE_WORDS = {"on", "true", "yes", "enabled"}
SIMPLE_RE = re.compile(r"[\w.:+\-×/]+")
NUMBER_RE = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(s|sec|seconds?|%)?")


def _split_options_cell(cell: str) -> list[list[str]]:
    """Options of a first-column cell, grouped: `--draws/-K` is one option, `--a` / `--b` are two."""
    groups = []
    for part in re.split(r"\s+/\s+|,\s*|`\s+`", cell):
        names = _named_options(part)
        if not names:
            continue
        if len(names) > 1 and not re.search(r"\w/-", part):  # `--a --b` in one span: separate options
            groups.extend([n] for n in names)
        else:
            groups.append(names)
    return groups


def _split_defaults_cell(cell: str, n: int) -> list[str] | None:
    """n defaults from a default cell ("4 / 2", "4, 0, auto"), or None when they do not pair."""
    cell = cell.strip()
    if n == 1:
        return [cell]
    for sep in (r"\s+/\s+", r",\s*"):
        parts = [p.strip() for p in re.split(sep, cell)]
        if len(parts) > 1:
            return parts if len(parts) <= n else None
    return None


def _doc_value(text: str) -> str:
    text = text.strip().strip("`").strip()
    return text.strip("'\"")


def _compare_default(doc: str, default: object, is_flag: bool) -> str | None:
    """None when they agree or the doc value is not a simple literal; else why they differ."""
    d = _doc_value(doc)
    if not d:
        return None
    low = d.lower()
    if is_flag or isinstance(default, bool):
        if low in FALSE_WORDS:
            return None if default is False else f"README says {d!r}, the flag defaults to {default!r}"
        if low in TRUE_WORDS:
            return None if default is True else f"README says {d!r}, the flag defaults to {default!r}"
        return None
    if default is None:
        return None  # derived in code (e.g. from MODEL or another option): nothing literal to compare
    if isinstance(default, (int, float)):
        m = NUMBER_RE.fullmatch(d)
        if not m:
            return None  # prose such as "8×8 per layer"
        value = float(m.group(1)) / (100 if m.group(2) == "%" else 1)
        ok = math.isclose(value, float(default), rel_tol=1e-9, abs_tol=0.0)
        return None if ok else f"README says {d!r}, the command defaults to {default!r}"
    if isinstance(default, (str, Path)):
        if not SIMPLE_RE.fullmatch(d):
            return None
        ok = low == str(default).lower()
        return None if ok else f"README says {d!r}, the command defaults to {str(default)!r}"
    if isinstance(default, (list, tuple)):
        return None
    return None


def test_readme_table_defaults_match_the_commands() -> None:
    group = _group()
    tables = _table_sections()
    assert tables, "no README section headed ### `COMMAND ...` with an option table found"
    problems: list[str] = []
    compared = 0
    for section, header, rows in tables:
        cmd = group.commands.get(section.command)
        if cmd is None:
            continue  # reported by test_readme_option_tables_match_the_commands
        col = header.index("default") if "default" in header else 1
        by_name = {name: opt for opt in _options(cmd) for name in (*opt.opts, *opt.secondary_opts)}
        for row in rows:
            if len(row.cells) <= col or not row.cells[col].strip():
                continue
            groups = _split_options_cell(row.cells[0])
            defaults = _split_defaults_cell(row.cells[col], len(groups))
            where = f"README:{row.line} (`{section.command}`)"
            if defaults is None:
                problems.append(
                    f"{where}: cannot pair the defaults {row.cells[col].strip()!r} with the options "
                    f"{[g[0] for g in groups]}"
                )
                continue
            if len(defaults) < len(groups):
                # "4, 0, auto, float32" for five options: the unpaired tail must be flags (default off).
                tail = [g for g in groups[len(defaults) :] if g[0] in by_name]
                if not all(by_name[g[0]].is_flag for g in tail):
                    problems.append(
                        f"{where}: {len(defaults)} defaults {defaults} for {len(groups)} options "
                        f"{[g[0] for g in groups]}; the unpaired non-flag ones have no documented default"
                    )
            for names, doc in zip(groups, defaults):
                opt = next((by_name[n] for n in names if n in by_name), None)
                if opt is None:
                    continue  # a non-existent option: reported by the table test
                compared += 1
                why = _compare_default(doc, opt.default, bool(opt.is_flag))
                if why:
                    problems.append(f"{where}: {_label(opt)}: {why}")
    assert compared, "no documented default could be compared"
    assert not problems, f"{len(problems)} README default problem(s):\n" + "\n".join(problems)


# -- the parser itself ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("`--frames`", [["--frames"]]),
        ("`--draws/-K`", [["--draws", "-K"]]),
        ("`--batch-size` / `--workers`", [["--batch-size"], ["--workers"]]),
        (
            "`--batch-clips/-B`, `--seed`, `--overwrite`",
            [["--batch-clips", "-B"], ["--seed"], ["--overwrite"]],
        ),
        ("`--id-column --caption-column`", [["--id-column"], ["--caption-column"]]),
    ],
)
def test_option_cell_parsing(cell: str, expected: list[list[str]]) -> None:
    assert _split_options_cell(cell) == expected


def test_parsers_on_a_small_document() -> None:
    doc = [
        "## Usage",
        "```bash",
        "carv-attrib -v encode m.json --videos v \\",
        "    -o out --frames=9   # a comment --not-an-option",
        "carv-attrib status runs/x && carv-attrib env",
        "```",
        "Rebuild with `carv-attrib index RUN --precondition trak`; `carv-attrib` alone is no command.",
        "### `score QUERY --run RUN`",
        "| option | default | meaning |",
        "|---|---|---|",
        "| `--top-k` | 10 | how many, `a|b` |",
        "| `--device` / `--workers` | auto / 1 | |",
        "#### not a boundary",
        "## Next",
        "| `--x` | 1 | |",
        "a span that wraps: `carv-attrib",
        "score Q --run R` is one usage.",
    ]
    usages = _usages(doc)
    assert [(u.line, u.where) for u in usages] == [
        (3, "code block"),
        (5, "code block"),
        (7, "inline code"),
        (8, "heading"),
        (16, "inline code"),
    ]
    assert usages[-1].text == "carv-attrib score Q --run R"
    assert _invocations(usages[0].text) == [
        ["-v", "encode", "m.json", "--videos", "v", "-o", "out", "--frames=9"]
    ]
    assert _invocations(usages[1].text) == [["status", "runs/x"], ["env"]]
    (section,) = _sections(doc)
    assert section.command == "score" and section.line == 8
    header, rows = section.table()
    assert header == ["option", "default", "meaning"]
    assert [r.line for r in rows] == [11, 12] and rows[0].cells[2].strip() == "how many, `a|b`"
    assert _split_defaults_cell("auto / 1", 2) == ["auto", "1"]
    assert _compare_default("1e-2", 0.01, False) is None and _compare_default("120 s", 120.0, False) is None
    assert _compare_default("off", False, True) is None and _compare_default("on", False, True)
    assert _compare_default("17", 9, False) and _compare_default("8×8 per layer", None, False) is None
    assert _compare_default("auto", "cpu", False) and _compare_default("AUTO", "auto", False) is None
