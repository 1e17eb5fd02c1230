"""The docs name only what exists: repo paths, markdown links, stages, CLI flags and make targets.

For README.md and every docs/*.md, `check_docs` reports (doc, line, what, reference) for
- a repo path that does not exist: anything under llmray/, jobs/, bench/, tests/, serving/, cluster/,
  docs/, or Makefile, pyproject.toml, .ci/run, in code spans, code blocks, links and prose (a path
  has an extension, a trailing `/`, two `/`, a glob or a capitalised file name: "docs/s" is a unit
  of throughput, not a path); `<placeholder>` and
  `*` match any name and need at least one match, `{a,b}` is expanded; a dotted module such as
  `llmray.serving.server` must be a module or package (attributes after the module are not checked);
- a relative markdown link or image whose target does not exist (relative to the doc);
- `llmray <stage>` (in code) where the registry has no such stage (`ls` and `plan` are the CLI's own; a
  `plan` flag must be one of `cli.PLAN_FLAGS`);
- a `--flag` after `llmray <stage>` or `python jobs/<stage>.py` that neither the CLI parser nor the
  stage's config accepts (`--x-y` is config key `x_y`, `cli.FLAG_ALIASES` maps `--from`/`--until`);
- `make <target>` (in code) that the Makefile does not define.

Pure and fast: no Ray; config classes are imported through the registry, which imports no engine.
`python tests/foundation/test_docs.py` prints every miss.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PATH_PREFIXES = ("llmray", "jobs", "bench", "tests", "serving", "cluster", "docs")
TOP_LEVEL_FILES = ("Makefile", "pyproject.toml", ".ci/run")
# Written by the benchmarks when they run, not part of the checkout.
GENERATED = ("bench/results/",)
# Paths a doc names on purpose although they do not exist (an error example).
MISSING_ON_PURPOSE = {"jobs/configs/corpus/nope.yaml"}
# Flags of the CLI parser itself (llmray/cli.py); the rest pass through to the stage's config.
CLI_FLAGS = {"config", "log-level", "help"}
FILE_EXT = re.compile(r"\.(py|ya?ml|md|png|json|toml|sh|txt|html|jsonl|parquet)$")

_PATH = re.compile(
    r"(?<![\w./$~-])((?:" + "|".join(PATH_PREFIXES) + r")/(?:[\w.*<>-]|\{[^{}\s]*\}|/)*"
    r"|Makefile|pyproject\.toml|\.ci/run)(?![\w-])"
)
_MODULE = re.compile(r"(?<![\w./-])llmray(?:\.[A-Za-z_]\w*)+")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# A command starts a code line or span (after a `$ ` prompt) or follows `&&`, `||`, `|`, `$(` or ` -- `;
# "llmray" in the middle of printed output ("...; llmray wall time") is not a command.
_CMD_START = r"(?:^\s*(?:\$\s+)?|(?:&&|\|\|?|\$\()\s*|\s--\s+)"
_STAGE_CMD = re.compile(_CMD_START + r"(?:[\w.~/-]*/)?llmray[ \t]+([A-Za-z][\w-]*)", re.MULTILINE)
_JOB_CMD = re.compile(r"(?:^|\s)python[ \t]+jobs/(\w+)\.py")
_MAKE = re.compile(_CMD_START + r"make[ \t]+([A-Za-z][\w-]*)", re.MULTILINE)
_FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
_CMD_END = re.compile(r"\s#|\||&&|;|`|\s&(?!\w)")


@dataclass(frozen=True)
class Miss:
    doc: str
    line: int
    what: str
    ref: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.what}: {self.ref}"


@dataclass
class Repo:
    """What the docs may name: the checkout's files, the stages and their flags, the make targets."""

    root: Path
    stage_flags: dict[str, set[str]]
    make_targets: set[str]

    @classmethod
    def load(cls, root: Path = ROOT) -> Repo:
        from llmray import cli, stages

        flags = {}
        for name, stage in stages.STAGES.items():
            keys = {f.name for f in dataclasses.fields(stage.config_class())}
            flags[name] = keys | {a for a, k in cli.FLAG_ALIASES.items() if k in keys}
        return cls(root, flags, make_targets(root / "Makefile"))

    def flag_ok(self, stage: str, flag: str) -> bool:
        return flag in CLI_FLAGS or flag.replace("-", "_") in self.stage_flags[stage] \
            or flag in self.stage_flags[stage]


