"""Simulated RL task vectors (the sparsity-scaling paper, §2.6): exact sparsity, log-normal magnitudes, random signs,
controlled shared/unique support between K agents; per tensor of a real architecture.

Support model. Each of the K agents changes exactly ``n_act = round((1 − s)·d)`` of the d entries.
A fraction ``shared`` of them (``n_shared = round(shared·n_act)``) sits on positions common to
*all* K agents; the other ``n_unique = n_act − n_shared`` are disjoint between agents. Positions
come from one random permutation: rank < n_shared → shared, then K consecutive blocks of
``n_unique`` ranks → agent k's unique positions. So the sparsity, the shared fraction and the
pairwise Jaccard ``n_shared / (2·n_act − n_shared)`` are exact, not just expected.
Non-zero values are ``±exp(μ + σ·z)`` (μ = −3, σ = 1.5), signs and z independent per agent.

Everything is a pure function of a ``jax.random`` key; trials/seeds are ``vmap``ped. Models are
simulated one tensor at a time (:func:`simulate_model`) with per-module and per-depth sparsity
profiles; each tensor's key is ``fold_in(key, tensor index)``, so a tensor does not depend on
which others are generated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from unmerge_jax.analysis.names import classify
from unmerge_jax.errors import UnmergeError

MU, SIGMA, SHARED = -3.0, 1.5, 0.2


def support_sizes(d: int, n_agents: int, sparsity: float, shared: float = SHARED):
    """``(n_act, n_shared, n_unique)`` for one tensor; raises if the supports cannot fit."""
    if not 0.0 <= sparsity <= 1.0:
        raise UnmergeError(f"sparsity must be in [0, 1], got {sparsity}")
    if not 0.0 <= shared <= 1.0:
        raise UnmergeError(f"shared fraction must be in [0, 1], got {shared}")
    if n_agents < 1:
        raise UnmergeError(f"need at least one agent, got {n_agents}")
    n_act = int(round((1.0 - sparsity) * d))
    n_shared = int(round(shared * n_act)) if n_agents > 1 else 0
    n_unique = n_act - n_shared
    if n_shared + n_agents * n_unique > d:
        raise UnmergeError(f"{n_agents} agents at sparsity {sparsity} with {shared:.0%} shared support need "
                           f"{n_shared + n_agents * n_unique} positions but the tensor has {d}; raise the sparsity "
                           f"or the shared fraction")
    return n_act, n_shared, n_unique


@functools.partial(jax.jit, static_argnames=("d", "n_agents"))
def _simulate(key, mu, sigma, n_shared, n_unique, *, d, n_agents):
    # Support sizes are traced, not static: one compile per (d, K) serves every sparsity.
    k_perm, k_mag, k_sign = jax.random.split(key, 3)
    rank = jax.random.permutation(k_perm, d)  # rank of each position, a random bijection
    agent = jnp.arange(n_agents)[:, None]
    lo = n_shared + agent * n_unique
    active = (rank[None, :] < n_shared) | ((rank[None, :] >= lo) & (rank[None, :] < lo + n_unique))
    mag = jnp.exp(mu + sigma * jax.random.normal(k_mag, (n_agents, d), dtype=jnp.float32))
    sign = jax.random.rademacher(k_sign, (n_agents, d), dtype=jnp.float32)
    return jnp.where(active, sign * mag, 0.0).astype(jnp.float32)


def simulate_agents(key, d: int, n_agents: int, sparsity: float, *, shared: float = SHARED, mu: float = MU,
                    sigma: float = SIGMA):
    """``(K, d)`` float32 task vectors of K agents (see module doc)."""
    _, n_shared, n_unique = support_sizes(d, n_agents, sparsity, shared)
    return _simulate(key, jnp.float32(mu), jnp.float32(sigma), n_shared, n_unique, d=d, n_agents=n_agents)


def simulate_trials(seed: int, n_trials: int, d: int, n_agents: int, sparsity: float, **kw):
    """``(n_trials, K, d)``: one vmapped call over ``n_trials`` keys split from ``seed``."""
    _, n_shared, n_unique = support_sizes(d, n_agents, sparsity, kw.get("shared", SHARED))
    keys = jax.random.split(jax.random.key(seed), n_trials)
    f = functools.partial(_simulate, d=d, n_agents=n_agents)
    return jax.vmap(f, in_axes=(0, None, None, None, None))(
        keys, jnp.float32(kw.get("mu", MU)), jnp.float32(kw.get("sigma", SIGMA)), n_shared, n_unique)


@dataclass(frozen=True)
class SparsityProfile:
    """Per-tensor sparsity ``s + module_offset[class] + depth_slope·(layer/(L−1) − ½)``, clipped.

    ``FLAT`` adds nothing. ``PAPER_LIKE`` encodes the pattern the sparsity-scaling paper reports (attention sparser
    than MLP, norms densest, deeper layers sparser): in a simulation this pattern is an *input*.
    """

    module_offset: dict = field(default_factory=dict)
    depth_slope: float = 0.0

    def sparsity(self, base: float, name: str, n_layers: int) -> float:
        layer, _, cls = classify(name)
        s = base + self.module_offset.get(cls, 0.0)
        if layer is not None and n_layers > 1:
            s += self.depth_slope * (layer / (n_layers - 1) - 0.5)
        return float(np.clip(s, 0.0, 0.9999))


PROFILES = {
    "flat": SparsityProfile(),
    "paper-like": SparsityProfile({"attention": 0.01, "mlp": -0.01, "norm": -0.05, "embedding": 0.015,
                                   "lm_head": -0.02}, depth_slope=0.02),
}


def calibrated_sparsity(n_billion, points=((3.0, 0.85), (7.0, 0.90))):
    """The set sparsity of the sparsity-scaling paper (§2.6): the law ``1 − a·N^-b`` through the RAM paper's two points."""
    (n1, s1), (n2, s2) = points
    b = np.log((1 - s1) / (1 - s2)) / np.log(n2 / n1)
    a = (1 - s1) * n1 ** b
    return 1.0 - a * np.asarray(n_billion, dtype=np.float64) ** (-b)


