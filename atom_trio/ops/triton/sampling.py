"""Sampling without sorting the vocabulary: temperature, min-p, top-k, top-p, the draw.

Each row is split into tiles of `MAX_TILE` logits, and every pass over the
logits runs one program per (row, tile), so one row fills many SMs (batch 1 is
latency-bound, not bandwidth-bound, with one program per row). Between those
passes a tiny program per row reduces the tiles' partial results. The launch
sequence is fixed (host integers only, no host sync), so it is CUDA-graph
capturable:

1. **Tile statistics** (rows x tiles): each tile's max and first argmax, its
   smallest finite value, its count of finite values and its softmax partial
   ``sum(exp(x - tile max))``. Greedy rows are done here: their token is the
   argmax over the tiles' maxima.
2. **Start** (rows): the row's max ``M``, its softmax denominator, min-p's
   cut-off ``M + log(min_p)`` (closed form), and a first bracket for each
   search. top-k's threshold is at least the k-th largest *tile max* (k tiles
   hold at least k values that large), so its bracket starts narrow; top-p's is
   above ``M + log((1 - p) * Z / n)`` (the n kept tokens at or below it carry
   more than ``1 - p`` of the mass ``Z``, each at most ``exp(t - M)``).
3. **Search rounds** (`ROUNDS` x (rows x tiles, then rows)): min-p, top-k and
   top-p each keep exactly the tokens with (temperature-scaled) logit ``x >= t``
   for a threshold ``t`` that is a data value, so ties at the threshold are
   kept together as the torch sampler keeps them. A round tests `PIVOTS`
   thresholds spread over the bracket: each tile counts (top-k) or sums the
   mass ``exp(x - M)`` (top-p) of its values at or above each pivot, and
   records the smallest value at or above and the largest below each pivot;
   only tiles whose max reaches the bracket do any of this. The row program
   then keeps the sub-bracket where the count or mass crosses the target and
   snaps it onto the data, so a bracket holding one distinct value is the
   threshold. vLLM's order: min-p, then top-k among what min-p kept, then top-p
   over the distribution renormalised to what top-k kept. A search still open
   after the last round is finished by the row program alone (same pivots,
   serially over the tiles): rare, slower, same answer.
4. **The draw** (rows x tiles, then rows): the exponential race (Gumbel-max in
   log space): the token with the largest ``x - log(E)``, ``E ~ Exp(1)``
   per token, among the kept tokens, is a draw from their renormalised
   softmax, without a softmax. Each tile above the cut-off finds its best
   candidate; the row takes the best of those (the race's argmax composes
   across tiles exactly, ties to the smallest token id). ``E`` comes from
   Philox keyed by the row's 64-bit seed and the token id, computed as
   ``-log1p(-V)`` from a 32-bit uniform ``V`` so the small ``E`` that decide
   the race keep full precision.

A row's token is a function of its logits and its seed alone: the tiling
depends only on the vocabulary size, every reduction runs in a fixed order,
and token ``i`` uses Philox counter ``i // 4``, output ``i % 4``, whatever
shares the batch.

Portable Triton only (no inline PTX, no vendor libdevice, no atomics), so it
builds for ROCm too. Per-row knobs are device tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILE = 512  # logits per tile (fewer for a smaller vocabulary); a power of two >= 16
PIVOTS = 16  # thresholds per round: pivot 0 measures the search's floor, 1..15 span the bracket
ROUNDS = 6  # parallel search rounds: top-k 50 + top-p 0.9 on 128k Gaussian logits settles in 4-5, top-p alone in 2-6
_TILE_WARPS = 4
_ROW_WARPS = 4
# The per-row state, float32 [rows, 8], at offsets 0..7: the search's phase (0 top-k, 1 top-p,
# 2 done), its floor (the cut-off so far: the final cut-off once done), the bracket [lo, hi] (lo
# reaches the goal; above hi nothing does), base (the count or mass at the floor, -1 until measured), the row's max, its
# smallest finite value and its softmax denominator relative to the max.
_STATE = 8
_FLOOR = 1


@triton.jit
def _key(x):
    """float32 -> int32 with the same order (for non-NaN): flip the magnitude bits of negatives."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _value(key):
    """The inverse of `_key` (takes int64 keys within int32 range)."""
    key = key.to(tl.int32)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _inv_temperature(temperature):
    """One division per row (greedy rows: 1). x * (1 / T) may differ from x / T in the last bit,
    which moves only ties at a boundary (and is exact for power-of-two temperatures)."""
    return 1.0 / tl.where(temperature != 0.0, temperature, 1.0)


