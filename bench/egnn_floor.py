"""Where the EGNN's time goes: a real forward (+ backward) against its matmuls alone.

    python bench/egnn_floor.py                       # 9 x 256, 20 molecules of 19 atoms, float32
    python bench/egnn_floor.py --molecules 8 --atoms 29
    python bench/egnn_floor.py --molecules 8 --hidden 8        # next to no FLOPs: eager overhead

Times, per molecule and network call (one reverse step of one molecule):
- the sampling forward (no grad), the training forward + backward of ``EGNNDynamics``, and the
  same with per-sample weight gradients (``trainer.fused_rollout``: the sampler's step, whose
  matmuls are the training ones);
- the same sequence of matmuls (every ``Linear`` of the split-weight EGNN, forward and the two
  backward products, with the same shapes) run on their own, on cache-warm random inputs: a lower
  bound that no reordering of the elementwise work (SiLU, gathers, scatters) can beat.

The gap between the two is everything that is not a matmul: what fusing elementwise kernels could
at best remove. The last line gives the float32 matmul throughput of the edge layer and of a large
square matmul (about the machine's peak), for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elign.edm.egnn import EGNNDynamics  # noqa: E402
from elign.edm.persample import PerSampleTape  # noqa: E402
from elign.engine.memory import configure_host_allocator  # noqa: E402


def median_ms(fn: Callable[[], object], repeats: int, per: int) -> float:
    """Median wall time of ``fn`` in ms, divided by ``per``, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / per


def matmul_sequence(layers: int, nf: int, v: int, e: int, backward: bool) -> Callable[[], None]:
    """The EGNN's matmuls for ``v`` atoms and ``e`` edges: per block, the GCL (two per-node halves of
    the first edge layer, the rank-2 edge-feature term, the second edge layer, the attention layer,
    the two node-MLP layers) and the coordinate update (two per-node halves, rank-2 term, second
    layer, the last layer to one channel). With ``backward``, also the input- and weight-gradient
    products of each."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    # (rows, in, out) of every Linear application in one block.
    shapes = [(v, nf, nf)] * 2 + [(e, 2, nf), (e, nf, nf), (e, nf, 1), (v, 2 * nf, nf), (v, nf, nf)]
    shapes += [(v, nf, nf)] * 2 + [(e, 2, nf), (e, nf, nf), (e, nf, 1)]
    ops = [(rand(r, i), rand(o, i), rand(r, o)) for r, i, o in shapes]
    # The rank-2 term's input gradient [E, nf] x [nf, 2] is a linear with the transposed weight
    # (edge_ops._EdgeInput): MKL's plain mm is ~4x slower at that shape.
    narrow = [w.t().contiguous() if w.shape[1] < 8 else None for _, w, _ in ops]

    def run() -> None:
        for _ in range(layers):
            for (x, w, grad), w_t in zip(ops, narrow):
                x.mm(w.t())
                if backward:
                    grad.mm(w) if w_t is None else torch.nn.functional.linear(grad, w_t)
                    x.t().mm(grad)  # autograd's weight gradient of x @ w.T: x.T @ grad

    return run


def matmul_gflops(m: int, k: int, n: int, repeats: int) -> float:
    """Throughput of one ``[m, k] x [k, n]`` float32 matmul on cache-warm inputs."""
    x, w = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / (median_ms(lambda: x.mm(w), repeats, 1) * 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=9, help="EGNN blocks")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--molecules", type=int, default=20, help="molecules per call (the trainer's micro-batch x step chunk)")
    p.add_argument("--atoms", type=int, default=19, help="atoms per molecule")
    p.add_argument("--repeats", type=int, default=8, help="timed calls per figure (median)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    configure_host_allocator("retain")  # as run.py does
    torch.manual_seed(0)
    dyn = EGNNDynamics(hidden_nf=a.hidden, num_layers=a.layers)
    m, n = a.molecules, a.atoms
    z = torch.randn(m, n, 9)
    mask = torch.ones(m, n, dtype=torch.bool)
    t = torch.rand(m)
    v, e = m * n, m * n * (n - 1)

    def sample() -> None:
        with torch.no_grad():
            dyn(z, t, mask)

    def train() -> None:
        dyn(z, t, mask).square().sum().backward()

    tape = PerSampleTape(dyn, m)

    def per_sample() -> None:
        with tape.record(0):
            dyn(z, t, mask).square().sum().backward()

    print(f"EGNN {a.layers} x {a.hidden}, {m} molecules of {n} atoms per call ({e} edges), "
          f"float32, {torch.get_num_threads()} threads; ms per molecule and call:")
    training_floor = matmul_sequence(a.layers, a.hidden, v, e, backward=True)
    for name, real, floor in (
        ("sampling forward", sample, matmul_sequence(a.layers, a.hidden, v, e, backward=False)),
        ("training forward + backward", train, training_floor),
        ("per-sample forward + backward", per_sample, training_floor),
    ):
        real_ms, floor_ms = median_ms(real, a.repeats, m), median_ms(floor, a.repeats, m)
        print(f"  {name + ':':31s} {real_ms:6.2f} ms; matmuls alone {floor_ms:6.2f} ms "
              f"({100 * floor_ms / real_ms:.0f} %); the rest {real_ms - floor_ms:5.2f} ms")
    big = min(2048, 8 * a.hidden)
    print(f"matmul throughput: edge layer [{e}, {a.hidden}] x [{a.hidden}, {a.hidden}] "
          f"{matmul_gflops(e, a.hidden, a.hidden, a.repeats):.0f} GFLOPS; "
          f"[{big}, {big}] x [{big}, {big}] {matmul_gflops(big, big, big, a.repeats):.0f} GFLOPS")


if __name__ == "__main__":
    main()
