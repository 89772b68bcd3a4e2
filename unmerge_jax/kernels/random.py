"""Counter-based random numbers: one Threefry-2x32 cipher for every random draw of the engine.

A draw is a pure function of ``(key, counter)``, where the counter is a global index (a
parameter row for the bootstrap, a flat tensor entry for DARE's keep-masks). So results do not
depend on how a pass is cut into blocks, chunks, tensors, devices or processes, nor on the
order in which they are visited — the same property ``jax.random`` has, with the cipher written
out so XLA fuses it into the consumer.

* :func:`threefry2x32` — the cipher (20 rounds), elementwise.
* :func:`bernoulli_at` — DARE's keep-masks: Bernoulli(p) of entries ``start … start+size−1``,
  equal to ``jax.random.bernoulli(key, p, (n,))[start:start+size]``.
* :func:`poisson1_weights` — the bootstrap's Poisson(1) weights of global resampling units.
* :func:`model_keys`, :func:`name_hash` — the per-(seed, tensor, model) keys of a merge.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))

# CDF of Poisson(1) at 0..15 (the mass beyond 15 is < 1e-13). A draw from a uniform 32-bit word
# b is the number of CDF points below u = (b + ½)·2⁻³²: inverse-CDF sampling, no rejection loop.
_POISSON1_CDF = np.cumsum([np.exp(-1.0) / np.prod(np.arange(1, k + 1, dtype=np.float64)) for k in range(16)])
# The same test on integers: u > cdf_k  ⇔  b ≥ ⌊cdf_k·2³² − ½⌋ + 1. Points at or above 2³² can never
# be exceeded by a 32-bit word and are dropped.
_POISSON1_THRESHOLDS = np.floor(_POISSON1_CDF * 2.0**32 - 0.5) + 1
_POISSON1_THRESHOLDS = _POISSON1_THRESHOLDS[_POISSON1_THRESHOLDS < 2.0**32].astype(np.uint32)


def threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32 (20 rounds), the cipher behind ``jax.random``, written out elementwise.

    Same bits as ``jax.extend.random.threefry2x32_p`` (tested), but that primitive's CPU lowering
    runs the 5 round groups as a rolled loop that materialises two arrays per group (≈ 15–50 ns
    per entry here); unrolled, XLA fuses the rounds with the consumer into one loop (≈ 3 ns).

    Args:
      k1, k2: uint32 key words.
      x1, x2: uint32 arrays (the two counter words), broadcast together.
    Returns:
      the two uint32 output words.
    """
    def rotl(x, d):
        return (x << jnp.uint32(d)) | (x >> jnp.uint32(32 - d))

    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x = [x1 + ks[0], x2 + ks[1]]
    for g in range(5):
        for r in _ROTATIONS[g % 2]:
            x[0] = x[0] + x[1]
            x[1] = x[0] ^ rotl(x[1], r)
        x = [x[0] + ks[(g + 1) % 3], x[1] + ks[(g + 2) % 3] + jnp.uint32(g + 1)]
    return x[0], x[1]


def bernoulli_at(key, p, start, size: int):
    """Bernoulli(``p``) for entries ``start … start+size−1`` of a flat tensor.

    Entry ``i`` draws from :func:`threefry2x32` of ``key`` and the 64-bit counter ``i``, turned into
    a uniform float32 as ``jax.random.uniform`` does; so a chunk's mask is the same slice of the
    whole-tensor mask whatever the chunking, and equals ``jax.random.bernoulli(key, p, (n,))[i]``
    under JAX's default ``jax_threefry_partitionable=True`` (tested). The counter is built in
    uint32 halves with a carry (a uint64 iota made the draw 3× slower).
    """
    kd = jax.random.key_data(key)
    start = jnp.asarray(start).astype(jnp.uint64)
    lo0, hi0 = start.astype(jnp.uint32), (start >> jnp.uint64(32)).astype(jnp.uint32)
    lo = lo0 + jnp.arange(size, dtype=jnp.uint32)
    hi = hi0 + (lo < lo0).astype(jnp.uint32)
    b1, b2 = threefry2x32(kd[0], kd[1], hi, lo)
    mant = ((b1 ^ b2) >> jnp.uint32(9)) | jnp.uint32(0x3F800000)
    return jax.lax.bitcast_convert_type(mant, jnp.float32) - jnp.float32(1.0) < p.astype(jnp.float32)


def poisson1_weights(key, units, n_seeds: int):
    """Poisson(1) bootstrap weights of the given global resampling units.

    Replicate ``s`` of unit ``i`` is a pure function of ``(key, i, s)`` — not of the block, the
    tensor boundaries, the device count or the number of replicates S: it is word ``s mod 2`` of
    one :func:`threefry2x32` hash of the 64-bit unit index under the key ``fold_in(key, s // 2)``.
    One hash per unit and pair of replicates is the cheapest draw that keeps that property.

    Args:
      key: a ``jax.random`` key (the bootstrap seed).
      units: int64 array (r,) of global unit indices.
      n_seeds: number of replicates S (static).

    Returns:
      int32 array (S, r) of non-negative integer weights.
    """
    units = jnp.asarray(units).astype(jnp.uint64)
    lo, hi = (units & 0xFFFFFFFF).astype(jnp.uint32), (units >> 32).astype(jnp.uint32)
    thresholds = jnp.asarray(_POISSON1_THRESHOLDS)
    n_pairs = -(-n_seeds // 2)

    def pair_words(pair):
        pair_key = jax.random.bits(jax.random.fold_in(key, pair), (2,), jnp.uint32)
        return jnp.stack(threefry2x32(pair_key[0], pair_key[1], lo, hi))       # (2, r)

    # vmap over the pairs, not a Python loop: one hash in the program instead of S/2 copies (the
    # compile time no longer grows with S: 200 replicates compiled in 7.7 s instead of 156 s here).
    words = jax.vmap(pair_words)(jnp.arange(n_pairs, dtype=jnp.uint32)).reshape(2 * n_pairs, -1)[:n_seeds]
    return jnp.sum(words[:, :, None] >= thresholds, axis=-1, dtype=jnp.int32)


def model_keys(seed, nhash, k: int):
    """(k,) keys: model ``i`` of tensor ``nhash`` gets ``fold_in(fold_in(key(seed), nhash), i)``."""
    key = jax.random.fold_in(jax.random.key(seed), nhash)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(k, dtype=jnp.uint32))


def name_hash(name: str) -> int:
    """A stable 31-bit hash of a tensor name (CRC-32; Python's ``hash`` is salted per process)."""
    return zlib.crc32(str(name).encode("utf-8")) & 0x7FFFFFFF