def make_targets(makefile: Path) -> set[str]:
    targets = set()
    for line in makefile.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\- ]+):(?!=)", line)
        if m and not line.startswith("\t"):
            targets.update(t for t in m.group(1).split() if not t.startswith("."))
    return targets


def looks_like_path(ref: str) -> bool:
    """`docs/s` (documents per second) is a unit; `docs/x.md`, `llmray/rl/workers`, `cluster/Dockerfile`,
    `tests/ops/`, `jobs/<stage>.py` are paths."""
    last = ref.rstrip("/").rsplit("/", 1)[-1]
    return (ref in TOP_LEVEL_FILES or bool(FILE_EXT.search(ref)) or ref.endswith("/")
            or any(ch in ref for ch in "*<{") or ref.count("/") >= 2 or last[:1].isupper())


def _expand_braces(ref: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", ref)
    if not m:
        return [ref]
    return [x for alt in m.group(1).split(",")
            for x in _expand_braces(ref[:m.start()] + alt + ref[m.end():])]


def path_exists(root: Path, ref: str) -> bool:
    ref = ref.rstrip(".")
    if ref in MISSING_ON_PURPOSE or ref.startswith(GENERATED):
        return True
    for one in _expand_braces(ref):
        pattern = re.sub(r"<[^<>]*>", "*", one).rstrip("/")
        if any(ch in pattern for ch in "*?["):
            if not any(itertools.islice(root.glob(pattern), 1)):
                return False
        elif not (root / pattern).exists():
            return False
    return True


def module_exists(root: Path, dotted: str) -> bool:
    """`llmray.a.b.attr`: every part up to the first module file must exist; the rest are attributes."""
    parts = dotted.split(".")
    here = root / parts[0]
    for part in parts[1:]:
        if (here / f"{part}.py").is_file():
            return True
        if (here / part / "__init__.py").is_file():
            here = here / part
            continue
        init = here / "__init__.py"
        defined = re.compile(rf"^(?:def|class)\s+{part}\b|^{part}\s*[:=]|^from\s.*import.*\b{part}\b",
                             re.MULTILINE)
        return init.is_file() and bool(defined.search(init.read_text()))
    return True


def _segments(text: str):
    """(line number, text, kind) for every code block line, code span and prose line."""
    fence = None
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if stripped.startswith(("```", "~~~")):
            fence = None if fence else stripped[:3]
            continue
        if fence:
            yield no, line, "code"
            continue
        yield no, _CODE_SPAN.sub(" ", line), "prose"
        for m in _CODE_SPAN.finditer(line):
            yield no, m.group(2), "code"


def _command_flags(code: str, start: int) -> list[str]:
    rest = code[start:]
    end = _CMD_END.search(rest)
    return _FLAG.findall(rest[: end.start()] if end else rest)


def check_text(text: str, doc: str, repo: Repo, doc_dir: Path | None = None) -> list[Miss]:
    doc_dir = doc_dir if doc_dir is not None else repo.root
    misses: list[Miss] = []
    for no, line, kind in _segments(text):
        if kind == "prose":
            for m in _LINK.finditer(line):
                target = m.group(1).split("#")[0]
                if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target) \
                        and not (doc_dir / target).exists():
                    misses.append(Miss(doc, no, "broken link", m.group(1)))
            line = _LINK.sub(" ", line)
        for m in _PATH.finditer(line):
            ref = m.group(1).rstrip(".")
            if not looks_like_path(ref):
                continue
            if ref.rstrip("/") in PATH_PREFIXES:
                continue
            if not path_exists(repo.root, ref):
                misses.append(Miss(doc, no, "no such path", ref))
        for m in _MODULE.finditer(line):
            if not module_exists(repo.root, m.group(0)):
                misses.append(Miss(doc, no, "no such module", m.group(0)))
        if kind == "prose":
            continue
        for m in _STAGE_CMD.finditer(line):
            stage = m.group(1)
            if stage in ("ls", "list"):
                continue
            if stage == "plan":  # the CLI's dry run: its own flags (cli.PLAN_FLAGS)
                from llmray.cli import PLAN_FLAGS

                for flag in _command_flags(line, m.end()):
                    if flag not in PLAN_FLAGS and flag not in CLI_FLAGS:
                        misses.append(Miss(doc, no, "no such flag", f"llmray plan --{flag}"))
                continue
            if stage not in repo.stage_flags:
                misses.append(Miss(doc, no, "no such stage", f"llmray {stage}"))
                continue
            for flag in _command_flags(line, m.end()):
                if not repo.flag_ok(stage, flag):
                    misses.append(Miss(doc, no, "no such flag", f"llmray {stage} --{flag}"))
        for m in _JOB_CMD.finditer(line):
            stage = m.group(1).replace("_", "-")
            if stage not in repo.stage_flags:
                continue
            for flag in _command_flags(line, m.end()):
                if not repo.flag_ok(stage, flag):
                    misses.append(Miss(doc, no, "no such flag", f"jobs/{m.group(1)}.py --{flag}"))
        for m in _MAKE.finditer(line):
            if m.group(1) not in repo.make_targets:
                misses.append(Miss(doc, no, "no such make target", f"make {m.group(1)}"))
    return misses


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def check_docs(root: Path = ROOT, repo: Repo | None = None) -> list[Miss]:
    repo = repo or Repo.load(root)
    misses = []
    for path in doc_files(root):
        misses += check_text(path.read_text(), str(path.relative_to(root)), repo, path.parent)
    return misses


