"""Host-side order statistics (unmerge_jax.orderstats) vs sorted arrays and ``np.percentile``:
the radix selection, the bracketed one-pass selection and its fallbacks, tie counts, the
percentile threshold."""

import numpy as np

from unmerge_jax import orderstats as O


def test_select_largest_equals_sorted_order_statistics():
    """The two-pass radix selection over chunks gives the exact r-th largest value and the count
    above it, with many ties, zeros and values sharing the top 16 bits."""
    rng = np.random.default_rng(4)
    a = np.abs(rng.normal(size=5000)).astype(np.float32)
    a[::7] = a[3]                                    # a heavily tied value
    a[::11] = 0.0
    b = (1.0 + rng.integers(0, 50, 5000) * np.float32(2**-20)).astype(np.float32)   # one top digit
    arrs = [O.abs_bits(a), O.abs_bits(b), O.abs_bits(np.zeros(10, np.float32))]
    ranks = np.array([[1, 2500, 5000, 0], [1, 17, 4999, 3000], [1, 10, 5, 0]])

    def passes():
        for s in range(0, 5000, 333):
            yield [x[s:s + 333] for x in arrs]

    thr, n_gt = O.select_largest(passes, ranks)
    for m, x in enumerate([a, b, np.zeros(10, np.float32)]):
        srt = np.sort(x)[::-1]
        for j, r in enumerate(ranks[m]):
            if r > 0:
                assert thr[m, j].view(np.float32) == srt[r - 1]
                assert n_gt[m, j] == np.sum(x > srt[r - 1])


def test_bracketed_selection_equals_radix_and_gives_up_on_misses():
    """The one-pass selection inside a bracket gives the radix selection's threshold and count
    above it, and per-chunk tie counts; a bracket that misses a rank, or a cap that heavy ties
    overflow, returns None (the caller falls back)."""
    rng = np.random.default_rng(8)
    a = np.abs(rng.normal(size=6000)).astype(np.float32)
    a[::5] = a[7]                                        # ties across chunks
    arrs = [O.abs_bits(a), O.abs_bits(a[::-1].copy())]
    srt = np.sort(arrs[0])[::-1]
    r = int(np.argmax(srt == arrs[0][7])) + 600          # inside the 1,200 tied entries
    ranks = np.array([[r, r + 1], [3000, 0]])
    chunks = lambda: ([x[s:s + 500] for x in arrs] for s in range(0, 6000, 500))  # noqa: E731
    thr, n_gt = O.select_largest(chunks, ranks)
    wide = [(srt[min(r + 2000, 5999)], srt[max(r - 500, 0)]), (np.uint32(0), np.uint32(0xFFFFFFFF))]
    got = O.select_largest_bracketed(chunks(), ranks, wide, [6000, 6000])
    assert got is not None
    np.testing.assert_array_equal(got[0], thr)
    np.testing.assert_array_equal(got[1], n_gt)
    np.testing.assert_array_equal(got[2][:, :, :], np.stack([O.tie_counts(chunks(), thr[:, j]) for j in range(2)], 1))
    assert got[2][0, 0].sum() == np.sum(arrs[0] == thr[0, 0]) > 1
    assert O.select_largest_bracketed(chunks(), ranks, [(srt[r - 650], srt[r - 700]), wide[1]], [6000, 6000]) is None
    assert O.select_largest_bracketed(chunks(), ranks, wide, [100, 6000]) is None



def test_percentile_threshold_selects_like_numpy_percentile():
    """The threshold from two order statistics selects exactly ``|u| ≥ np.percentile(|u|, q)``
    (float64, linear), with ties and zeros, for any n and q."""
    rng = np.random.default_rng(3)
    for n in (1, 2, 10, 1001, 4999):
        u = np.abs(rng.normal(size=(3, n))).astype(np.float32)
        u[1, ::3] = u[1, 0]
        u[2, ::2] = 0.0
        for q in (0.0, 37.5, 90.0, 100.0, *rng.uniform(0, 100, 20)):
            (r_lo, r_hi), frac = O.percentile_ranks(n, q)
            srt = np.sort(u, axis=1)[:, ::-1]
            thr = O.percentile_from_order(srt[:, r_lo - 1], srt[:, r_hi - 1], frac)
            want = u.astype(np.float64) >= np.percentile(u.astype(np.float64), q, axis=1, keepdims=True)
            np.testing.assert_array_equal(u >= thr[:, None], want)