@triton.jit
def _load_tile(logits_ptr, row, stride_row, tile, vocab, inv_temperature, TILE: tl.constexpr):
    cols = tile * TILE + tl.arange(0, TILE)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=cols < vocab, other=-float("inf"))
    return x.to(tl.float32) * inv_temperature, cols


@triton.jit
def _first_argmax(values, indices):
    """The largest of ``values`` and the smallest of ``indices`` holding it (torch.argmax's tie rule)."""
    best = tl.max(values, axis=0)
    return best, tl.min(tl.where(values == best, indices, 2147483647), axis=0)


@triton.jit
def _pick(vector, index, i):
    """``vector[i]`` of a register vector (-inf where ``i`` is out of range)."""
    return tl.max(tl.where(index == i, vector, -float("inf")), axis=0)


@triton.jit
def _kth_largest(values, valid, k):
    """The k-th largest of the valid ``values`` (-inf if fewer than k): bisection over the sort key."""
    keys = tl.where(valid, _key(values).to(tl.int64), -(2**32))
    lo = tl.full([], -(2**31), tl.int64)  # invariant: at least k keys >= lo
    hi = tl.full([], 2**31, tl.int64)  # and fewer than k keys >= hi
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        enough = tl.sum((keys >= mid).to(tl.int32), axis=0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    return tl.where(tl.sum(valid.to(tl.int32), axis=0) >= k, _value(lo), -float("inf"))


@triton.jit
def _pivots(floor, lo, hi, base, P: tl.constexpr):
    """The round's thresholds, ascending, and the lowest (tiles whose max is below it can skip).

    Pivot 0 is the floor while its count or mass is unknown, else lo again;
    pivots 1..P-1 run from lo to hi evenly in value, both ends exactly.
    """
    j = tl.arange(0, P)
    spread = lo + (hi - lo) * ((j - 1).to(tl.float32) / (P - 2))
    pivots = tl.where(j == P - 1, hi, tl.minimum(spread, hi))
    lowest = tl.where(base < 0.0, floor, lo)
    return tl.where(j == 0, lowest, pivots), lowest


@triton.jit
def _pivot_stats(x, row_max, pivots, by_mass):
    """Per pivot: the count (or mass ``exp(x - M)``) of finite ``x >= pivot``, the smallest such
    ``x`` and the largest ``x`` below the pivot."""
    finite = x > -float("inf")
    weight = tl.where(finite, tl.where(by_mass, tl.exp(x - row_max), 1.0), 0.0)
    at_or_above = x[:, None] >= pivots[None, :]
    stat = tl.sum(tl.where(at_or_above, weight[:, None], 0.0), axis=0)
    above_min = tl.min(tl.where(at_or_above & finite[:, None], x[:, None], float("inf")), axis=0)
    below_max = tl.max(tl.where(at_or_above, -float("inf"), x[:, None]), axis=0)
    return stat, above_min, below_max


@triton.jit
def _top_p_start(t, n, row_max, min_finite, z, top_p):
    """top-p's first bracket floor above the previous cut-off ``t`` that kept ``n`` tokens, and its base.

    The threshold lies above ``M + log((1 - p) * base / n)`` (see the module
    docstring); ``base`` (the mass at ``t``) is known when nothing was cut yet
    (the softmax denominator), else measured by the first round and taken as
    at least 1 (the max's own mass) for the bound. The margin covers rounding:
    a bound that still misses restarts the search from the floor.
    """
    base = tl.where(t == -float("inf"), z, -1.0)
    bound = row_max + tl.log((1.0 - top_p) * tl.maximum(base, 1.0) / tl.maximum(n, 1.0)) - 1e-3
    lo = tl.minimum(tl.maximum(tl.maximum(t, bound), min_finite), row_max)
    return lo, base


@triton.jit
def _advance(phase, floor, lo, hi, base, row_max, min_finite, z, stat, above_min, below_max, top_k, top_p,
             use_top_p, P: tl.constexpr):
    """One search step from a round's statistics at `_pivots`: the next (phase, floor, lo, hi, base).

    The statistics fall as the pivot rises (sums of non-negative terms over
    shrinking subsets, so even rounding cannot make them rise): the pivots
    that reach the goal are a prefix. The threshold lies between the last of
    them and the next; snapped onto the data, that interval is the new
    bracket, and a bracket with one distinct value is the threshold.
    """
    j = tl.arange(0, P)
    pivot0 = tl.where(base < 0.0, floor, lo)
    base = tl.where(base < 0.0, _pick(stat, j, 0), base)
    goal = tl.where(phase == 0.0, top_k, top_p * base)
    last = tl.sum((stat >= goal).to(tl.int32), axis=0) - 1
    t = _pick(above_min, j, last)
    n = _pick(stat, j, last)
    next_max = _pick(below_max, j, last + 1)  # -inf past the last pivot: hi itself passed
    lowest = tl.maximum(floor, min_finite)
    # The floor itself misses the goal (min-p kept fewer than k): the earlier cut-off binds. A
    # pivot 0 above the floor that misses (top-p's bound, off by rounding) restarts from the floor.
    keep_floor = (base < goal) | ((last < 0) & (pivot0 <= lowest))
    restart = (last < 0) & (pivot0 > lowest)
    settled = keep_floor | ((last >= 0) & (t >= next_max))
    t = tl.where(keep_floor, floor, t)
    n = tl.where(keep_floor, base, n)
    to_top_p = settled & (phase == 0.0) & use_top_p
    p_lo, p_base = _top_p_start(t, n, row_max, min_finite, z, top_p)
    new_phase = tl.where(settled, tl.where(to_top_p, 1.0, 2.0), phase)
    new_floor = tl.where(settled, t, floor)
    new_lo = tl.where(settled, p_lo, tl.where(restart, lowest, t))
    new_hi = tl.where(settled, row_max, tl.where(restart, pivot0, next_max))  # pivot0 failed: an open end
    new_base = tl.where(to_top_p, p_base, base)
    return new_phase, new_floor, new_lo, new_hi, new_base


@triton.jit
def _tile_stats_kernel(logits_ptr, stride_row, vocab, temperature_ptr, max_ptr, arg_ptr, min_ptr, count_ptr,
                       sum_ptr, n_tiles, TILE: tl.constexpr):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    x, cols = _load_tile(logits_ptr, row, stride_row, tile, vocab, _inv_temperature(tl.load(temperature_ptr + row)),
                         TILE)
    finite = x > -float("inf")
    best, first = _first_argmax(x, cols)
    out = row * n_tiles + tile
    tl.store(max_ptr + out, best)
    tl.store(arg_ptr + out, first)
    tl.store(min_ptr + out, tl.min(tl.where(finite, x, float("inf")), axis=0))
    tl.store(count_ptr + out, tl.sum(finite.to(tl.float32), axis=0))
    shift = tl.where(best > -float("inf"), best, 0.0)
    tl.store(sum_ptr + out, tl.sum(tl.where(finite, tl.exp(x - shift), 0.0), axis=0))


@triton.jit
def _round_kernel(logits_ptr, stride_row, vocab, temperature_ptr, state_ptr, max_ptr, stat_ptr, above_ptr,
                  below_ptr, n_tiles, TILE: tl.constexpr, P: tl.constexpr):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    state = state_ptr + row * 8
    phase = tl.load(state + 0)
    base = tl.load(state + 4)
    pivots, lowest = _pivots(tl.load(state + 1), tl.load(state + 2), tl.load(state + 3), base, P)
    if (phase < 2.0) & (tl.load(max_ptr + row * n_tiles + tile) >= lowest):
        inv_temperature = _inv_temperature(tl.load(temperature_ptr + row))
        x, _ = _load_tile(logits_ptr, row, stride_row, tile, vocab, inv_temperature, TILE)
        stat, above_min, below_max = _pivot_stats(x, tl.load(state + 5), pivots, phase == 1.0)
        out = (row * n_tiles + tile) * P + tl.arange(0, P)
        tl.store(stat_ptr + out, stat)
        tl.store(above_ptr + out, above_min)
        tl.store(below_ptr + out, below_max)


@triton.jit
def _finish(phase, floor, lo, hi, base, row_max, min_finite, z, tile_max, logits_ptr, row, stride_row, vocab,
            inv_temperature, top_k, top_p, use_top_p, n_tiles, TILE: tl.constexpr, TILES: tl.constexpr,
            P: tl.constexpr):
    """Rounds by this row program alone until the searches settle (after the parallel rounds)."""
    tiles = tl.arange(0, TILES)
    while phase < 2.0:
        pivots, lowest = _pivots(floor, lo, hi, base, P)
        stat = tl.zeros([P], tl.float32)
        above_min = tl.full([P], float("inf"), tl.float32)
        below_max = tl.full([P], -float("inf"), tl.float32)
        for tile in range(0, n_tiles):
            if _pick(tile_max, tiles, tile) >= lowest:
                x, _ = _load_tile(logits_ptr, row, stride_row, tile, vocab, inv_temperature, TILE)
                tile_stat, tile_min, tile_max_below = _pivot_stats(x, row_max, pivots, phase == 1.0)
                stat += tile_stat
                above_min = tl.minimum(above_min, tile_min)
                below_max = tl.maximum(below_max, tile_max_below)
        phase, floor, lo, hi, base = _advance(phase, floor, lo, hi, base, row_max, min_finite, z, stat, above_min,
                                              below_max, top_k, top_p, use_top_p, P)
    return phase, floor, lo, hi, base


@triton.jit
def _update_kernel(state_ptr, max_ptr, min_ptr, count_ptr, sum_ptr, stat_ptr, above_ptr, below_ptr, logits_ptr,
                   stride_row, vocab, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, n_tiles,
                   TILE: tl.constexpr, TILES: tl.constexpr, P: tl.constexpr, START: tl.constexpr,
                   FINISH: tl.constexpr):
    """The row's step between passes: the start (``START``) or a round's reduction, then with
    ``FINISH`` the serial completion of any search still open."""
    row = tl.program_id(0)
    state = state_ptr + row * 8
    tiles = tl.arange(0, TILES)
    tile_ok = tiles < n_tiles
    tile_max = tl.load(max_ptr + row * n_tiles + tiles, mask=tile_ok, other=-float("inf"))
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row).to(tl.int64)
    top_p = tl.load(top_p_ptr + row)
    use_top_p = top_p < 1.0
    if START:
        row_max = tl.max(tile_max, axis=0)
        min_finite = tl.min(tl.load(min_ptr + row * n_tiles + tiles, mask=tile_ok, other=float("inf")), axis=0)
        n_finite = tl.sum(tl.load(count_ptr + row * n_tiles + tiles, mask=tile_ok, other=0.0), axis=0)
        partial = tl.load(sum_ptr + row * n_tiles + tiles, mask=tile_ok, other=0.0)
        z = tl.sum(tl.where(tile_max > -float("inf"), partial * tl.exp(tile_max - row_max), 0.0), axis=0)
        greedy = temperature == 0.0
        floor = row_max + tl.log(tl.load(min_p_ptr + row))  # min_p = 0: -inf, nothing cut
        use_top_k = (top_k > 0) & (top_k < vocab)
        searching = (temperature != 0.0) & (row_max > -float("inf"))
        k_lo = tl.maximum(tl.maximum(floor, _kth_largest(tile_max, tile_ok, top_k)), min_finite)
        p_lo, p_base = _top_p_start(floor, n_finite, row_max, min_finite, z, top_p)
        phase = tl.where(searching & use_top_k, 0.0, tl.where(searching & use_top_p, 1.0, 2.0))
        floor = tl.where(greedy, -float("inf"), floor)
        lo = tl.where(use_top_k, k_lo, p_lo)
        hi = row_max
        base = tl.where(use_top_k, tl.where(floor == -float("inf"), n_finite, -1.0), p_base)
        if FINISH:
            phase, floor, lo, hi, base = _finish(
                phase, floor, lo, hi, base, row_max, min_finite, z, tile_max, logits_ptr, row, stride_row, vocab,
                _inv_temperature(temperature), top_k.to(tl.float32), top_p, use_top_p, n_tiles, TILE, TILES, P)
        tl.store(state + 0, phase)
        tl.store(state + 1, floor)
        tl.store(state + 2, lo)
        tl.store(state + 3, hi)
        tl.store(state + 4, base)
        tl.store(state + 5, row_max)
        tl.store(state + 6, min_finite)
        tl.store(state + 7, z)
    else:
        phase = tl.load(state + 0)
        if phase < 2.0:
            floor = tl.load(state + 1)
            lo = tl.load(state + 2)
            hi = tl.load(state + 3)
            base = tl.load(state + 4)
            row_max = tl.load(state + 5)
            min_finite = tl.load(state + 6)
            z = tl.load(state + 7)
            _, lowest = _pivots(floor, lo, hi, base, P)
            # exactly the tiles the round worked on (the others wrote nothing this round)
            active = (tile_ok & (tile_max >= lowest))[:, None]
            offsets = (row * n_tiles + tiles)[:, None] * P + tl.arange(0, P)[None, :]
            stat = tl.sum(tl.load(stat_ptr + offsets, mask=active, other=0.0), axis=0)
            above_min = tl.min(tl.load(above_ptr + offsets, mask=active, other=float("inf")), axis=0)
            below_max = tl.max(tl.load(below_ptr + offsets, mask=active, other=-float("inf")), axis=0)
            phase, floor, lo, hi, base = _advance(phase, floor, lo, hi, base, row_max, min_finite, z, stat,
                                                  above_min, below_max, top_k.to(tl.float32), top_p, use_top_p, P)
            if FINISH:
                phase, floor, lo, hi, base = _finish(
                    phase, floor, lo, hi, base, row_max, min_finite, z, tile_max, logits_ptr, row, stride_row, vocab,
                    _inv_temperature(temperature), top_k.to(tl.float32), top_p, use_top_p, n_tiles, TILE, TILES, P)
            tl.store(state + 0, phase)
            tl.store(state + 1, floor)
            tl.store(state + 2, lo)
            tl.store(state + 3, hi)
            tl.store(state + 4, base)


