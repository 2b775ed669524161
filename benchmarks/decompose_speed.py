"""Speed and accuracy of rl_mtd's conv-kernel decompositions against tensorly's CP-ALS.

Kernel: a seeded synthetic 3x3 kernel of shape (O, I, 3, 3) with a decaying spectrum in every
mode, built as ``G x_0 (Q_0 S_0) x_1 (Q_1 S_1) x_2 (Q_2 S_2) x_3 (Q_3 S_3)`` where ``G`` is a
Gaussian core, each ``Q_n`` a random orthonormal matrix and ``S_n`` diagonal with a power-law
decay ``s_k = (1 + k) ** -DECAY`` (DECAY = 0.5) on the channel modes and ``SPATIAL`` on the two 3-sized spatial
modes (``SPATIAL = (1, 0.6, 0.3)``); the result is rescaled to the Kaiming std ``sqrt(2 / (O * 9))``. A plain Gaussian kernel
has a flat spectrum (nothing for a low-rank method to find), which trained VGG kernels do not.

What is timed (wall clock, median of ``--repeats`` runs unless said otherwise):

- ``rl_mtd.factorize.cp(w, rank)`` with its default settings (SVD init, ridge ALS, its default
  sweep cap and tolerance, degeneracy guards), torch on the CPU; for reference (no goal) also
  with ``max_iter=--tl-iters``, tensorly's sweep budget;
- tensorly ``parafac(w, rank, n_iter_max=--tl-iters, init='svd', tol=0)`` on the numpy backend in
  float64 (``--tl-repeats`` runs, default 1: it is slow); ``random_state=--seed`` seeds the
  random columns its SVD init adds for the 3-sized spatial modes (rank > 3), so runs repeat;
- ``rl_mtd.factorize.tucker2(w, (rank, rank))``;
- ``rl_mtd.decompose.decompose_conv(conv, "cp", rank)`` served from the in-memory factor cache,
  and served from the disk cache by a fresh ``FactorCache`` on the same directory (includes
  hashing the kernel and building the layers).

Error: ``||y_dec - y|| / ||y||`` for the conv's output ``y`` on a seeded random input batch
(``--batch`` x I x 8 x 8) and the decomposed block's output ``y_dec``. tensorly's ``weights``
are multiplied into its first (output-channel) factor to build its layers.

Exact-rank recovery (``--recovery-kernels``, default 40; 0 skips it): seeded 64x32x3x3 kernels of
exactly CP rank 8 (Gaussian factors, seeds 0..N-1), each decomposed by
``decompose_conv(conv, "cp", 8, cache=FactorCache())`` (memory-only cache, default settings) and
by tensorly ``parafac(w, 8, init='svd', n_iter_max=100, random_state=seed)``; both errors are
output errors as above, on a seeded 2x32x8x8 input. Reported: how many kernels each brings under
1e-4, the worst, the total time, and the goal that ours ends under 1e-4 or no worse than 1.5x
tensorly on every kernel (ALS cannot promise recovery; tensorly fails on some kernels too).

Run: ``python benchmarks/decompose_speed.py`` (about a minute on a 2-core CPU, mostly tensorly);
``--recovery-only`` runs only the recovery part (seconds); ``--skip-tensorly`` times rl_mtd only.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

DECAY = 0.5
SPATIAL = (1.0, 0.6, 0.3)

# Run from a checkout without installing: make ``rl_mtd`` importable.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Goals from the issue.
CP_MAX_S = 2.0
CP_MIN_SPEEDUP = 5.0
ERR_SLACK = 1.005  # "no worse": within 0.5% of tensorly's relative error
TUCKER_MAX_S = 1.0
CACHED_MAX_MS = 50.0
RECOVERY_SHAPE, RECOVERY_RANK = (64, 32, 3, 3), 8
RECOVERED = 1e-4  # relative output error of a recovered exactly rank-8 kernel
RECOVERY_SLACK = 1.5  # otherwise no worse than this multiple of tensorly's error


def _load() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


LOAD0 = _load()


def make_kernel(o: int, i: int, seed: int) -> torch.Tensor:
    """Seeded (o, i, 3, 3) kernel with a power-law spectrum per mode (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, 3, 3, generator=g, dtype=torch.float64)
    for mode, n in enumerate((o, i, 3, 3)):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        s = (
            torch.tensor(SPATIAL, dtype=torch.float64)
            if n == 3 and mode >= 2
            else (1.0 + torch.arange(n, dtype=torch.float64)) ** -DECAY
        )
        w = torch.movedim(torch.tensordot(q * s, w.movedim(mode, 0), dims=([1], [0])), 0, mode)
    w = w * ((2.0 / (o * 9)) ** 0.5 / w.std())
    return w.float()


