"""The documentation tells the truth: every command and flag it shows exists, its tables render
as tables, and it describes the product (not who obtained a figure or on which occasion).

Commands are taken from the fenced code blocks and the inline code spans of README.md,
prompts/README.md and docs/*.md (markdown-it-py). Each ``python test.py``, ``python train.py``,
``python -m MODULE [SUBCOMMAND]``, ``filo SUBCOMMAND`` or ``torchrun ... CLI`` command is
resolved to its CLI, whose ``--help`` is produced in-process; every ``--flag`` of the command
must appear in it. ``bash scripts/NAME.sh`` must name an existing script. An inline span that is
only a flag (``--flag`` or ``--flag VALUE``) must be a flag of some filo CLI.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

markdown_it = pytest.importorskip("markdown_it")

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "prompts" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# flags of other programs that the docs show (pip, torchrun, chromium, pytest, curl)
EXTERNAL_FLAGS = {"--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint",
                  "--node_rank", "--master_addr", "--master_port", "--standalone",
                  "--index-url", "--extra-index-url", "--headless", "--no-sandbox",
                  "--durations", "--upgrade", "--quiet", "--dry-run", "--no-deps"}
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
CLI_HEADS = ("python", "python3", "filo", "torchrun", "bash", "test.py", "train.py")


def _markdown(path: Path):
    md = markdown_it.MarkdownIt("commonmark").enable("table")
    text = path.read_text(encoding="utf-8")
    return text, md.parse(text)


@cache
def help_text(target: tuple[str, ...]) -> str:
    """``--help`` of a CLI: ("path", "test.py", *sub) or ("module", "filo.detect", *sub)."""
    kind, name, *sub = target
    argv0 = str(ROOT / name) if kind == "path" else name
    old_argv = sys.argv
    sys.argv = [argv0, *sub, "--help"]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            try:
                if kind == "path":
                    runpy.run_path(argv0, run_name="__main__")
                else:
                    runpy.run_module(name, run_name="__main__", alter_sys=True)
            except SystemExit:
                pass
    finally:
        sys.argv = old_argv
    return buf.getvalue()


def _subcommands(help_out: str) -> set[str]:
    """Subcommand names of an argparse --help ('{a,b,c}' in the usage line)."""
    usage = help_out.split("\n\n", 1)[0]
    m = re.search(r"\{([\w,-]+)\}", usage)
    return set(m.group(1).split(",")) if m else set()


def resolve(words: list[str]) -> tuple[tuple[str, ...] | None, list[str], str | None]:
    """(CLI target, the words after it, problem) of one shell command (env assignments and
    ``source env.sh &&`` already split off)."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words:
        return None, [], None
    head = words[0]
    if head == "torchrun":
        rest = words[1:]
        while rest and rest[0].startswith("--"):
            rest = rest[2:] if len(rest) > 1 and not rest[1].startswith("-") and "=" not in rest[0] \
                and rest[0] != "--standalone" else rest[1:]
        words = ["python", *rest]
        head = "python"
    if head == "bash":
        script = words[1] if len(words) > 1 else ""
        if script.startswith("scripts/") or script.startswith("benchmarks/"):
            if not (ROOT / script).is_file():
                return None, [], f"no such script: {script}"
        return None, [], None
    if head in ("test.py", "train.py"):
        words = ["python", *words]
        head = "python"
    if head == "filo":
        words = ["python", "-m", "filo", *words[1:]]
        head = "python"
    if head not in ("python", "python3") or len(words) < 2:
        return None, [], None
    if words[1] == "-m":
        if len(words) < 3 or not words[2].startswith("filo"):
            return None, [], None
        target: tuple[str, ...] = ("module", words[2])
        rest = words[3:]
    elif words[1].endswith(".py"):
        if not (ROOT / words[1]).is_file():
            return None, [], f"no such file: {words[1]}"
        if not (words[1] in ("test.py", "train.py") or words[1].startswith("filo/")
                or words[1].startswith("benchmarks/")):
            return None, [], None  # other tools: existence only
        target = ("path", words[1])
        rest = words[2:]
    else:
        return None, [], None
    # nested subcommands (python -m filo doctor, python -m filo.memory build, ...)
    while rest and not rest[0].startswith("-"):
        subs = _subcommands(help_text(target))
        if not subs:
            break
        if "|" in rest[0]:  # a|b|c: several subcommands shown at once
            missing = [a for a in rest[0].split("|") if a not in subs]
            if missing:
                return target, rest, f"no subcommand {missing[0]!r} (has: {', '.join(sorted(subs))})"
            return target, rest[1:], None
        if rest[0] not in subs:
            return target, rest, f"no subcommand {rest[0]!r} (has: {', '.join(sorted(subs))})"
        target = (*target, rest[0])
        rest = rest[1:]
    return target, rest, None


