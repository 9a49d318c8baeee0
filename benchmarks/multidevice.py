"""Data-parallel training speed: steps/s on 1 vs N devices, and the parameter difference.

On this CPU machine the devices are forced ones (XLA_FLAGS=--xla_force_host_platform_device_count=N,
set by this script before jax is imported): they share the same cores, so the numbers measure the
sharding's overhead, not a speed-up; on GPUs/TPUs each device brings its own compute. For each
workload the same run (seed, global batch, steps) is trained with `devices=None` (JAX's default
single device) and with `devices=N`; steps/s is the median over the logged windows after the
first (which includes compilation), and `max |diff|` the largest difference of the final
parameters (float32 round-off from the different summation order of the gradient all-reduce).

Workloads: an MLP (width 256, depth 3) on toy:two-moons, batch 512, 50 steps per jitted call;
the digits U-Net (channels 32,64, the shipped models' size) on digits, batch 64, 1 step per call.

Run:  python benchmarks/multidevice.py [--devices 2] [--quick] [--json PATH]

`--processes N` instead compares 1 and N *processes* (jax.distributed on 127.0.0.1, gloo CPU
collectives, one CPU device each, run one after the other): training steps/s of the MLP workload
(global batch 512) and the wall time of `pf.distributed_bits_per_dim` over 64 toy:two-moons
points in batches of 8 (timed after a compiling warm-up batch), with the largest difference of
the final parameters and of the per-example bits/dim from the 1-process run.
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


def _worker(args) -> dict:
    import equinox as eqx
    import jax
    import numpy as np

    import probflow as pf
    from probflow.models import MLP, UNet

    sde = pf.VPSDE()
    workloads = {
        "mlp/toy:two-moons": dict(
            data=pf.data.load("toy:two-moons", "train"),
            model=MLP(2, sde=sde, width=256, depth=3, key=jax.random.key(0)),
            batch=512, spc=50, steps=250 if args.quick else 1000,
        ),
        "unet/digits": dict(
            data=pf.data.load("digits", "train"),
            model=UNet((8, 8, 1), sde=sde, channels=(32, 64), key=jax.random.key(0)),
            batch=64, spc=1, steps=25 if args.quick else 100,
        ),
    }
    leaves = lambda m: [np.asarray(x) for x in jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))]
    results = {}
    for name, w in workloads.items():
        cfg = pf.TrainConfig(steps=w["steps"], batch_size=w["batch"], lr=5e-4, warmup=10,
                             steps_per_call=w["spc"], checkpoint_every=w["steps"],
                             log_every=w["steps"] // 5)
        row, finals = {}, {}
        for devices in (None, args.devices):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                r = pf.train(w["model"], sde, w["data"], cfg, out=f"{tmp}/run", progress=False,
                             devices=devices)
                wall = time.perf_counter() - t0
                with open(f"{tmp}/run/log.jsonl") as f:
                    rates = [json.loads(line)["steps_per_s"] for line in f]
            label = "1" if devices is None else str(devices)
            row[f"steps_per_s_{label}"] = statistics.median(rates[1:])
            row[f"wall_s_{label}"] = wall
            finals[label] = leaves(r.raw_model)
        row["max_abs_diff"] = max(
            float(np.abs(a - b).max()) for a, b in zip(finals["1"], finals[str(args.devices)])
        )
        row["steps"], row["batch"] = w["steps"], w["batch"]
        results[name] = row
    return {"devices": [str(d) for d in jax.devices()], "workloads": results}


def _process_worker(args) -> dict:
    if args.num_processes > 1:
        from probflow._distributed import initialize_distributed

        initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                               heartbeat_timeout_seconds=30)
    import equinox as eqx
    import jax
    import numpy as np

    import probflow as pf
    from probflow.models import MLP

    sde = pf.VPSDE()
    ds = pf.data.load("toy:two-moons", "train")
    model = MLP(2, sde=sde, width=256, depth=3, key=jax.random.key(0))
    steps = 250 if args.quick else 1000
    cfg = pf.TrainConfig(steps=steps, batch_size=512, lr=5e-4, warmup=10, steps_per_call=50,
                         checkpoint_every=steps, log_every=steps // 5)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        r = pf.train(model, sde, ds, cfg, out=f"{out}/run", progress=False,
                     devices=jax.device_count())
        rates = None
        if jax.process_index() == 0:
            with open(f"{out}/run/log.jsonl") as f:
                rates = [json.loads(line)["steps_per_s"] for line in f]
    opts = dict(num_bins=ds.num_bins, data_range=ds.data_range, rtol=1e-5, atol=1e-5)
    images = ds.images[:64]
    warm = images[: 8 * jax.process_count()]  # one batch per process: each one compiles
    pf.distributed_bits_per_dim(r.model, sde, warm, key=jax.random.key(1), batch_size=8, **opts)
    t0 = time.perf_counter()
    b = pf.distributed_bits_per_dim(r.model, sde, images, key=jax.random.key(1), batch_size=8,
                                    **opts)
    bpd_s = time.perf_counter() - t0
    return {"steps_per_s": None if rates is None else statistics.median(rates[1:]),
            "bpd_s": bpd_s, "bpd": np.asarray(b.bpd).tolist(),
            "nfe_mean": float(np.mean(b.nfe)),
            "params": [np.asarray(x).ravel().tolist()
                       for x in jax.tree.leaves(eqx.filter(r.raw_model, eqx.is_inexact_array))]}


def _run_processes(args) -> None:
    import socket

    import numpy as np

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    res = {}
    for n in (1, args.processes):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmds = [[sys.executable, __file__, "--process-worker", "--num-processes", str(n),
                 "--process-id", str(i), "--port", str(port)] + (["--quick"] if args.quick else [])
                for i in range(n)]
        # Output to files, not pipes: a worker blocked on an unread pipe stalls the others.
        with tempfile.TemporaryDirectory() as tmp:
            files = [(open(f"{tmp}/out{i}", "w+"), open(f"{tmp}/err{i}", "w+")) for i in range(n)]
            procs = [subprocess.Popen(c, env=env, stdout=o, stderr=e, text=True)
                     for c, (o, e) in zip(cmds, files)]
            for p in procs:
                p.wait(timeout=1800)
            outs = []
            for o, e in files:
                o.seek(0), e.seek(0)
                outs.append((o.read(), e.read()))
                o.close(), e.close()
        for p, (_, err) in zip(procs, outs):
            if p.returncode:
                sys.exit(err[-3000:])
        res[n] = json.loads(outs[0][0].strip().splitlines()[-1])
    one, many = res[1], res[args.processes]
    dp = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(one["params"], many["params"]))
    db = float(np.abs(np.asarray(one["bpd"]) - np.asarray(many["bpd"])).max())
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    print(f"{'processes':>9} {'train steps/s':>13} {'bpd 64 pts (s)':>14} {'nfe mean':>8}")
    for n, r in res.items():
        print(f"{n:>9} {r['steps_per_s']:>13.1f} {r['bpd_s']:>14.2f} {r['nfe_mean']:>8.1f}")
    print(f"max |diff| params {dp:.2e}, per-example bits/dim {db:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_average": os.getloadavg(), "max_param_diff": dp,
                       "max_bpd_diff": db,
                       **{str(n): {k: v for k, v in r.items() if k != "params"}
                          for n, r in res.items()}}, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--processes", type=int, default=None,
                   help="compare 1 and N processes (jax.distributed on 127.0.0.1) instead")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--process-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.process_worker:
        print(json.dumps(_process_worker(args)))
        return
    if args.processes is not None:
        _run_processes(args)
        return
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if env["JAX_PLATFORMS"] == "cpu":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                            f"{args.devices}").strip()
    cmd = [sys.executable, __file__, "--worker", "--devices", str(args.devices)]
    cmd += ["--quick"] if args.quick else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    n = args.devices
    print(f"devices: {', '.join(res['devices'])}")
    print(f"{'workload':<20} {'batch':>5} {'steps':>5} {'steps/s 1 dev':>13} "
          f"{f'steps/s {n} dev':>13} {'max |diff|':>10}")
    for name, r in res["workloads"].items():
        print(f"{name:<20} {r['batch']:>5} {r['steps']:>5} {r['steps_per_s_1']:>13.1f} "
              f"{r[f'steps_per_s_{n}']:>13.1f} {r['max_abs_diff']:>10.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
