"""Submit a raylign recipe to a Ray cluster, follow its logs, and exit with the job's outcome.

    python jobs/submit.py jobs/grpo_qwen2_5_vl_3b.yaml --address http://127.0.0.1:8265 \\
        -- --train.max_steps=200 --rollout.resources.rollout=1 --learner.resources.learner=1

is the Python form of

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        raylign grpo --config jobs/grpo_qwen2_5_vl_3b.yaml --train.max_steps=200 ...

It uses ``ray.job_submission.JobSubmissionClient``: the working directory (default: the repository
root; .gitignore'd files and run outputs are left out) is uploaded and becomes the job's current
directory and the first entry of PYTHONPATH on every node, so the cluster runs the raylign code you
have here. The entrypoint is ``raylign <method> --config <recipe> [overrides]``; the method is the
recipe's ``method:`` key unless ``--method`` says otherwise. Everything after ``--`` is passed on
as config overrides.

Exit status: 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED, 2 for a usage error, 130
when interrupted (the job keeps running; the message says how to stop it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = ("sft", "dpo", "mpo", "grpo", "gspo")
# Never uploaded, on top of what .gitignore leaves out (Ray honours it): outputs and environments.
EXCLUDES = [".git/", ".venv/", "runs/", "bench_out/", "report/", "**/__pycache__/", "*.safetensors"]
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
POLL_S = 5.0


class SubmitError(ValueError):
    """A usage problem; the message says what to change."""


def recipe_method(recipe: Path, method: str | None = None) -> str:
    """The training method: `method` when given, else the recipe's top-level `method:` key."""
    if method is None:
        try:
            data = yaml.safe_load(recipe.read_text()) if recipe.is_file() else None
        except yaml.YAMLError as e:
            raise SubmitError(f"{recipe}: not valid YAML ({' '.join(str(e).split())})") from e
        if not isinstance(data, dict):
            raise SubmitError(f"{recipe}: not a recipe file (a YAML mapping of config sections)")
        method = data.get("method")
    if method not in METHODS:
        raise SubmitError(f"{recipe}: method {method!r} is none of {', '.join(METHODS)}; pass --method")
    return method


def recipe_in_working_dir(recipe: Path, working_dir: Path) -> str:
    """The recipe's path relative to the uploaded working directory (the job's current directory)."""
    try:
        return recipe.resolve().relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise SubmitError(
            f"{recipe} is outside --working-dir {working_dir}; only that directory is uploaded"
        ) from None


def build_entrypoint(method: str, recipe: str, overrides: Sequence[str] = ()) -> str:
    """The job's shell command: `raylign <method> --config <recipe> [overrides]`, quoted."""
    return shlex.join(["raylign", method, "--config", recipe, *overrides])


def parse_env(items: Sequence[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """`KEY=VALUE`, or a bare `KEY` copied from this environment (keeps a token off the command line)."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE or KEY")
        if not sep:
            if key not in environ:
                raise SubmitError(f"--env {key}: not set in this environment; use --env {key}=VALUE")
            value = environ[key]
        out[key] = value
    return out


def build_runtime_env(working_dir: str, pip: Sequence[str] = (), env_vars: dict[str, str] | None = None) -> dict:
    """A Ray runtime_env: the uploaded working dir, extra pip packages, environment variables."""
    env: dict[str, Any] = {"working_dir": working_dir, "excludes": list(EXCLUDES)}
    if pip:
        env["pip"] = list(pip)
    env["env_vars"] = {"PYTHONUNBUFFERED": "1", **(env_vars or {})}
    return env


async def _tail(client: Any, job_id: str, write: Callable[[str], Any]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        write(chunk)


def follow(client: Any, job_id: str, write: Callable[[str], Any] | None = None, poll_s: float = POLL_S) -> str:
    """Stream the job's logs (to `write`, default stdout) until it ends; returns SUCCEEDED, FAILED or STOPPED."""
    write = write or sys.stdout.write
    try:
        asyncio.run(_tail(client, job_id, write))
    except RuntimeError as e:  # the log stream broke (e.g. a proxy closed it); the job is not affected
        print(f"\nraylign submit: log stream ended early ({e}); polling the job status", file=sys.stderr)
    status = str(client.get_job_status(job_id))
    while status not in TERMINAL:
        time.sleep(poll_s)
        status = str(client.get_job_status(job_id))
    return status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python jobs/submit.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Arguments after `--` are raylign config overrides, e.g. -- --train.max_steps=100.",
    )
    p.add_argument("recipe", type=Path, help="recipe YAML, e.g. jobs/grpo_qwen2_5_vl_3b.yaml")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="Ray dashboard / job server URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--method", choices=METHODS, help="training method (default: the recipe's `method:`)")
    p.add_argument("--working-dir", type=Path, default=REPO_ROOT, help="directory to upload (default: repo root)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ", help="extra pip requirement (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="environment variable for the job (repeatable); a bare KEY copies it from here")
    p.add_argument("--submission-id", help="job id (default: generated by Ray)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver process")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--dry-run", action="store_true", help="print the entrypoint and runtime_env; submit nothing")
    return p


def main(argv: Sequence[str] | None = None, client_factory: Callable[[str], Any] | None = None) -> int:
    """Parse `argv`, submit, follow; returns the exit status. `client_factory(address)` is for tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    overrides = argv[split + 1:]
    try:
        method = recipe_method(args.recipe, args.method)
        recipe = recipe_in_working_dir(args.recipe, args.working_dir)
        runtime_env = build_runtime_env(str(args.working_dir), args.pip, parse_env(args.env))
    except SubmitError as e:
        print(f"raylign submit: error: {e}", file=sys.stderr)
        return 2
    entrypoint = build_entrypoint(method, recipe, overrides)
    if args.dry_run:
        print(yaml.safe_dump({"address": args.address, "entrypoint": entrypoint, "runtime_env": runtime_env},
                             sort_keys=False), end="")
        return 0
    if client_factory is None:
        from ray.job_submission import JobSubmissionClient

        client_factory = JobSubmissionClient
    client = client_factory(args.address)
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        metadata={"raylign_method": method, "raylign_recipe": recipe},
    )
    print(f"raylign submit: job {job_id} submitted to {args.address}: {entrypoint}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nraylign submit: stopped following; job {job_id} keeps running. Stop it with:\n"
              f"  ray job stop --address {args.address} {job_id}", file=sys.stderr)
        return 130
    print(f"raylign submit: job {job_id} {status}", file=sys.stderr)
    return TERMINAL[status]


if __name__ == "__main__":
    sys.exit(main())
