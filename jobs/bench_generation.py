"""Generation throughput: raylign's TransformersEngine vs a plain ``model.generate`` call.

Same model, same prompts and images, same batch (``--batch`` prompts x ``--n`` samples), same
``--max-tokens``, sampling at temperature 1. The engine also computes per-token logprobs, trims
after EOS and builds records; the ratio says what that costs. After a full-size warm-up of each,
the two are timed alternately ``--repeats`` times and the median of each is reported.

    python jobs/bench_generation.py                          # tiny Qwen2.5-VL (hidden 64) on CPU
    python jobs/bench_generation.py --hidden 256 --family llava --out bench_out/generation.json
    python jobs/bench_generation.py --model /path/to/hf_dir --device cuda

On a shared CPU machine pass ``--threads 1``: with several threads, neighbours' load makes the
OpenMP threads wait on each other and single runs vary by 10x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import GenerationConfig

from raylign.data.chat import encode_for_generation
from raylign.protocol import RolloutRequest, SamplingParams
from raylign.rollout.hf import TransformersEngine


def _requests(batch: int, n: int, max_tokens: int) -> list[RolloutRequest]:
    sampling = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens)
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    return [
        RolloutRequest(
            uid=f"b{i}", prompt=f"how many red circles are there? {i}", images=(image,), sampling=sampling
        )
        for i in range(batch)
    ]


def _plain_generate(
    engine: TransformersEngine, requests: list[RolloutRequest], max_tokens: int
) -> tuple[int, float, float]:
    """Generated tokens (to the first EOS), wall and CPU seconds of one bare ``generate`` call."""
    rows = [r for r in requests for _ in range(r.sampling.n)]
    start, cpu = time.perf_counter(), time.process_time()
    inputs = encode_for_generation(engine.processor, [r.prompt for r in rows], [r.images for r in rows])
    inputs = {k: v.to(engine.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(engine.model.dtype)
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=max_tokens,
        eos_token_id=list(engine.eos_ids),
        pad_token_id=engine.pad_id,
    )
    with torch.no_grad():
        out = engine.model.generate(**inputs, generation_config=config)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = 0
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        tokens += next((i + 1 for i, t in enumerate(row) if t in engine.eos_ids), len(row))
    return tokens, seconds, cpu


def _engine_generate(engine: TransformersEngine, requests: list[RolloutRequest]) -> tuple[int, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    rollouts = engine.generate(requests)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return sum(len(c.token_ids) for r in rollouts for c in r.completions), seconds, cpu


def run_benchmark(
    model: str | None = None,
    family: str = "qwen2_5_vl",
    hidden: int = 64,
    batch: int = 8,
    n: int = 1,
    max_tokens: int = 64,
    device: str = "cpu",
    repeats: int = 3,
) -> dict:
    """Tokens/s of both paths; builds a tiny model (``family``, ``hidden``) when ``model`` is None."""
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from raylign.models.tiny import make_tiny_model

            model = str(make_tiny_model(family, Path(tmp) / family, hidden=hidden))
        engine = TransformersEngine(model, device=device, batch_size=batch, seed=0)
        requests = _requests(batch, n, max_tokens)
        _plain_generate(engine, requests, max_tokens), _engine_generate(engine, requests)  # warm-up
        plain, timed = [], []
        for _ in range(repeats):  # alternate, so load changes on a shared machine hit both alike
            plain.append(_plain_generate(engine, requests, max_tokens))
            timed.append(_engine_generate(engine, requests))
    result = {
        "model": model if not model.startswith(tmp) else f"tiny-{family}-hidden{hidden}",
        "device": device,
        "batch_prompts": batch,
        "n": n,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "plain_tokens": sum(t for t, _, _ in plain),
        "plain_tokens_per_s": statistics.median(t / s for t, s, _ in plain),
        "plain_tokens_per_cpu_s": statistics.median(t / c for t, _, c in plain),
        "engine_tokens": sum(t for t, _, _ in timed),
        "engine_tokens_per_s": statistics.median(t / s for t, s, _ in timed),
        "engine_tokens_per_cpu_s": statistics.median(t / c for t, _, c in timed),
    }
    # Per CPU-second too: on a shared machine wall time mostly measures the neighbours.
    result["engine_over_plain"] = result["engine_tokens_per_s"] / result["plain_tokens_per_s"]
    result["engine_over_plain_cpu"] = result["engine_tokens_per_cpu_s"] / result["plain_tokens_per_cpu_s"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF directory; default: build a tiny random VLM")
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "llava"])
    parser.add_argument(
        "--hidden", type=int, default=64, help="text hidden size of the tiny model (e.g. 256)"
    )
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--json", type=Path, default=None, help="write `raylign bench` rows here")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (for `raylign bench --quick`)")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_tokens, args.repeats = min(args.max_tokens, 32), min(args.repeats, 3)
        args.threads = args.threads or 1  # steadier on a shared machine, like the other benchmarks
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_benchmark(
        args.model, args.family, args.hidden, args.batch, args.n, args.max_tokens, args.device, args.repeats
    )
    print(
        f"plain generate {result['plain_tokens_per_s']:.0f} tok/s, TransformersEngine "
        f"{result['engine_tokens_per_s']:.0f} tok/s, ratio {result['engine_over_plain']:.2f} "
        f"(per CPU-second: {result['plain_tokens_per_cpu_s']:.0f} vs {result['engine_tokens_per_cpu_s']:.0f}, "
        f"ratio {result['engine_over_plain_cpu']:.2f})"
    )
    result["threads"] = torch.get_num_threads()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(bench_rows(result)) + "\n")
    return result


def bench_rows(result: dict) -> list[dict]:
    """The result as rows of the `raylign bench` table (raylign/bench.py)."""
    setup = (f"{result['model']}, {result['batch_prompts']} prompts x {result['n']}, {result['max_tokens']} tokens, "
             f"median of {result['repeats']}, {result['threads']} thread(s); per CPU-second ratio "
             f"{result['engine_over_plain_cpu']:.2f}")
    return [{"benchmark": "generation", "metric": "generate tokens/s", "raylign": result["engine_tokens_per_s"],
             "baseline": result["plain_tokens_per_s"], "baseline_name": "model.generate (same model, batch)",
             "ratio": result["engine_over_plain"], "notes": setup}]


if __name__ == "__main__":
    main()