@triton.jit
def _exponential(bits):
    """Exp(1) from 32 random bits: ``-log1p(-V)``, exact near 0 where the race is decided."""
    v = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # (bits + 1/2) / 2**32, never 0 or 1
    series = v * (1.0 + v * (0.5 + v * (1.0 / 3.0)))  # log1p's series: relative error < v**3
    return tl.where(v < 0.0009765625, series, -tl.log(1.0 - v))


@triton.jit
def _draw_kernel(logits_ptr, stride_row, vocab, temperature_ptr, seed_ptr, state_ptr, max_ptr, score_ptr,
                 token_ptr, n_tiles, TILE: tl.constexpr):
    """The tile's exponential-race winner among its tokens with scaled logit >= the row's cut-off."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    cutoff = tl.load(state_ptr + row * 8 + 1)
    out = row * n_tiles + tile
    QUARTER: tl.constexpr = TILE // 4
    if (temperature != 0.0) & (tl.load(max_ptr + out) >= cutoff):
        counters = tile * QUARTER + tl.arange(0, QUARTER)
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr + row), counters)
        # [QUARTER, 4] with [i, j] = output j of counter i, which is token 4 * counter + j
        bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [QUARTER, 4])
        cols = 4 * counters[:, None] + tl.arange(0, 4)[None, :]
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=cols < vocab, other=-float("inf"))
        x = x.to(tl.float32) * _inv_temperature(temperature)
        score = tl.where((x >= cutoff) & (cols < vocab), x - tl.log(_exponential(bits)), -float("inf"))
        best, token = _first_argmax(tl.reshape(score, [TILE]), tl.reshape(cols, [TILE]))
        tl.store(score_ptr + out, best)
        tl.store(token_ptr + out, token)


@triton.jit
def _pick_kernel(out_ptr, temperature_ptr, state_ptr, max_ptr, arg_ptr, score_ptr, token_ptr, n_tiles,
                 TILES: tl.constexpr):
    """The row's token: the best tile's (greedy: the argmax over tile maxima; else the race's winner)."""
    row = tl.program_id(0)
    tiles = tl.arange(0, TILES)
    tile_ok = tiles < n_tiles
    at = row * n_tiles + tiles
    tile_max = tl.load(max_ptr + at, mask=tile_ok, other=-float("inf"))
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    # the tiles the draw wrote: none for greedy rows
    drawn = tile_ok & (tile_max >= tl.where(greedy, float("inf"), tl.load(state_ptr + row * 8 + 1)))
    score = tl.load(score_ptr + at, mask=drawn, other=-float("inf"))
    values = tl.where(greedy, tile_max, score)
    tokens = tl.where(greedy, tl.load(arg_ptr + at, mask=tile_ok, other=2147483647),
                      tl.load(token_ptr + at, mask=drawn, other=2147483647))
    best = tl.max(values, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(tile_ok & (values == best), tokens, 2147483647), axis=0).to(tl.int64))


