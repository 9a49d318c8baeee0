"""Time to first result: how much of a new process is compilation, and what the persistent
compilation cache gives back (issue 20, item 6).

For each workload (`probflow bpd --limit 64`, `probflow encode`, `probflow sample`, and the
library's first `pf.bits_per_dim` of 64 digits test images under `digits-vp`), measured side by
side in one run:

- a new process with an empty cache (end to end, imports included);
- a new process with the cache such a process filled (the same);
- the warm call in-process (the same work again in one process: nothing left to compile).

For the library the two new-process columns time the first call only (after imports and loading
the model), as a user's script would see it. The `-traced` rows are the same workloads with the
traced solves not stored (`PROBFLOW_STORE_PROGRAMS=0`, `store_programs=False`): what the stored
programs save, side by side. `bpd-no-check` is `probflow bpd` without its solver-bias check.
Each new-process column is the median of `--runs` processes (3 by default). Prints a markdown
table with the ratios.

    python benchmarks/time_to_first_result.py [--only bpd,lib]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Calls `main(argv)` (the CLI) or the library twice in one process; prints each call's time.
_PROBE = r"""
import json, os, sys, time
kind, cache, argv = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
os.environ["PROBFLOW_CACHE_DIR"] = cache
import jax
import probflow as pf
if kind.startswith("lib"):
    pf.enable_compilation_cache(cache, store_programs=kind == "lib")
    model, sde = pf.load_pretrained("digits-vp")
    x = pf.data.load("digits", "test").images[:64]
    def call():
        r = pf.bits_per_dim(model, sde, x, key=jax.random.key(0), num_bins=17)
        jax.block_until_ready(r.bpd)
else:
    from probflow._cli import main
    def call():
        assert main(argv) == 0
times = []
for _ in range(int(os.environ.get("PROBE_CALLS", "2"))):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
print("PROBE " + json.dumps(times))
"""


def _workloads(tmp: str) -> dict[str, tuple[str, list[str]]]:
    ckpt = ["--checkpoint", "digits-vp"]
    bpd = ["bpd", *ckpt, "--data", "digits", "--limit", "64"]
    return {
        "bpd": ("cli", bpd),
        "bpd-no-check": ("cli", [*bpd, "--check-solver", "0"]),
        "bpd-traced": ("cli-traced", bpd),
        "encode": ("cli", ["encode", *ckpt, "--data", "digits", "--limit", "64",
                           "--out", os.path.join(tmp, "z.npz")]),
        "sample": ("cli", ["sample", *ckpt, "--num", "64", "--out", os.path.join(tmp, "s.png")]),
        "lib": ("lib", []),
        "lib-traced": ("lib-traced", []),
    }


def _process(kind: str, argv: list[str], cache: str, calls: int) -> tuple[float, list[float]]:
    """(wall time of a new process, its calls' times)."""
    env = dict(os.environ, PROBFLOW_CACHE_DIR=cache, PROBE_CALLS=str(calls),
               PROBFLOW_STORE_PROGRAMS="0" if kind.endswith("-traced") else "1")
    kind = "cli" if kind.startswith("cli") else kind
    if kind == "cli" and calls == 1:
        cmd = [sys.executable, "-m", "probflow", *argv]  # the command itself, end to end
    else:
        cmd = [sys.executable, "-c", _PROBE, kind, cache, json.dumps(argv)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {proc.stderr[-2000:]}")
    calls_s = json.loads(proc.stdout.split("PROBE ")[1]) if "PROBE " in proc.stdout else []
    return wall, calls_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="bpd,bpd-no-check,bpd-traced,encode,sample,lib,lib-traced",
                   help="comma-separated workloads (bpd, bpd-no-check, bpd-traced, encode, "
                        "sample, lib, lib-traced)")
    p.add_argument("--runs", type=int, default=3,
                   help="new processes per workload and column, empty cache and warm (the "
                        "median is reported: one run varies by about 0.5-1 s here)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, argv) in _workloads(tmp).items():
            if name not in args.only.split(","):
                continue
            # Each empty-cache run fills a cache of its own; the warm runs use the last one.
            caches = [os.path.join(tmp, f"cache-{name}-{k}") for k in range(args.runs)]
            if kind.startswith("cli"):
                cold = statistics.median(_process(kind, argv, c, 1)[0] for c in caches)
                warm = statistics.median(
                    _process(kind, argv, caches[-1], 1)[0] for _ in range(args.runs))
                _, calls = _process(kind, argv, caches[-1], 2)
                inproc = calls[1]
            else:
                cold = statistics.median(_process(kind, argv, c, 2)[1][0] for c in caches)
                runs = [_process(kind, argv, caches[-1], 2)[1] for _ in range(args.runs)]
                warm = statistics.median(r[0] for r in runs)
                inproc = statistics.median(r[1] for r in runs)
            rows.append((name, cold, warm, inproc))
            print(f"{name}: cold {cold:.1f} s, warm cache {warm:.1f} s, in-process {inproc:.1f} s",
                  file=sys.stderr)
    print("| workload | new process, empty cache (s) | new process, warm cache (s) | "
          "warm call in-process (s) | warm cache / empty | warm cache / in-process |")
    print("|---|---:|---:|---:|---:|---:|")
    labels = {"bpd": "`probflow bpd --limit 64`",
              "bpd-no-check": "`probflow bpd --limit 64 --check-solver 0`",
              "bpd-traced": "`probflow bpd --limit 64`, programs not stored",
              "encode": "`probflow encode` (64)", "sample": "`probflow sample` (64)",
              "lib": "first `pf.bits_per_dim` (64)",
              "lib-traced": "first `pf.bits_per_dim` (64), programs not stored"}
    for name, cold, warm, inproc in rows:
        print(f"| {labels[name]} | {cold:.1f} | {warm:.1f} | {inproc:.1f} | {warm / cold:.2f} | "
              f"{warm / inproc:.1f} |")


if __name__ == "__main__":
    main()
