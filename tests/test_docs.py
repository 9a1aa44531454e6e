"""README.md is the user guide and docs/ the rest: links that resolve, a README short enough to read, the recipe
table on its first screen, and the dataset credit wherever results appear."""

import re
import subprocess
import sys

from conftest import ROOT

README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")  # Markdown links: [text](target)
FIGSHARE_DOI = "10.6084/m9.figshare.1512427"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path) -> set[str]:
    """The anchors of every heading in a Markdown file (outside code blocks)."""
    found, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            found.add(slug(line.lstrip("#")))
    return found


def local_links(path) -> list[tuple[str, str]]:
    """(file, anchor) of every relative link in a Markdown file; the file is '' for a link within it."""
    links = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        links.append((file, anchor))
    return links


def test_every_relative_link_and_anchor_of_readme_and_docs_resolves():
    pages = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert any(file.startswith("docs/") and file.endswith(".md") for file, _ in local_links(README))
    for page in pages:
        for file, anchor in local_links(page):
            target = (page.parent / file).resolve() if file else page
            assert target.exists(), f"{page.name} links to {file}, which does not exist"
            if anchor and target.suffix == ".md":
                assert anchor in anchors(target), f"{page.name} links to {file}#{anchor}: no such heading"


def test_readme_is_at_most_450_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= 450, f"README.md has {lines} lines; move details to docs/ and leave a pointer"


def test_the_recipe_table_is_on_the_readmes_first_screen():
    head = README.read_text().splitlines()[:80]
    header = next((i for i, line in enumerate(head) if line.startswith("| recipe |")), None)
    assert header is not None, "the recipe table's header is not within README.md's first 80 lines"
    rows = "\n".join(head[header:])
    for recipe in ("`--recipe seed`", "`--recipe cpu`", "`--recipe cpu-long`", "`--recipe gpu`"):
        assert f"| {recipe} |" in rows, f"{recipe} is not in the recipe table within the first 80 lines"


def test_the_figshare_credit_stands_wherever_results_appear():
    for page in (README, ROOT / "docs" / "results.md"):
        text = page.read_text()
        assert FIGSHARE_DOI in text and "Jun Cheng" in text and "CC BY 4.0" in text, page.name


COMMAND = re.compile(r"python ([a-z_]+)\.py((?: [a-z]+)?)((?:[^\n]|\\\n)*)")  # continued lines joined
SUBCOMMANDS = {"crossval": ("run", "table", "compare", "rerule"), "prepare_data": ("demo", "figshare", "nifti")}


def documented_commands() -> list[tuple[str, str, set[str], str]]:
    """(script, sub-command, its --flags, where) of every `python <script>.py ...` in README.md and docs/."""
    found = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for script, sub, rest in COMMAND.findall(page.read_text()):
            if not (ROOT / f"{script}.py").is_file():
                continue  # e.g. a user's own script shown in an example
            sub = sub.strip() if sub.strip() in SUBCOMMANDS.get(script, ()) else ""
            found.append((script, sub, set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest)), page.name))
    return found


def test_every_flag_the_readme_and_docs_show_is_one_the_command_takes():
    helps: dict[tuple[str, str], str] = {}

    def help_text(script: str, sub: str) -> str:
        if (script, sub) not in helps:
            argv = [sys.executable, f"{script}.py", *([sub] if sub else []), "--help"]
            helps[script, sub] = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
        return helps[script, sub]

    commands = documented_commands()
    assert len(commands) > 50 and {script for script, *_ in commands} >= {"train", "test", "crossval", "export"}
    unknown = []
    for script, sub, flags, page in commands:
        known = help_text(script, sub)
        if script == "crossval" and sub in ("run", "rerule"):
            known += help_text("train", "")  # they pass the flags they do not know to train.py
        if not known.strip():  # a script without argparse help (report.py, config.py): its source names its flags
            known = (ROOT / f"{script}.py").read_text()
        unknown += [f"{page}: python {script}.py {sub} {flag}" for flag in flags if flag not in known]
    assert not unknown, "flags no command takes:\n" + "\n".join(sorted(set(unknown)))