def exact_cp_kernel(shape: tuple[int, int, int, int], rank: int, seed: int) -> torch.Tensor:
    """Seeded float32 kernel of exactly CP rank ``rank`` (Gaussian factors)."""
    g = torch.Generator().manual_seed(seed)
    a, b, c, d = (torch.randn(n, rank, generator=g) for n in shape)
    return torch.einsum("or,ir,hr,wr->oihw", a, b, c, d)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time in seconds over ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def output_error(conv: nn.Conv2d, block: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = conv(x)
        y_dec = block(x)
    return float(torch.linalg.vector_norm(y_dec - y) / torch.linalg.vector_norm(y))


def block_from(conv: nn.Conv2d, method: str, rank, factors: dict[str, torch.Tensor]) -> nn.Module:
    from rl_mtd.decompose import build_decomposed, load_factors

    block = build_decomposed(conv, method, rank)
    load_factors(block, conv, factors)
    return block.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-channels", type=int, default=512)
    p.add_argument("--in-channels", type=int, default=512)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--tl-iters", type=int, default=25, help="tensorly parafac n_iter_max")
    p.add_argument("--repeats", type=int, default=3, help="runs per rl_mtd timing (median)")
    p.add_argument("--tl-repeats", type=int, default=1, help="runs of tensorly (median)")
    p.add_argument("--batch", type=int, default=8, help="input batch for the output error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-tensorly", action="store_true", help="time rl_mtd only")
    p.add_argument(
        "--recovery-kernels", type=int, default=40, help="exact rank-8 kernels to recover (0: skip)"
    )
    p.add_argument("--recovery-only", action="store_true", help="run only the recovery part")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rl_mtd_bench_") as tmp:
        os.environ["RL_MTD_CACHE"] = tmp  # never touch the user's cache
        return run(args, Path(tmp))


def recovery(n: int, use_tensorly: bool) -> tuple[list[str], list[tuple[str, bool, str]]]:
    """Recover ``n`` exactly rank-8 kernels (see the module doc): report lines and verdicts."""
    from rl_mtd.decompose import FactorCache, decompose_conv

    o, i, kh, kw = RECOVERY_SHAPE
    ours, theirs, t_ours, t_tl = [], [], 0.0, 0.0
    threads = torch.get_num_threads()
    # One thread: these kernels are too small to share, and two busy threads on a 2-core machine
    # fight numpy's (tensorly's) for the cores.
    torch.set_num_threads(1)
    for seed in range(n):
        w = exact_cp_kernel(RECOVERY_SHAPE, RECOVERY_RANK, seed)
        conv = nn.Conv2d(i, o, (kh, kw), padding=1, bias=False).eval()
        with torch.no_grad():
            conv.weight.copy_(w)
        x = torch.randn(2, i, 8, 8, generator=torch.Generator().manual_seed(1000 + seed))
        t0 = time.perf_counter()
        block = decompose_conv(conv, "cp", RECOVERY_RANK, cache=FactorCache())
        t_ours += time.perf_counter() - t0
        ours.append(output_error(conv, block.eval(), x))
        if use_tensorly:
            import tensorly as tl
            from tensorly.decomposition import parafac

            t0 = time.perf_counter()
            with tl.backend_context("numpy"), warnings.catch_warnings():
                # tensorly warns that the 3-sized modes have fewer than 8 singular vectors.
                warnings.filterwarnings("ignore", message="Trying to compute SVD")
                cp_tl = parafac(
                    w.double().numpy(), RECOVERY_RANK, init="svd", n_iter_max=100, random_state=seed
                )
                w_tl = torch.from_numpy(np.asarray(tl.cp_to_tensor(cp_tl))).float()
            t_tl += time.perf_counter() - t0
            conv_tl = nn.Conv2d(i, o, (kh, kw), padding=1, bias=False).eval()
            with torch.no_grad():
                conv_tl.weight.copy_(w_tl)
            theirs.append(output_error(conv, conv_tl, x))
    torch.set_num_threads(threads)

    def summary(errs: list[float], seconds: float) -> str:
        under = sum(e < RECOVERED for e in errs)
        return f"{under}/{len(errs)} under {RECOVERED:g}, worst {max(errs):.3g}, {seconds:.2f} s"

    kernel = "x".join(map(str, RECOVERY_SHAPE))
    lines = [
        f"Exact-rank recovery: {n} seeded {kernel} kernels of CP rank {RECOVERY_RANK}, "
        "output rel. error, torch on 1 thread",
        f"- rl_mtd `decompose_conv(conv, 'cp', {RECOVERY_RANK})`, defaults: "
        + summary(ours, t_ours),
    ]
    verdicts: list[tuple[str, bool, str]] = []
    if use_tensorly:
        lines.append(
            "- tensorly `parafac`, init=svd, n_iter_max=100, random_state=seed: "
            + summary(theirs, t_tl)
        )
        ok = [e < RECOVERED or e <= RECOVERY_SLACK * r for e, r in zip(ours, theirs)]
        lines += [
            f"- kernel {seed}: rl_mtd {e:.3g}, tensorly {r:.3g}"
            for seed, (e, r) in enumerate(zip(ours, theirs))
            if e >= RECOVERED or r >= RECOVERED
        ]
        verdicts.append(
            (
                f"exact rank-{RECOVERY_RANK} kernels: rl_mtd CP < {RECOVERED:g} "
                f"or <= {RECOVERY_SLACK:g}x tensorly's error",
                all(ok),
                f"{sum(ok)}/{n} kernels",
            )
        )
    else:
        lines += [
            f"- kernel {seed}: rl_mtd {e:.3g}" for seed, e in enumerate(ours) if e >= RECOVERED
        ]
    return lines, verdicts


def print_verdicts(verdicts: list[tuple[str, bool, str]]) -> None:
    print("| Goal | Measured | Result |")
    print("|---|---:|---|")
    for goal, ok, measured in verdicts:
        print(f"| {goal} | {measured} | {'PASS' if ok else 'FAIL'} |")


def run(args: argparse.Namespace, tmp: Path) -> int:
    from rl_mtd import factorize
    from rl_mtd.decompose import FactorCache, decompose_conv

    if args.recovery_only:
        lines, verdicts = recovery(args.recovery_kernels, not args.skip_tensorly)
        print(
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average {_load()}"
        )
        print("\n".join(lines))
        print()
        print_verdicts(verdicts)
        return 0 if all(ok for _, ok, _ in verdicts) else 1

    o, i, rank = args.out_channels, args.in_channels, args.rank
    w = make_kernel(o, i, args.seed)
    conv = nn.Conv2d(i, o, 3, padding=1, bias=False).eval()
    with torch.no_grad():
        conv.weight.copy_(w)
    x = torch.randn(args.batch, i, 8, 8, generator=torch.Generator().manual_seed(args.seed + 1))
    kernel = f"{o}x{i}x3x3"

    rows: list[tuple[str, str, str, str]] = []  # what, time, output error, note
    verdicts: list[tuple[str, bool, str]] = []

    # (a) rl_mtd CP
    factorize.cp(w, rank, max_iter=2)  # warm up torch's kernels (not timed)
    t_cp, f = timed(lambda: factorize.cp(w, rank), args.repeats)
    cp_factors = {"out": f.out, "inp": f.inp, "vertical": f.vertical, "horizontal": f.horizontal}
    err_cp = output_error(conv, block_from(conv, "cp", rank, cp_factors), x)
    rows.append(
        (
            f"rl_mtd CP rank {rank} (`factorize.cp`, defaults)",
            f"{t_cp:.3f} s",
            f"{err_cp:.4f}",
            f"{f.iterations} sweeps, degenerate_fixed={f.degenerate_fixed}",
        )
    )
    # For reference (no goal): rl_mtd CP with tensorly's sweep budget.
    t_cp_n, f_n = timed(lambda: factorize.cp(w, rank, max_iter=args.tl_iters), args.repeats)
    cp_n = {"out": f_n.out, "inp": f_n.inp, "vertical": f_n.vertical, "horizontal": f_n.horizontal}
    err_cp_n = output_error(conv, block_from(conv, "cp", rank, cp_n), x)
    rows.append(
        (
            f"rl_mtd CP rank {rank}, `max_iter={args.tl_iters}` (reference, no goal)",
            f"{t_cp_n:.3f} s",
            f"{err_cp_n:.4f}",
            f"{f_n.iterations} sweeps",
        )
    )

    # (b) tensorly CP
    t_tl = err_tl = None
    if not args.skip_tensorly:
        import tensorly as tl
        from tensorly.decomposition import parafac

        tl.set_backend("numpy")
        w_np = w.double().numpy()

        def run_tl():
            return parafac(
                w_np, rank, n_iter_max=args.tl_iters, init="svd", tol=0, random_state=args.seed
            )

        t_tl, cp_tl = timed(run_tl, args.tl_repeats)
        weights, (a, b, c, d) = cp_tl
        tl_factors = {
            name: torch.from_numpy(np.ascontiguousarray(m)).float()
            for name, m in zip(
                ("out", "inp", "vertical", "horizontal"), (a * weights[None, :], b, c, d)
            )
        }
        err_tl = output_error(conv, block_from(conv, "cp", rank, tl_factors), x)
        rows.append(
            (
                f"tensorly `parafac` rank {rank}, {args.tl_iters} iters, init=svd, tol=0",
                f"{t_tl:.3f} s",
                f"{err_tl:.4f}",
                f"backend {tl.get_backend()}, float64, tensorly {tl.__version__}",
            )
        )

    # Tucker-2
    factorize.tucker2(w, (8, 8))  # warm up
    t_tk, tk = timed(lambda: factorize.tucker2(w, (rank, rank)), args.repeats)
    tk_factors = {"core": tk.core, "u_out": tk.u_out, "u_in": tk.u_in}
    err_tk = output_error(conv, block_from(conv, "tucker2", (rank, rank), tk_factors), x)
    rows.append(
        (
            f"rl_mtd Tucker-2 ranks ({rank}, {rank}) (`factorize.tucker2`)",
            f"{t_tk:.3f} s",
            f"{err_tk:.4f}",
            "HOSVD + 3 HOOI sweeps",
        )
    )

    # The factor cache, through decompose_conv.
    cache_dir = tmp / "factors"
    cache = FactorCache(cache_dir)
    t_first, first = timed(lambda: decompose_conv(conv, "cp", rank, cache=cache), 1)
    t_mem, mem_block = timed(lambda: decompose_conv(conv, "cp", rank, cache=cache), args.repeats)
    assert cache.hits == args.repeats and cache.misses == 1, (cache.hits, cache.misses)

    disk_times, disk_block = [], None
    for _ in range(args.repeats):
        fresh = FactorCache(cache_dir)
        t_disk, disk_block = timed(lambda c=fresh: decompose_conv(conv, "cp", rank, cache=c), 1)
        assert fresh.disk_hits == 1 and fresh.misses == 0, (fresh.disk_hits, fresh.misses)
        disk_times.append(t_disk)
    t_disk = statistics.median(disk_times)
    same = all(
        torch.equal(a, b)
        for blk in (mem_block, disk_block)
        for a, b in zip(first.state_dict().values(), blk.state_dict().values())
    )
    err_cached = output_error(conv, disk_block.eval(), x)
    rows.append(
        (
            "`decompose_conv(conv, 'cp', r)` first call (computes, writes cache)",
            f"{t_first:.3f} s",
            f"{output_error(conv, first.eval(), x):.4f}",
            "",
        )
    )
    rows.append(
        (
            "same call again, in-memory cache hit",
            f"{t_mem * 1e3:.1f} ms",
            f"{output_error(conv, mem_block.eval(), x):.4f}",
            "includes hashing the kernel and building the layers",
        )
    )
    rows.append(
        (
            "fresh `FactorCache` on the same dir, disk cache hit",
            f"{t_disk * 1e3:.1f} ms",
            f"{err_cached:.4f}",
            f"weights identical to first call: {same}",
        )
    )

    # Verdicts.
    verdicts.append((f"rl_mtd CP <= {CP_MAX_S:g} s", t_cp <= CP_MAX_S, f"{t_cp:.3f} s"))
    if t_tl is not None and err_tl is not None:
        speedup = t_tl / t_cp
        verdicts.append(
            (
                f"rl_mtd CP >= {CP_MIN_SPEEDUP:g}x faster than tensorly",
                speedup >= CP_MIN_SPEEDUP,
                f"{speedup:.1f}x",
            )
        )
        verdicts.append(
            (
                "rl_mtd CP output error no worse than tensorly's (0.5% slack)",
                err_cp <= err_tl * ERR_SLACK,
                f"{err_cp:.4f} vs {err_tl:.4f}",
            )
        )
    verdicts.append((f"Tucker-2 <= {TUCKER_MAX_S:g} s", t_tk <= TUCKER_MAX_S, f"{t_tk:.3f} s"))
    verdicts.append(
        (
            f"cached call (memory) < {CACHED_MAX_MS:g} ms",
            t_mem * 1e3 < CACHED_MAX_MS,
            f"{t_mem * 1e3:.1f} ms",
        )
    )
    verdicts.append(
        (
            f"cached call (disk) < {CACHED_MAX_MS:g} ms",
            t_disk * 1e3 < CACHED_MAX_MS,
            f"{t_disk * 1e3:.1f} ms",
        )
    )
    verdicts.append(("cached factors identical to computed", same, str(same)))
    recovery_lines: list[str] = []
    if args.recovery_kernels > 0:
        recovery_lines, more = recovery(args.recovery_kernels, not args.skip_tensorly)
        verdicts += more

    print(
        f"Kernel {kernel} (power-law spectrum, decay {DECAY}, spatial {SPATIAL}, seed "
        f"{args.seed}), CP/Tucker rank {rank}, input {args.batch}x{i}x8x8"
    )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"repeats {args.repeats} (median), tensorly repeats {args.tl_repeats}, "
        f"load average at start {LOAD0}, at end {_load()}"
    )
    print()
    print("| What | Time | Output rel. error | Notes |")
    print("|---|---:|---:|---|")
    for what, t, e, note in rows:
        print(f"| {what} | {t} | {e} | {note} |")
    print()
    if recovery_lines:
        print("\n".join(recovery_lines))
        print()
    print_verdicts(verdicts)
    return 0 if all(ok for _, ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