def commands_in(path: Path) -> list[tuple[int, str]]:
    """(line, command) of every shell command shown in the file."""
    text, tokens = _markdown(path)
    out: list[tuple[int, str]] = []
    for tok in tokens:
        if tok.type == "fence" and tok.info.strip() in ("bash", "sh", "shell", "console", ""):
            joined = tok.content.replace("\\\n", " ")
            for k, line in enumerate(joined.splitlines()):
                line = line.split(" #", 1)[0].strip()
                if line and not line.startswith("#"):
                    out.append((tok.map[0] + 2 + k, line))
        elif tok.type == "inline":
            for child in tok.children or []:
                if child.type == "code_inline" and child.content.split()[:1] and \
                        child.content.split()[0] in CLI_HEADS:
                    out.append((tok.map[0] + 1, child.content))
    return out


def _split_commands(line: str) -> list[list[str]]:
    line = re.sub(r"\[([^\[\]]*)\]", r" \1 ", line)  # optional parts: check what they hold
    line = line.replace("...", " ").replace("…", " ")
    try:
        words = shlex.split(line, comments=False)
    except ValueError:
        words = line.split()
    cmds, cur = [], []
    for w in words:
        if w in ("&&", ";", "||", "|"):
            cmds.append(cur)
            cur = []
        else:
            cur.append(w.rstrip(";"))
    cmds.append(cur)
    return [c for c in cmds if c and c[:2] != ["source", "env.sh"] and c[0] != "."]


def doc_problems(path: Path) -> list[str]:
    problems = []
    for lineno, line in commands_in(path):
        for words in _split_commands(line):
            target, rest, problem = resolve(words)
            where = f"{path.relative_to(ROOT)}:{lineno}: {' '.join(words)[:80]}"
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            if target is None:
                continue
            helptext = help_text(target)
            if "usage:" not in helptext:
                problems.append(f"{where}: {' '.join(target[1:])} --help printed no usage")
                continue
            for flag in FLAG.findall(" ".join(rest)):
                flag = flag.split("=")[0]
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext):
                    problems.append(f"{where}: {flag} is not a flag of {' '.join(target[1:])}")
    return problems


@cache
def all_flags() -> set[str]:
    flags: set[str] = set()
    for target in [("path", "test.py"), ("path", "train.py"), ("module", "filo.detect"),
                   ("module", "filo.predict"), ("module", "filo.memory", "build"),
                   ("module", "filo.demo"), ("module", "filo", "doctor"),
                   ("module", "filo", "download"), ("module", "filo", "serve"),
                   ("module", "filo.data", "summary"), ("module", "filo.data", "synth"),
                   ("module", "filo.data", "build-meta")]:
        flags |= set(FLAG.findall(help_text(target)))
    for target in _optional_clis():
        flags |= set(FLAG.findall(help_text(target)))
    for bench in sorted((ROOT / "benchmarks").glob("*.py")):  # flags of the benchmark scripts
        flags |= set(FLAG.findall(help_text(("path", f"benchmarks/{bench.name}"))))
    return flags


def _optional_clis() -> list[tuple[str, ...]]:
    """CLIs of further scorers, when present (each registers a module with subcommands)."""
    out = []
    for mod in ("filo.musc", "filo.baselines", "filo.deploy", "filo.export"):
        base = ROOT / Path(*mod.split("."))
        if base.is_dir() or base.with_suffix(".py").is_file():
            target = ("module", mod)
            subs = _subcommands(help_text(target))
            out += [(*target, s) for s in sorted(subs)] or [target]
    return out