def test_docs_name_only_what_exists():
    misses = check_docs()
    assert not misses, f"{len(misses)} doc reference(s) to nothing:\n" + "\n".join(map(str, misses))


def test_checker_reports_each_kind_of_miss(tmp_path):
    (tmp_path / "llmray").mkdir()
    (tmp_path / "llmray" / "__init__.py").write_text("")
    (tmp_path / "llmray" / "cli.py").write_text("")
    (tmp_path / "jobs" / "configs" / "pretrain").mkdir(parents=True)
    (tmp_path / "jobs" / "configs" / "pretrain" / "tiny.yaml").write_text("")
    (tmp_path / "jobs" / "pretrain.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("")
    (tmp_path / "Makefile").write_text("run: install\n\tdo\ntest lint:\n\tdo\nX := 1\n")
    repo = Repo(tmp_path, {"pretrain": {"max_steps", "config_x"},
                           "pipeline": {"from_stage", "keep_serving", "from"}},
                make_targets(tmp_path / "Makefile"))
    assert repo.make_targets == {"run", "test", "lint"}
    lines = [
        "See [a](docs/a.md), [b](docs/b.md) and ![img](docs/images/x.png) or [web](https://x.org/y).",
        "`llmray/cli.py`, `llmray/gone.py`, `jobs/configs/<stage>/*.yaml`, `jobs/configs/<stage>/*.json`",
        "`jobs/configs/pretrain/{tiny,huge}.yaml` and `llmray.cli.main` and `llmray.nothing.here`",
        "```bash",
        "make run && make test-fast",
        "llmray ls",
        "llmray pretrain --config jobs/configs/pretrain/tiny.yaml --max-steps 3 --bogus   # --not-this",
        "llmray pipeline --from sft --keep-serving",
        "llmray retrain --config x.yaml",
        "ray job submit -- python jobs/pretrain.py --config x.yaml --nope",
        "```",
        "Prose: 400 docs/s, and `bench/results/serve.json` is written by the bench.",
        "```",
        "    docs contender    seconds    docs/s   peak MB  see cluster/Nope and llmray/data/nope",
        "```",
    ]
    got = {(m.line, m.what, m.ref) for m in check_text("\n".join(lines), "fake.md", repo)}
    assert got == {
        (1, "broken link", "docs/b.md"),
        (1, "broken link", "docs/images/x.png"),
        (2, "no such path", "llmray/gone.py"),
        (2, "no such path", "jobs/configs/<stage>/*.json"),
        (3, "no such path", "jobs/configs/pretrain/{tiny,huge}.yaml"),
        (3, "no such module", "llmray.nothing.here"),
        (5, "no such make target", "make test-fast"),
        (7, "no such flag", "llmray pretrain --bogus"),
        (9, "no such stage", "llmray retrain"),
        (10, "no such flag", "jobs/pretrain.py --nope"),
        (14, "no such path", "cluster/Nope"),
        (14, "no such path", "llmray/data/nope"),
    }, got


if __name__ == "__main__":
    for miss in check_docs():
        print(miss)