def simulate_model(shapes, key, n_agents: int, sparsity: float, *, profile: SparsityProfile = PROFILES["flat"],
                   max_elements: int | None = None, shared: float = SHARED):
    """Yield ``(name, deltas (K, *shape), set_sparsity)`` tensor by tensor.

    ``max_elements`` caps each tensor at that many entries (returned flat): a shape-faithful,
    size-reduced stand-in when the full model would take too long to generate. Per-tensor L0
    against the tensor's own max depends on the tensor size (the max of more log-normals is
    larger), so capped runs say so in their outputs.
    """
    layers = [classify(n)[0] for n, _ in shapes]
    n_layers = 1 + max([x for x in layers if x is not None], default=0)
    for i, (name, shape) in enumerate(shapes):
        d = int(np.prod(shape))
        s = profile.sparsity(sparsity, name, n_layers)
        if max_elements is not None and d > max_elements:
            d, shape = max_elements, (max_elements,)
        x = simulate_agents(jax.random.fold_in(key, i), d, n_agents, s, shared=shared)
        yield name, np.asarray(x).reshape((n_agents,) + tuple(shape)), s


def _check_simulation(length, n_agents, sparsity, size_b, shared, max_elements, seed) -> None:
    """One-line errors for simulation parameters out of range (before anything is drawn)."""
    from unmerge_jax.stats import check_seed

    def whole(flag, v, low):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise UnmergeError(f"{flag} must be a whole number >= {low}, got {v!r}")

    def finite(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)

    if length is not None:
        whole("--length", length, 1)
    whole("--agents", n_agents, 1)
    if max_elements is not None:
        whole("--max-elements", max_elements, 1)
    if sparsity is not None and not (finite(sparsity) and 0 <= sparsity <= 1):
        raise UnmergeError(f"--sparsity must be a fraction in [0, 1], got {sparsity}")
    if size_b is not None and not (finite(size_b) and size_b > 0):
        raise UnmergeError(f"--size must be a model size in billions > 0, got {size_b}")
    if not (finite(shared) and 0 <= shared <= 1):
        raise UnmergeError(f"--shared must be a fraction in [0, 1], got {shared}")
    check_seed(seed, "--seed")


def simulate_and_measure(*, length: int | None = None, arch: str | None = None, n_agents: int = 3,
                         sparsity: float | None = None, size_b: float | None = None, shared: float = SHARED,
                         profile: str = "flat", max_elements: int | None = 1 << 16, seed: int = 0, out=None) -> dict:
    """Simulate K agents (a flat vector of ``length``, or every tensor of ``arch``), measure each
    agent's sparsity metrics and the inter-agent overlap, streamed per tensor; optionally write
    ``agent_<k>.safetensors`` (tensor name → δ) into ``out``. ``size_b`` picks the calibrated set
    sparsity of a model of that many billion parameters."""
    from unmerge_jax.analysis.architectures import resolve, tensor_shapes
    from unmerge_jax.analysis.metrics import sparsity_metrics
    from unmerge_jax.analysis.overlap import OverlapAccumulator
    from unmerge_jax.sources import MemorySource

    if (length is None) == (arch is None):
        raise UnmergeError("give exactly one of --length or --arch")
    _check_simulation(length, n_agents, sparsity, size_b, shared, max_elements, seed)
    if out is not None:
        from unmerge_jax.io.atomic import check_output

        check_output(out, directory=True)  # before the work: not a file, writable
    if sparsity is None:
        sparsity = float(calibrated_sparsity(size_b if size_b is not None else 70.0))
    if profile not in PROFILES:
        raise UnmergeError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    shapes = [("delta", (int(length),))] if length is not None else list(tensor_shapes(resolve(arch)))
    cap = None if length is not None else max_elements
    tensors = {}
    ov = OverlapAccumulator(n_agents)
    for name, x, _ in simulate_model(shapes, jax.random.key(seed), n_agents, sparsity, profile=PROFILES[profile],
                                     max_elements=cap, shared=shared):
        tensors[name] = x
        ov.add(x)
    # The K agents of a tensor are drawn together (their supports are coupled), so they are held
    # and each agent is measured from memory.
    per_agent = [sparsity_metrics(MemorySource({n: v[k] for n, v in tensors.items()}, label=f"simulated agent {k}",
                                               copy=False), per_tensor=False)
                 for k in range(n_agents)]
    if out is not None:
        from pathlib import Path

        from safetensors.numpy import save_file

        from unmerge_jax.io.atomic import atomic_file

        Path(out).mkdir(parents=True, exist_ok=True)
        for k in range(n_agents):
            with atomic_file(Path(out) / f"agent_{k}.safetensors", suffix=".safetensors") as tmp:
                save_file({n: np.ascontiguousarray(v[k]) for n, v in tensors.items()}, str(tmp))
    return {"set_sparsity": sparsity, "n_agents": n_agents, "shared": shared, "profile": profile, "seed": seed,
            "max_elements_per_tensor": cap, "agents": per_agent, "inter_agent": ov.result()}