def bare_flag_problems(path: Path) -> list[str]:
    text, tokens = _markdown(path)
    problems = []
    known = all_flags() | EXTERNAL_FLAGS
    for tok in tokens:
        if tok.type != "inline":
            continue
        for child in tok.children or []:
            if child.type != "code_inline":
                continue
            words = child.content.split()
            if not words or not words[0].startswith("--"):
                continue
            flag = FLAG.match(words[0])
            if flag and words[0].startswith(flag.group(0) + "*"):  # --legacy_*: a family
                if not any(k.startswith(flag.group(0)) for k in known):
                    problems.append(f"{path.relative_to(ROOT)}:{tok.map[0] + 1}: "
                                    f"`{child.content}`: no flag starts with {flag.group(0)}")
                continue
            if flag and flag.group(0) not in known:
                problems.append(f"{path.relative_to(ROOT)}:{tok.map[0] + 1}: `{child.content}`: "
                                f"{flag.group(0)} is not a flag of any filo CLI")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_flag_shown_exists(doc):
    problems = doc_problems(doc) + bare_flag_problems(doc)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_renamed_flag_and_a_missing_subcommand(tmp_path):
    """The check is not vacuous: a flag no CLI has, a subcommand the CLI lacks and a missing
    script are each reported."""
    doc = ROOT / "docs" / "_checker_probe.md"
    doc.write_text("```bash\npython test.py --dataset mvtec --save_coco out.json\n"
                   "filo test --prompts p.yaml\nbash scripts/no_such.sh\n"
                   "python -m filo.memory build --dataset mvtec --imagesize 224\n```\n"
                   "Use `--no_such_flag` here and `python -m filo.detect --pixel_metrics`.\n")
    try:
        problems = doc_problems(doc) + bare_flag_problems(doc)
    finally:
        doc.unlink()
    text = "\n".join(problems)
    assert "--save_coco is not a flag of test.py" in text
    assert "no subcommand 'test'" in text
    assert "no such script: scripts/no_such.sh" in text
    assert "--no_such_flag" in text
    for fine in ("--dataset", "--imagesize", "--pixel_metrics", "--prompts"):
        assert f"{fine} is not" not in text, fine


def table_problems(doc: Path) -> list[str]:
    """GitHub renders a line right after a table (no blank line) as one more table row: every
    line of every rendered table must be a pipe row of the source, and a table must be followed
    by a blank line."""
    text, tokens = _markdown(doc)
    lines = text.splitlines()
    name = doc.name if not doc.is_relative_to(ROOT) else str(doc.relative_to(ROOT))
    problems = []
    for tok in tokens:
        if tok.type == "table_open":
            start, end = tok.map
            for i in range(start, end):
                if not lines[i].lstrip().startswith("|"):
                    problems.append(f"{name}:{i + 1}: {lines[i][:70]!r} is rendered inside the "
                                    f"table above it (add a blank line)")
    in_fence = False
    for i, line in enumerate(lines[:-1]):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        nxt = lines[i + 1]
        if not in_fence and line.lstrip().startswith("|") and nxt.strip() \
                and not nxt.lstrip().startswith("|"):
            problems.append(f"{name}:{i + 2}: {nxt[:70]!r} follows a table without a blank line")
    return sorted(set(problems))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_do_not_swallow_the_next_paragraph(doc):
    problems = table_problems(doc)
    assert not problems, "\n".join(problems)


def test_table_check_catches_a_swallowed_paragraph(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text("| a | b |\n| --- | --- |\n| 1 | 2 |\nThis sentence ends up in the table.\n\n"
                   "| c |\n| --- |\n| 3 |\n\nA paragraph after a blank line.\n")
    problems = table_problems(bad)
    assert len(problems) >= 1 and all(":4:" in p for p in problems), problems


# Sentences about who obtained a figure or on which occasion, instead of about the product.
NOT_ABOUT_THE_PRODUCT = [
    r"\bsessions?\b", r"\bfile[dr]\b", r"\blent\b", r"\bworkplace\b", r"\bissues?\b",
    r"\b(measured|available|downloadable|run|ran|tested|seen|repeated) here\b",
    r"\bthis machine\b", r"\bthe machine this\b", r"\b(we|I) (measured|saw|ran|found|tried)\b",
    r"\bthis work\b", r"\bearlier run\b", r"\bthe filer\b", r"\bby a user\b",
    r"\bthis CPU\b", r"\bthe benchmark machine\b",
]


@pytest.mark.parametrize("doc", DOCS + [ROOT / "scripts" / "README.md",
                                        ROOT / "third_party" / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_describe_the_product_not_who_measured(doc):
    problems = []
    for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        for pat in NOT_ABOUT_THE_PRODUCT:
            m = re.search(pat, line, re.IGNORECASE)
            if m:
                problems.append(f"{doc.relative_to(ROOT)}:{i}: {m.group(0)!r} in {line.strip()[:90]!r}")
    assert not problems, "\n".join(problems)


def test_prompts_readme_lists_every_prompt_file():
    text = (ROOT / "prompts" / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([\w.-]+\.yaml)` \|", text, re.MULTILINE))
    assert listed == {p.name for p in (ROOT / "prompts").glob("*.yaml")}
