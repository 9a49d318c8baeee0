"""Every `probflow` subcommand beyond train/bpd, run as a subprocess on real files."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import probflow as pf
from probflow._cli._sampling import make_mask


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny MLP on the digits shape: the plumbing, not the quality, is tested (it
    compiles in a fraction of a U-Net's time)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.eqx"
    sde = pf.VPSDE()
    model = pf.models.MLP((8, 8, 1), sde=sde, width=32, depth=1, key=jax.random.key(0))
    pf.save_checkpoint(path, model, sde, None, num_bins=17, data_range=(0.0, 1.0), data="digits")
    return str(path)


def _run(*args, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "probflow", *args], capture_output=True, text=True,
        cwd=cwd, env=env, timeout=900,
    )


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stdout


def test_sample_all_samplers(tiny_checkpoint, tmp_path):
    for sampler, extra in [("ode", ["--solver", "heun", "--steps", "3"]),
                           ("sde", ["--sde-steps", "4"]), ("pc", ["--sde-steps", "4"])]:
        out = tmp_path / f"{sampler}.png"
        js = tmp_path / f"{sampler}.json"
        stdout = _ok(_run("sample", "--checkpoint", tiny_checkpoint, "--sampler", sampler,
                          "--num", "4", "--out", str(out), "--json", str(js), *extra))
        assert "nfe mean" in stdout and sampler in stdout
        assert Image.open(out).size[0] > 8
        nfe = {"ode": 6, "sde": 4, "pc": 4 * 2 + 1}[sampler]
        assert json.loads(js.read_text())["nfe_mean"] == nfe


def test_encode_then_decode(tiny_checkpoint, tmp_path):
    lat = tmp_path / "z.npz"
    stdout = _ok(_run("encode", "--checkpoint", tiny_checkpoint, "--limit", "3", "--solver",
                      "heun", "--steps", "4", "--out", str(lat)))
    assert "round-trip" in stdout
    data = np.load(lat)
    assert data["z"].shape == (3, 8, 8, 1) and data["x"].shape == (3, 8, 8, 1)
    js = tmp_path / "d.json"
    png = tmp_path / "d.png"
    _ok(_run("decode", "--latents", str(lat), "--solver", "heun", "--steps", "4",
             "--out", str(png), "--json", str(js)))
    res = json.loads(js.read_text())
    assert res["nfe_mean"] == 8
    assert res["round_trip_rel_error_mean"] is not None and res["round_trip_rel_error_mean"] >= 0
    assert png.exists()


@pytest.mark.slow  # the curve's plumbing also runs in test_demo_quick
def test_nfe_curve(tiny_checkpoint, tmp_path):
    png, js = tmp_path / "c.png", tmp_path / "c.json"
    stdout = _ok(_run("nfe-curve", "--checkpoint", tiny_checkpoint, "--solvers", "euler,tsit5",
                      "--step-counts", "2,4", "--tolerances", "1e-2", "--sde-steps", "3",
                      "--likelihood-images", "2", "--num-samples", "8", "--out", str(png),
                      "--json", str(js)))
    assert "ode-euler" in stdout
    res = json.loads(js.read_text())
    samplers = {r["sampler"] for r in res["rows"]}
    assert {"ode-euler", "ode-tsit5", "reverse-sde", "pc"} <= samplers
    euler = [r for r in res["rows"] if r["sampler"] == "ode-euler"]
    assert [r["nfe_mean"] for r in euler] == [2, 4]
    assert all(r["frechet"] is not None for r in res["rows"])
    assert res["likelihood_rows"] and png.exists()


def test_inpaint_and_masks(tiny_checkpoint, tmp_path):
    png, js = tmp_path / "i.png", tmp_path / "i.json"
    _ok(_run("inpaint", "--checkpoint", tiny_checkpoint, "--limit", "2", "--steps", "3",
             "--mask", "center", "--out", str(png), "--json", str(js)))
    res = json.loads(js.read_text())
    assert res["nfe_mean"] == 3 * 2 + 1 and 0.0 <= res["classifier_accuracy"] <= 1.0
    assert png.exists()
    left = make_mask("left", (8, 8, 1))
    assert left[:, :4].all() and not left[:, 4:].any()
    center = make_mask("center", (8, 8, 1))
    assert center.sum() == 64 - 16
    Image.fromarray((left[..., 0] * 255).astype(np.uint8)).save(tmp_path / "m.png")
    np.testing.assert_array_equal(make_mask(str(tmp_path / "m.png"), (8, 8, 1)), left)


def test_train_classifier(tmp_path):
    out = tmp_path / "clf.eqx"
    stdout = _ok(_run("train-classifier", "--sde", "none", "--steps", "500", "--out", str(out)))
    assert "test acc" in stdout
    clf, info = pf.load_classifier(out)
    assert info["test_accuracy"] > 0.8  # digits are easy: far above chance (0.1)


def test_demo_quick(tiny_checkpoint, tmp_path):
    out = tmp_path / "demo"
    stdout = _ok(_run("demo", "--checkpoint", tiny_checkpoint, "--quick", "--out", str(out)))
    assert "test bits/dim" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bpd"]["images"] == 8 and summary["bpd"]["mean"] > 0
    for name in ("samples_ode.png", "samples_sde.png", "samples_pc.png", "encode_decode.png",
                 "nfe_curve.png"):
        assert (out / name).exists()


def test_user_mistakes_print_one_line(tiny_checkpoint, tmp_path):
    cases = [
        ("sample", "--checkpoint", tiny_checkpoint, "--solver", "rk45"),
        ("sample", "--checkpoint", str(tmp_path / "missing.eqx")),
        ("sample", "--checkpoint", tiny_checkpoint, "--rtol", "-1"),
        ("decode", "--latents", str(tmp_path / "none.npz")),
        ("colorize", "--checkpoint", tiny_checkpoint, "--data", "digits"),
        ("inpaint", "--checkpoint", tiny_checkpoint, "--mask", "diagonal"),
        ("nfe-curve", "--checkpoint", tiny_checkpoint, "--tolerances", "abc"),
    ]
    for i, args in enumerate(cases):
        proc = _run(*args)
        assert proc.returncode != 0
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        if i == 0:
            assert "rk45" in proc.stderr


def test_colorize(tmp_path):
    sde = pf.VPSDE()
    path = tmp_path / "colour.eqx"
    model = pf.models.MLP((8, 8, 3), sde=sde, width=32, depth=1, key=jax.random.key(1))
    pf.save_checkpoint(path, model, sde, None, num_bins=17, data_range=(0.0, 1.0),
                       data="digits-color")
    png, js = tmp_path / "c.png", tmp_path / "c.json"
    stdout = _ok(_run("colorize", "--checkpoint", str(path), "--data", "digits-color",
                      "--limit", "3", "--steps", "3", "--out", str(png), "--json", str(js)))
    assert "grey err" in stdout
    res = json.loads(js.read_text())
    assert res["max_grey_error"] < 1e-5 and res["nfe_mean"] == 3 * 2 + 1
    assert png.exists()


def _subparsers():
    import argparse

    from probflow._cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_has_help_and_shows_its_default():
    from probflow._cli._main import _HelpFormatter

    names = set(_subparsers())
    assert {"train", "sample", "bpd", "encode", "decode", "nfe-curve", "inpaint", "colorize",
            "train-classifier", "demo"} <= names
    for name, p in _subparsers().items():
        fmt = _HelpFormatter(prog=name)
        for action in p._actions:
            if action.dest == "help":
                continue
            shown = fmt._get_help_string(action)
            where = f"{name} {action.option_strings}"
            assert action.help, where
            if action.default is False:  # a flag: off unless given
                continue
            assert action.required or "default" in shown, f"{where}: {shown!r}"
        assert "(default:" in p.format_help()


def test_old_option_spellings_still_work():
    from probflow._cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "--out", "x", "--steps", "7"]).steps == 7
    assert parse(["train", "--out", "x", "--train-steps", "7"]).steps == 7
    assert parse(["sample", "--steps", "3"]).ode_steps == 3
    assert parse(["inpaint", "--steps", "3"]).sde_steps == 3
    assert parse(["nfe-curve", "--step-counts", "2,4"]).ode_steps == (2, 4)


def test_nfe_curve_default_full_and_explicit_settings():
    import dataclasses

    from probflow._cli import build_parser
    from probflow._cli._curve import DEFAULT, FULL, settings_from

    parse = build_parser().parse_args
    assert settings_from(parse(["nfe-curve"])) == DEFAULT
    assert settings_from(parse(["nfe-curve", "--full"])) == FULL
    got = settings_from(parse(["nfe-curve", "--full", "--num-samples", "8", "--sde-steps", ""]))
    assert got == dataclasses.replace(FULL, num_samples=8, sde_steps=())
    assert len(DEFAULT.solvers) < len(FULL.solvers) and DEFAULT.num_samples < FULL.num_samples


def test_solver_names():
    import diffrax

    from probflow._cli._common import make_solver

    assert type(make_solver("Tsit5")) is diffrax.Tsit5
    assert type(make_solver("reversibleheun")) is diffrax.ReversibleHeun
    assert make_solver("dpm3") == pf.DPMSolver(order=3)
    assert make_solver("dpm++2m") == pf.DPMSolverMultistep(order=2)  # was a crash ('+')
    assert make_solver("dpm++3m") == pf.DPMSolverMultistep(order=3)


def test_bpd_repeats_and_probes(tiny_checkpoint, tmp_path, capsys):
    from probflow._cli import main

    js = tmp_path / "bpd.json"
    assert main(["bpd", "--checkpoint", tiny_checkpoint, "--data", "digits", "--limit", "3",
                 "--repeats", "2", "--probes", "2", "--rtol", "1e-3", "--atol", "1e-3",
                 "--batch-size", "2", "--seed", "4", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "probe noise" in out and ("±" in out or "+-" in out)
    res = json.loads(js.read_text())
    # Independently: pf.bits_per_dim with the documented keys, summarised by the library.
    model, sde, _ = pf.load_checkpoint(tiny_checkpoint)
    images = pf.data.load("digits", "test").images[:3]
    repeats = []
    for r in range(2):
        # Image i of repeat r draws from fold_in(fold_in(key(seed), r), i).
        keys = jax.numpy.stack([jax.random.fold_in(jax.random.fold_in(jax.random.key(4), r), i)
                                for i in range(3)])
        parts = [pf.bits_per_dim(model, sde, images[i : i + 2], num_bins=17, rtol=1e-3,
                                 atol=1e-3, trace="rademacher", num_probes=2,
                                 key=keys[i : i + 2])
                 for i in (0, 2)]
        repeats.append(np.concatenate([np.asarray(p.bpd_probes) for p in parts]))
    b = np.stack(repeats).astype(np.float64)  # [R, N, P]
    np.testing.assert_allclose(res["bpd"], b.mean(), rtol=1e-5)
    np.testing.assert_allclose(res["bpd_se"], b.mean(axis=(0, 2)).std(ddof=1) / np.sqrt(3),
                               rtol=1e-4)
    np.testing.assert_allclose(res["summary"]["probe_noise"],
                               np.sqrt(b.var(axis=2, ddof=1).mean()), rtol=1e-4)
    assert res["summary"]["num_repeats"] == 2 and res["summary"]["num_probes"] == 2
    assert res["trace"] == "rademacher" and len(res["bpd_per_repeat"]) == 2


_CACHE_PROBE = """
import sys
import jax.monitoring
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
from probflow._cli import main
rc = main(sys.argv[1:])
hits = events.count("/jax/compilation_cache/cache_hits")
misses = events.count("/jax/compilation_cache/cache_misses")
print(f"CACHE {rc} {hits} {misses}")
"""


def test_compilation_cache_makes_the_second_run_load_instead_of_compile(tiny_checkpoint,
                                                                        tmp_path):
    cache = tmp_path / "cache"

    def run(*extra):
        # Threshold 0: every program is stored, so which ones are cached does not depend on how
        # long compilation happened to take on a loaded machine.
        env = dict(os.environ, PROBFLOW_CACHE_DIR=str(cache), PROBFLOW_CACHE_MIN_COMPILE_SECS="0")
        proc = subprocess.run(
            [sys.executable, "-c", _CACHE_PROBE, "sample", "--checkpoint", tiny_checkpoint,
             "--num", "3", "--solver", "tsit5", "--rtol", "1e-2", "--atol", "1e-2", *extra],
            capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not proc.stderr.strip(), proc.stderr[-3000:]  # no XLA log noise either
        rc, hits, misses = map(int, proc.stdout.split("CACHE")[1].split())
        return hits, misses

    hits1, misses1 = run()
    stored = [p for p in cache.iterdir() if p.name.endswith("-cache")]
    # A cold cache: the first run compiles (a program built twice within that run may already
    # load its own earlier entry, since every program is stored).
    assert misses1 > 0 and hits1 < misses1 and stored
    programs = sorted((cache / "programs").glob("*.jaxexport"))
    assert len(programs) == 1  # the traced decode solve, stored (the model is probflow's U-Net)
    hits2, misses2 = run()
    assert sorted((cache / "programs").glob("*.jaxexport")) == programs  # loaded, not re-stored
    # It loads what it runs; small eager programs that ran only while the first run traced the
    # solve are not needed, since the second loads the stored trace instead.
    assert len(stored) - 2 <= hits2 <= len(stored)
    assert misses2 < misses1
    assert misses2 == 0  # the second run compiles nothing
    off = tmp_path / "off"
    cache = off
    assert run("--no-compile-cache") == (0, 0) and not off.exists()


_EXIT_PROBE = """
import atexit, sys, threading, time
atexit.register(lambda: print("exit handler ran", flush=False))
from probflow._cli import main
if sys.argv[1] == "thread":
    def late(path=sys.argv[2]):
        time.sleep(2.5)  # still running when the command is done
        open(path, "w").write("written")
    threading.Thread(target=late).start()  # not a daemon: a normal exit waits for it
sys.argv = ["probflow", "bpd", "--checkpoint", "no-such-model", "--data", "digits"]
print("x" * 100000, end="")  # buffered output that must reach the pipe
code = main()
print("main returned")  # only where another thread still runs: main then returns
raise SystemExit(code)
"""


def test_the_command_line_ends_its_process_itself(tmp_path):
    """`probflow` ends its process once the command is done (skipping the interpreter's
    teardown): the exit status is the command's, the exit handlers run, buffered output is
    flushed, and a non-daemon thread still running is waited for as at a normal exit."""
    proc = subprocess.run([sys.executable, "-c", _EXIT_PROBE, "plain"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "x" * 100000 + "exit handler ran\n"
    assert proc.stderr.count("\n") == 1 and "no-such-model" in proc.stderr
    marker = tmp_path / "late.txt"
    proc = subprocess.run([sys.executable, "-c", _EXIT_PROBE, "thread", str(marker)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and marker.read_text() == "written", proc.stderr
    assert proc.stdout.endswith("main returned\nexit handler ran\n")