def _tiling(vocab: int) -> tuple[int, int]:
    """(tile size, tiles per row): from the vocabulary alone, so a row's results never depend on its batch."""
    tile = max(16, min(MAX_TILE, triton.next_power_of_2(vocab)))
    return tile, triton.cdiv(vocab, tile)


def _search(logits, temperature, top_k, top_p, min_p):
    """Launch the statistics, start and search rounds; returns (state, tile max, tile argmax, tiling)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with unit stride along the vocabulary, got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    tile, n_tiles = _tiling(vocab)
    tiles = triton.next_power_of_2(n_tiles)
    device = logits.device
    tile_stats = torch.empty(4, rows, n_tiles, dtype=torch.float32, device=device)
    tile_max, tile_min, tile_count, tile_sum = tile_stats
    tile_arg = torch.empty(rows, n_tiles, dtype=torch.int32, device=device)
    partials = torch.empty(3, rows, n_tiles, PIVOTS, dtype=torch.float32, device=device)
    state = torch.empty(rows, _STATE, dtype=torch.float32, device=device)
    if rows == 0:
        return state, tile_max, tile_arg, (tile, n_tiles, tiles)
    knobs = (temperature, top_k, top_p, min_p)
    _tile_stats_kernel[(rows, n_tiles)](
        logits, logits.stride(0), vocab, temperature, tile_max, tile_arg, tile_min, tile_count, tile_sum, n_tiles,
        TILE=tile, num_warps=_TILE_WARPS,
    )
    for step in range(ROUNDS + 1):
        if step:
            _round_kernel[(rows, n_tiles)](
                logits, logits.stride(0), vocab, temperature, state, tile_max, *partials, n_tiles,
                TILE=tile, P=PIVOTS, num_warps=_TILE_WARPS,
            )
        _update_kernel[(rows,)](
            state, tile_max, tile_min, tile_count, tile_sum, *partials, logits, logits.stride(0), vocab, *knobs,
            n_tiles, TILE=tile, TILES=tiles, P=PIVOTS, START=step == 0, FINISH=step == ROUNDS,
            num_warps=_ROW_WARPS,
        )
    return state, tile_max, tile_arg, (tile, n_tiles, tiles)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
) -> torch.Tensor:
    """One token per row of ``logits`` ``[rows, vocab]`` (int64, on the logits' device).

    Per-row device tensors: ``temperature`` (float32; 0 means greedy, the row's
    argmax), ``top_k`` (int32/int64; 0 or >= vocab is off), ``top_p`` (float32;
    1 is off), ``min_p`` (float32; 0 is off) and ``seed`` (int64, the row's
    Philox key: equal seed and logits give the same token).
    """
    state, tile_max, tile_arg, (tile, n_tiles, tiles) = _search(logits, temperature, top_k, top_p, min_p)
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        scores = torch.empty(rows, n_tiles, dtype=torch.float32, device=logits.device)
        winners = torch.empty(rows, n_tiles, dtype=torch.int32, device=logits.device)
        _draw_kernel[(rows, n_tiles)](
            logits, logits.stride(0), vocab, temperature, seed, state, tile_max, scores, winners, n_tiles,
            TILE=tile, num_warps=_TILE_WARPS,
        )
        _pick_kernel[(rows,)](
            tokens, temperature, state, tile_max, tile_arg, scores, winners, n_tiles, TILES=tiles,
            num_warps=_ROW_WARPS,
        )
    return tokens


def cutoffs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Each row's threshold: `sample` draws from the tokens with ``logits / temperature >= cutoff``.

    ``-inf`` where nothing is cut (and for greedy rows). The same searches as
    `sample`, without the draw: what tests check the kept sets with.
    """
    state = _search(logits, temperature, top_k, top_p, min_p)[0]
    return state[:, _FLOOR].clone()
