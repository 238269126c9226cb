"""Mutation check: break the package on purpose, one named change at a time, and run the tests
that must catch each change.

Every mutation names a file under ``src/opnorm``, a snippet that must occur there exactly once,
its replacement, and the test node ids that cover it. For each mutation the script copies
``src/`` to a temporary directory (the working tree is never touched), applies the change
there, and runs its tests with ``PYTHONPATH`` pointing at the copy (subprocesses the tests
start, e.g. torchrun, import the copy too). It prints, per mutation, which tests failed.

It exits non-zero when a mutation survives (all its tests pass), when its tests do not run
(not found, an error in collection), when a snippet no longer occurs exactly once in the
source (so the list cannot rot silently when the code changes: update the snippet), or when
the tests already fail on the unchanged code (the baseline run).

Usage::

    python scripts/mutation_check.py                # every mutation
    python scripts/mutation_check.py --fast         # the quick subset that .ci/run runs
    python scripts/mutation_check.py --list         # names, files and tests; nothing runs
    python scripts/mutation_check.py store-sync-wrong-example analysis-gap-zero   # chosen ones
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "opnorm"


@dataclass(frozen=True)
class Mutation:
    """One deliberate defect: ``snippet`` (exactly once in ``src/opnorm/<file>``) becomes ``replacement``.

    ``fast``: part of the ``--fast`` subset (its tests take seconds, no extra processes).
    """

    name: str
    file: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]
    fast: bool = True
    why: str = ""


T = "tests/"
HALVING = T + "test_attacks.py::test_halving_schedule_halves_the_step_and_restarts_from_the_best_point[inf-ce-None]"
DDP_STORE = (
    T + "test_regularizer_parts.py::test_ddp_store_holds_each_examples_direction_as_one_process_and_after_resume"
)
MUTATIONS = [
    # ---- norms
    Mutation(
        "norms-duality-map-unnormalized",
        "norms.py",
        "out = w / norm if r == 2 else",
        "out = w if r == 2 else",
        (T + "test_norms.py::test_duality_map_unit_and_attains",),
        why="psi_2(z) not divided by ||z||_2",
    ),
    Mutation(
        "norms-duality-map-wrong-power",
        "norms.py",
        "(w.abs() / norm) ** (r - 1)",
        "(w.abs() / norm) ** r",
        (T + "test_fast_regularizer.py::test_free_update_is_one_power_step_on_affine_model[3-inf]",),
        why="psi_r(z) for 1 < r < inf, r != 2, with |z|^r: caught by a reference with psi written out",
    ),
    Mutation(
        "norms-l2-projection-missing",
        "norms.py",
        "        out = flat * factor\n",
        "        out = flat\n",
        (
            T + "test_pga_step.py::test_free_update_is_one_projected_step_along_the_penalty_gradient[None-2.0]",
            T + "test_norms.py::test_projection_feasible_idempotent_nearest",
        ),
        why="project_lp_ball(p=2) returns points outside the ball",
    ),
    # ---- jacobian
    Mutation(
        "jacobian-basis-scaled",
        "jacobian/core.py",
        "return torch.eye(d, dtype=out.dtype",
        "return 0.5 * torch.eye(d, dtype=out.dtype",
        (T + "test_power.py::test_jacobian_matches_reference[mlp]",),
        why="the explicit Jacobian's rows come from 0.5 e_i: J is halved",
    ),
    # ---- power
    Mutation(
        "power-iterate-normalized-in-l2",
        "power/iteration.py",
        "v = pga_step(v, rmatvec(u), p, 1.0)",
        "v = pga_step(v, rmatvec(u), 2.0, 1.0)",
        (T + "test_power.py::test_power_method_reaches_the_norm_of_a_rank_one_map[inf-2]",),
        why="a feasible but wrong iterate for p = inf: only an equality check sees it",
    ),
    Mutation(
        "lanczos-noise-floor-zero",
        "power/iteration.py",
        "scale = torch.maximum(scale, torch.maximum(alpha, beta))",
        "scale = scale",
        (T + "test_lanczos_bounds.py::test_exhausted_spaces_without_a_stopping_rule",),
        why="the noise floors stay 0 (as when they scaled with sigma without a stopping rule): noise becomes a "
        "basis vector and sigma overshoots the norm",
    ),
    # ---- attacks
    Mutation(
        "attacks-start-not-projected",
        "attacks.py",
        "delta = self.project(start.detach().to(self.x.dtype))",
        "delta = start.detach().to(self.x.dtype)",
        (HALVING,),
        why="a start outside the ball or the box is used as it is",
    ),
    Mutation(
        "attacks-halving-keeps-the-step",
        "attacks.py",
        "ascent.step_size = base * 0.5 ** _phase(k, steps)",
        "ascent.step_size = base",
        (HALVING,),
        why="the halving schedule never halves",
    ),
    # ---- regularizers
    Mutation(
        "regularizers-dropout-masks-unpaired",
        "regularizers/penalty.py",
        "m.forward = _paired(type(m).forward.__get__(m), batch)",
        "m.forward = type(m).forward.__get__(m)",
        (
            T + "test_regularizer_parts.py::test_dropout_in_train_mode_penalty_measures_J_not_mask_noise",
            T + "test_regularizer_parts.py::test_paired_noise_gives_identical_masks_and_restores_forward",
        ),
        why="the two halves of the fd penalty's batch get different Dropout masks",
    ),
    Mutation(
        "regularizers-penalty-sum-not-mean",
        "regularizers/penalty.py",
        "return lam * (value * eps**2 if self.scale_by_eps else value).mean()",
        "return lam * (value * eps**2 if self.scale_by_eps else value).sum()",
        (T + "test_regularizer_parts.py::test_paper_configuration_matches_the_svd_on_an_affine_model",),
        why="the squared penalty grows with the batch size",
    ),
    Mutation(
        "store-sync-no-op",
        "regularizers/store.py",
        "        if group_size() <= 1:\n            return\n        device = self.seen.device",
        "        if True:\n            return\n        device = self.seen.device",
        (DDP_STORE,),
        fast=False,
        why="a rank never sees the other ranks' directions",
    ),
    Mutation(
        "store-sync-wrong-example",
        "regularizers/store.py",
        "self.directions[i[:n]] = d[:n]",
        "self.directions[i[:n].roll(1)] = d[:n]",
        (DDP_STORE,),
        fast=False,
        why="each gathered direction is written to another example, the same on every rank",
    ),
    # ---- analysis
    Mutation(
        "analysis-gap-zero",
        "analysis.py",
        "direction_gap = torch.stack(",
        "direction_gap = 0 * torch.stack(",
        (T + "test_analysis.py::test_equivalence_on_a_relu_network_holds_while_activations_agree[2-2-mlp]",),
        why="the theorem check's iterate gap forced to 0",
    ),
    Mutation(
        "analysis-inside-ignores-start",
        "analysis.py",
        "inside &= self.start_agreement == 1.0",
        "inside &= True",
        (T + "test_analysis.py::test_inside_needs_the_start_and_every_iterate_in_the_region",),
        why="a PGA path that starts outside x's linear region counts as inside",
    ),
    # ---- fast_at
    Mutation(
        "fast-at-fgsm-rs-unprojected",
        "fast_at.py",
        "radius = self.eps if self.project else math.inf",
        "radius = math.inf",
        (T + "training/test_fast_at.py::test_fgsm_rs_step_from_its_random_start",),
        why="FGSM-RS's step is not projected back onto the eps ball",
    ),
    Mutation(
        "fast-at-defaults-no-random-start",
        "training/objectives.py",
        "cfg.fgsm_start = start if cfg.fgsm_start is None",
        "cfg.fgsm_start = 0.0 if cfg.fgsm_start is None",
        (
            T + "training/test_fast_at.py::test_the_trainers_defaults_are_the_papers_settings[fgsm-rs]",
            T + "training/test_fast_at.py::test_the_trainers_defaults_are_the_papers_settings[n-fgsm]",
        ),
        why="the trainer's FGSM-RS and N-FGSM run without a random start by default",
    ),
    # ---- training
    Mutation(
        "training-resume-skips-rng",
        "training/trainer.py",
        '    load("rng", set_rng_state)\n',
        "",
        (T + "training/test_fast_at.py::test_resume_is_bit_identical[fgsm-rs]",),
        why="a resumed run draws other random starts than an uninterrupted one",
    ),
    Mutation(
        "training-divergence-check-skips-objective",
        "training/trainer.py",
        "[*model.state_dict().values(), *objective.state_dict().values()]",
        "[*model.state_dict().values()]",
        (
            T + "training/test_runs.py::test_the_finite_check_reads_the_objectives_state[store]",
            T + "training/test_runs.py::test_the_finite_check_reads_the_objectives_state[free-delta]",
            T + "training/test_runs.py::test_the_finite_check_reads_the_objectives_state[snr-vector]",
        ),
        why="a non-finite store, free delta or SNR vector is saved instead of stopping the run",
    ),
]


def check_snippets(mutations: list[Mutation]) -> list[str]:
    """One line per mutation whose snippet does not occur exactly once (or whose file is gone)."""
    problems = []
    for m in mutations:
        path = PACKAGE / m.file
        if not path.is_file():
            problems.append(f"{m.name}: src/opnorm/{m.file} does not exist; point the mutation at the code's new home")
            continue
        count = path.read_text().count(m.snippet)
        if count != 1:
            problems.append(
                f"{m.name}: its snippet occurs {count} times in src/opnorm/{m.file} (must be exactly "
                f"once); update it to the current code: {m.snippet!r}"
            )
    return problems


def copy_package(dest: Path) -> Path:
    """src/ copied to dest/src without caches; returns the new src directory."""
    src = dest / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return src


# Imported once here, before any fork: each mutation's process then pays only for its tests and for
# importing opnorm (never imported by this process, so every child imports its own copy).
HEAVY = ("torch", "torch.nn.functional", "numpy", "scipy", "sklearn.datasets", "pytest")


def preload() -> None:
    for name in HEAVY:
        try:
            __import__(name)
        except ImportError:  # optional here: a child imports what its tests need
            pass


def _child(src: Path, tests: tuple[str, ...], log: Path) -> int:
    """In a forked process: import opnorm from src, run the tests with pytest, return its exit code."""
    import pytest

    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = sys.stdout
    os.environ["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path[:0] = [str(src), str(ROOT)]  # ROOT as `python -m pytest` has it: `import tests.reference`
    sys.dont_write_bytecode = True
    import opnorm

    if not Path(opnorm.__file__).resolve().is_relative_to(src.resolve()):
        print(f"opnorm was imported from {opnorm.__file__}, not from {src}: the check would test the wrong code")
        return 3
    return int(pytest.main(["-q", "-rfE", "--no-header", "-p", "no:cacheprovider", *tests]))


def run_tests(src: Path, tests: tuple[str, ...], timeout: float, log: Path) -> tuple[int, list[str], str]:
    """(pytest's exit code, failed node ids, output tail) for tests run against the package in src.

    The tests run in a forked child (cwd: the repository, so the tests are the working tree's);
    subprocesses they start inherit PYTHONPATH=src. -1: timed out (the child's group is killed).
    """
    sys.stdout.flush()  # or the child inherits (and may write) this process's buffered lines
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's code
        code = 70
        try:
            os.setpgid(0, 0)
            os.chdir(ROOT)
            code = _child(src, tests, log)
        finally:
            sys.stdout.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.killpg(pid, 9)
            os.waitpid(pid, 0)
            code = -1
            break
        time.sleep(0.2)
    out = log.read_text(errors="replace") if log.exists() else ""
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+?)(?: - .*)?$", out, flags=re.M)))
    return code, failed, out[-3000:] if code != -1 else f"timed out after {timeout:.0f} s\n{out[-2000:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutations (default: all)")
    parser.add_argument("--fast", action="store_true", help="only the quick subset (no multi-process tests)")
    parser.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unchanged code")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    args = parser.parse_args(argv)

    known = {m.name for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; --list shows them")
    chosen = [m for m in MUTATIONS if (not args.names or m.name in args.names) and (m.fast or not args.fast)]
    if args.list:
        for m in chosen:
            print(f"{m.name}{'' if m.fast else ' (slow)'}: src/opnorm/{m.file}: {m.why}")
            for t in m.tests:
                print(f"    {t}")
        return 0

    problems = check_snippets(chosen)
    for line in problems:
        print(f"SNIPPET  {line}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="opnorm-mutation-") as tmp:
        if "opnorm" in sys.modules:
            print("error: opnorm is already imported in this process; run the script as a file")
            return 2
        preload()
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            t0 = time.perf_counter()
            code, failed, tail = run_tests(ROOT / "src", tests, args.timeout, Path(tmp) / "baseline.log")
            print(
                f"baseline: {len(tests)} test ids on the unchanged code: "
                f"{'pass' if code == 0 else 'FAIL'} ({time.perf_counter() - t0:.0f} s)"
            )
            if code != 0:
                print(tail)
                print("the tests must pass on the unchanged code before a mutation can be judged")
                return 1
        survived, broken = [], []
        for m in chosen:
            if any(line.startswith(m.name + ":") for line in problems):
                continue
            work = Path(tmp) / m.name
            src = copy_package(work)
            target = src / "opnorm" / m.file
            target.write_text(target.read_text().replace(m.snippet, m.replacement, 1))
            t0 = time.perf_counter()
            code, failed, tail = run_tests(src, m.tests, args.timeout, Path(tmp) / f"{m.name}.log")
            took = time.perf_counter() - t0
            shutil.rmtree(work, ignore_errors=True)
            if code == 1 and failed:
                print(f"caught   {m.name} ({took:.0f} s): {len(failed)} failed: {', '.join(failed)}")
            elif code == 0:
                survived.append(m.name)
                print(f"SURVIVED {m.name} ({took:.0f} s): every test passed: {', '.join(m.tests)}")
            else:
                broken.append(m.name)
                print(
                    f"NOT RUN  {m.name} ({took:.0f} s): pytest exit code {code}; "
                    f"its tests did not run as listed\n{tail}"
                )
    total = time.perf_counter() - t_start
    print(
        f"{len(chosen)} mutations: {len(chosen) - len(survived) - len(broken) - len(problems)} caught, "
        f"{len(survived)} survived, {len(broken)} not run, {len(problems)} with a stale snippet ({total:.0f} s)"
    )
    return 1 if survived or broken or problems else 0


if __name__ == "__main__":
    sys.exit(main())
