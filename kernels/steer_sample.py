"""Fused "steer, penalise, filter, draw" over the vocabulary, in Triton.

For every row ``b`` of a decoding batch the kernels compute, tile by tile and
never storing the result unless asked,

    z[b, v] = base[b, v] + sum_p alpha_p[b] * (expert_p[r_p(b), v] - anti_p[r_p(b), v])
    z[b, v] = z / penalty[b]  if z >= 0 else z * penalty[b]     (v in the row's tokens)
    s[b, v] = z[b, v] / temperature[b]                           (sampling only)

where ``r_p(b)`` is the packed row of pair ``p`` (``-1``: the pair is off for
the row).  Every filter (top-k, top-p, min-p) keeps the tokens whose score is
above a per-row cut, so the kernels never sort.  The passes over the vocabulary
are, with N = B * V and ``w`` the bytes of one input element:

1. ``_pass_kernel`` (stats): row maximum, argmax, min, sum of exp, and for
   sampling without top-k / top-p the Gumbel-max draw.  Reads base, expert and
   anti-expert: ``N * w * (1 + 2 * pairs)`` bytes (pairs: rows read only where
   routed), writes O(B * chunks).  Greedy and plain sampling stop here.
2. ``_pivot_kernel`` (top-k / top-p only, a few times): for ``NUM_PIVOTS``
   candidate cuts per row, the count, exp-mass and smallest score above each.
   Same bytes read as pass 1.  The bracket around the cut narrows each time.
3. ``_collect_kernel`` (once): writes the few scores left inside the bracket;
   a small sort of those gives the exact cut.  Same bytes read as pass 1.
4. ``_pass_kernel`` (select): Gumbel-max over the kept tokens and their
   exp-mass; writes the processed scores (``B * V * 4`` bytes) only on request.

Random numbers are counter based: a 32-bit hash of (seed, position, token id),
so a row's draw does not depend on its neighbours in the batch or on how the
vocabulary is split across programs.  The vocabulary of each row is split into
chunks, one program each, so that a batch of one still fills the GPU.

This module imports nothing from proxytune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

NUM_PIVOTS = 16  # cuts tried per row in one pivot pass (a power of two)
MAX_PIVOT_PASSES = 4  # pivot passes before the bracket is collected whatever its size
COLLECT_TARGET = 4096  # stop narrowing once no row has more scores in its bracket
PROGRAMS_PER_SM = 4  # chunks per row are chosen to launch about this many programs per SM


@dataclass
class SteerPair:
    """One expert pair's packed logits, as the kernels read them.

    ``expert`` and ``anti`` are ``(R, V_e)`` / ``(R, V_a)`` with unit column
    stride; ``row_map`` is ``(B,)`` int32 (``-1``: not steered); ``alpha`` is
    ``(B,)`` float32.  ``anti`` may be ``None`` (offset ``alpha * expert``).
    """

    expert: torch.Tensor
    anti: torch.Tensor | None
    row_map: torch.Tensor
    alpha: torch.Tensor


# ---------------------------------------------------------------- helpers


@triton.jit
def _mix32(x):
    """Integer avalanche hash of a uint32 tensor (xor-shift / multiply rounds)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _row_key(seed_ptr, position_ptr, row):
    """The row's 32-bit stream key from its int64 seed and int64 position."""
    seed = tl.load(seed_ptr + row)
    position = tl.load(position_ptr + row)
    key = _mix32(seed.to(tl.uint32) ^ 0x9E3779B9)
    key = _mix32(key ^ (seed >> 32).to(tl.uint32))
    return _mix32(key ^ position.to(tl.uint32))


@triton.jit
def _gumbel(row_key, cols):
    """Gumbel(0, 1) noise for token ids ``cols`` in the stream ``row_key``."""
    bits = _mix32(cols.to(tl.uint32) ^ row_key)
    bits = _mix32(bits + row_key)
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(uniform))


@triton.jit
def _steered_scores(
    row, cols, vocab_size,
    base_ptr, base_stride,
    expert1_ptr, anti1_ptr, expert1_stride, anti1_stride, map1_ptr, alpha1_ptr,
    expert2_ptr, anti2_ptr, expert2_stride, anti2_stride, map2_ptr, alpha2_ptr,
    penalty_ptr, seen_ptr, seen_stride, temperature_ptr,
    NUM_PAIRS: tl.constexpr, HAS_ANTI1: tl.constexpr, HAS_ANTI2: tl.constexpr,
    HAS_PENALTY: tl.constexpr, USE_TEMPERATURE: tl.constexpr,
):
    """Scores ``s`` of one tile of columns, float32, ``-inf`` past the vocabulary."""
    in_vocab = cols < vocab_size
    z = tl.load(base_ptr + row * base_stride + cols, mask=in_vocab, other=0.0).to(tl.float32)

    # 1. steering offsets (a pair's rows are read only where it is routed)
    if NUM_PAIRS >= 1:
        packed = tl.load(map1_ptr + row)
        routed = in_vocab & ((cols * 0 + packed) >= 0)  # broadcast before the &
        packed = tl.maximum(packed, 0).to(tl.int64)
        delta = tl.load(expert1_ptr + packed * expert1_stride + cols, mask=routed, other=0.0)
        delta = delta.to(tl.float32)
        if HAS_ANTI1:
            anti = tl.load(anti1_ptr + packed * anti1_stride + cols, mask=routed, other=0.0)
            delta = delta - anti.to(tl.float32)
        z = z + tl.where(routed, tl.load(alpha1_ptr + row) * delta, 0.0)
    if NUM_PAIRS >= 2:
        packed = tl.load(map2_ptr + row)
        routed = in_vocab & ((cols * 0 + packed) >= 0)  # broadcast before the &
        packed = tl.maximum(packed, 0).to(tl.int64)
        delta = tl.load(expert2_ptr + packed * expert2_stride + cols, mask=routed, other=0.0)
        delta = delta.to(tl.float32)
        if HAS_ANTI2:
            anti = tl.load(anti2_ptr + packed * anti2_stride + cols, mask=routed, other=0.0)
            delta = delta - anti.to(tl.float32)
        z = z + tl.where(routed, tl.load(alpha2_ptr + row) * delta, 0.0)
    # expert and anti-expert both -inf gives nan: that token is masked out
    z = tl.where(z == z, z, float("-inf"))

    # 2. repetition penalty on the tokens flagged in the row's bit set
    if HAS_PENALTY:
        word = tl.load(seen_ptr + row * seen_stride + (cols >> 5), mask=in_vocab, other=0)
        seen = ((word >> (cols & 31)) & 1) != 0
        penalty = tl.load(penalty_ptr + row)
        z = tl.where(seen, tl.where(z < 0, z * penalty, z / penalty), z)

    # 3. temperature
    if USE_TEMPERATURE:
        z = z / tl.load(temperature_ptr + row)
    return tl.where(in_vocab, z, float("-inf"))


# ---------------------------------------------------------------- kernels
# NOTE: the three kernels repeat the steering argument list and the call to
# _steered_scores on purpose: a @triton.jit signature cannot be shared or
# unpacked, and these names are what Triton specialises on.


@triton.jit
def _pass_kernel(
    base_ptr, base_stride,
    expert1_ptr, anti1_ptr, expert1_stride, anti1_stride, map1_ptr, alpha1_ptr,
    expert2_ptr, anti2_ptr, expert2_stride, anti2_stride, map2_ptr, alpha2_ptr,
    penalty_ptr, seen_ptr, seen_stride, temperature_ptr,
    seed_ptr, position_ptr, cut_ptr, floor_ptr,
    chunk_max_ptr, chunk_argmax_ptr, chunk_min_ptr, chunk_sum_ptr,
    chunk_key_ptr, chunk_token_ptr, chunk_value_ptr,
    scores_ptr, scores_stride,
    vocab_size, chunk_size, num_chunks,
    NUM_PAIRS: tl.constexpr, HAS_ANTI1: tl.constexpr, HAS_ANTI2: tl.constexpr,
    HAS_PENALTY: tl.constexpr, USE_TEMPERATURE: tl.constexpr, FILTER: tl.constexpr,
    SAMPLE: tl.constexpr, WRITE_SCORES: tl.constexpr, BLOCK: tl.constexpr,
):
    """One (row, chunk): kept = s where ``s > cut and s >= floor`` (all if not FILTER).

    Writes the chunk's max and lowest argmax of kept, min of the finite kept,
    sum of exp(kept - chunk max), and with SAMPLE the Gumbel-max winner (key,
    token id, score).  With WRITE_SCORES stores kept (``-inf`` elsewhere).
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * chunk_size
    if FILTER:
        cut = tl.load(cut_ptr + row)
        floor = tl.load(floor_ptr + row)
    if SAMPLE:
        row_key = _row_key(seed_ptr, position_ptr, row)

    run_max = tl.full([], float("-inf"), tl.float32)
    run_sum = tl.full([], 0.0, tl.float32)
    run_min = tl.full([], float("inf"), tl.float32)
    run_argmax = tl.full([], 0, tl.int32) + start
    best_key = tl.full([], float("-inf"), tl.float32)
    best_token = tl.full([], 0, tl.int32) + start
    best_value = tl.full([], float("-inf"), tl.float32)
    for offset in range(start, start + chunk_size, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        s = _steered_scores(
            row, cols, vocab_size, base_ptr, base_stride,
            expert1_ptr, anti1_ptr, expert1_stride, anti1_stride, map1_ptr, alpha1_ptr,
            expert2_ptr, anti2_ptr, expert2_stride, anti2_stride, map2_ptr, alpha2_ptr,
            penalty_ptr, seen_ptr, seen_stride, temperature_ptr,
            NUM_PAIRS, HAS_ANTI1, HAS_ANTI2, HAS_PENALTY, USE_TEMPERATURE,
        )
        if FILTER:
            s = tl.where((s > cut) & (s >= floor), s, float("-inf"))

        # online max / argmax (lowest id among ties) / sum of exp
        tile_max = tl.max(s, 0)
        tile_argmax = tl.min(tl.where(s == tile_max, cols, 2147483647), 0)
        new_max = tl.maximum(run_max, tile_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(s - shift), 0)
        run_argmax = tl.where(tile_max > run_max, tile_argmax, run_argmax)
        run_max = new_max
        run_min = tl.minimum(run_min, tl.min(tl.where(s > float("-inf"), s, float("inf")), 0))

        if SAMPLE:
            key = tl.where(s > float("-inf"), s + _gumbel(row_key, cols), float("-inf"))
            tile_key = tl.max(key, 0)
            tile_token = tl.min(tl.where(key == tile_key, cols, 2147483647), 0)
            tile_value = tl.max(tl.where(cols == tile_token, s, float("-inf")), 0)
            better = tile_key > best_key
            best_token = tl.where(better, tile_token, best_token)
            best_value = tl.where(better, tile_value, best_value)
            best_key = tl.maximum(best_key, tile_key)
        if WRITE_SCORES:
            tl.store(scores_ptr + row * scores_stride + cols, s, mask=cols < vocab_size)

    out = row * num_chunks + chunk
    tl.store(chunk_max_ptr + out, run_max)
    tl.store(chunk_argmax_ptr + out, run_argmax)
    tl.store(chunk_min_ptr + out, run_min)
    tl.store(chunk_sum_ptr + out, run_sum)
    if SAMPLE:
        tl.store(chunk_key_ptr + out, best_key)
        tl.store(chunk_token_ptr + out, best_token)
        tl.store(chunk_value_ptr + out, best_value)


@triton.jit
def _pivot_kernel(
    base_ptr, base_stride,
    expert1_ptr, anti1_ptr, expert1_stride, anti1_stride, map1_ptr, alpha1_ptr,
    expert2_ptr, anti2_ptr, expert2_stride, anti2_stride, map2_ptr, alpha2_ptr,
    penalty_ptr, seen_ptr, seen_stride, temperature_ptr,
    row_max_ptr, pivots_ptr, count_ptr, mass_ptr, min_above_ptr,
    vocab_size, chunk_size, num_chunks,
    NUM_PAIRS: tl.constexpr, HAS_ANTI1: tl.constexpr, HAS_ANTI2: tl.constexpr,
    HAS_PENALTY: tl.constexpr, USE_TEMPERATURE: tl.constexpr,
    NUM_PIVOTS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One (row, chunk): for each pivot x, count(s > x), sum exp(s - m) over s > x
    and min(s > x), with m the row maximum.  Outputs are (B, chunks, NUM_PIVOTS)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * chunk_size
    pivot_ids = tl.arange(0, NUM_PIVOTS)
    pivots = tl.load(pivots_ptr + row * NUM_PIVOTS + pivot_ids)
    row_max = tl.load(row_max_ptr + row)

    count = tl.zeros([NUM_PIVOTS], tl.int32)
    mass = tl.zeros([NUM_PIVOTS], tl.float32)
    min_above = tl.full([NUM_PIVOTS], float("inf"), tl.float32)
    for offset in range(start, start + chunk_size, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        s = _steered_scores(
            row, cols, vocab_size, base_ptr, base_stride,
            expert1_ptr, anti1_ptr, expert1_stride, anti1_stride, map1_ptr, alpha1_ptr,
            expert2_ptr, anti2_ptr, expert2_stride, anti2_stride, map2_ptr, alpha2_ptr,
            penalty_ptr, seen_ptr, seen_stride, temperature_ptr,
            NUM_PAIRS, HAS_ANTI1, HAS_ANTI2, HAS_PENALTY, USE_TEMPERATURE,
        )
        weight = tl.exp(s - row_max)
        above = s[:, None] > pivots[None, :]  # (BLOCK, NUM_PIVOTS)
        count += tl.sum(above.to(tl.int32), 0)
        mass += tl.sum(tl.where(above, weight[:, None], 0.0), 0)
        min_above = tl.minimum(min_above, tl.min(tl.where(above, s[:, None], float("inf")), 0))

    out = (row * num_chunks + chunk) * NUM_PIVOTS + pivot_ids
    tl.store(count_ptr + out, count)
    tl.store(mass_ptr + out, mass)
    tl.store(min_above_ptr + out, min_above)


@triton.jit
def _collect_kernel(
    base_ptr, base_stride,
    expert1_ptr, anti1_ptr, expert1_stride, anti1_stride, map1_ptr, alpha1_ptr,
    expert2_ptr, anti2_ptr, expert2_stride, anti2_stride, map2_ptr, alpha2_ptr,
    penalty_ptr, seen_ptr, seen_stride, temperature_ptr,
    low_ptr, high_ptr, write_start_ptr, out_ptr, out_width,
    vocab_size, chunk_size, num_chunks,
    NUM_PAIRS: tl.constexpr, HAS_ANTI1: tl.constexpr, HAS_ANTI2: tl.constexpr,
    HAS_PENALTY: tl.constexpr, USE_TEMPERATURE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One (row, chunk): stores the scores in ``(low, high]`` at consecutive slots
    of ``out[row]``, from the chunk's precomputed ``write_start`` on."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * chunk_size
    low = tl.load(low_ptr + row)
    high = tl.load(high_ptr + row)
    slot = tl.load(write_start_ptr + row * num_chunks + chunk)
    for offset in range(start, start + chunk_size, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        s = _steered_scores(
            row, cols, vocab_size, base_ptr, base_stride,
            expert1_ptr, anti1_ptr, expert1_stride, anti1_stride, map1_ptr, alpha1_ptr,
            expert2_ptr, anti2_ptr, expert2_stride, anti2_stride, map2_ptr, alpha2_ptr,
            penalty_ptr, seen_ptr, seen_stride, temperature_ptr,
            NUM_PAIRS, HAS_ANTI1, HAS_ANTI2, HAS_PENALTY, USE_TEMPERATURE,
        )
        inside = (s > low) & (s <= high)
        slots = slot + tl.cumsum(inside.to(tl.int32), 0) - 1
        tl.store(out_ptr + row * out_width + slots, s, mask=inside & (slots < out_width))
        slot += tl.sum(inside.to(tl.int32), 0)


# ---------------------------------------------------------------- launcher


def _row_tensor(value, batch, dtype, device, name):
    """A scalar or (B,) knob as a contiguous (B,) tensor of ``dtype``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name} must be a number or a ({batch},) tensor, "
                             f"got shape {tuple(value.shape)}.")
        return value.to(device=device, dtype=dtype).contiguous()
    return torch.full((batch,), value, dtype=dtype, device=device)


def _seen_bits(prev_tokens, vocab_size):
    """(B, T) token ids -> (B, ceil(V / 32)) int32 bit set of the ids in [0, V).

    Ids outside [0, V) (padding such as -1) are ignored.
    """
    batch = prev_tokens.shape[0]
    num_words = (vocab_size + 31) // 32
    valid = (prev_tokens >= 0) & (prev_tokens < vocab_size)
    ids = torch.where(valid, prev_tokens, vocab_size).sort(dim=1).values
    first = torch.ones_like(valid)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    bits = torch.where(first & (ids < vocab_size), 1 << (ids & 31), 0)
    words = torch.zeros(batch, num_words + 1, dtype=torch.int64, device=ids.device)
    words.scatter_add_(1, ids >> 5, bits)
    words = words[:, :num_words]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _chunking(batch, vocab_size, device, block, chunk_size):
    """(chunk size, number of chunks): enough programs to fill the device."""
    if chunk_size is None:
        num_sm = 1
        if device.type == "cuda":
            num_sm = torch.cuda.get_device_properties(device).multi_processor_count
        tiles = triton.cdiv(vocab_size, block)
        wanted_chunks = max(1, min(tiles, triton.cdiv(PROGRAMS_PER_SM * num_sm, batch)))
        chunk_size = triton.cdiv(tiles, wanted_chunks) * block
    if chunk_size % block:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of block {block}.")
    return chunk_size, triton.cdiv(vocab_size, chunk_size)


class _Launch:
    """The kernels' shared arguments for one call, and the grid."""

    def __init__(self, base, vocab_size, pairs, penalty, seen, temperature, block, chunk_size):
        if len(pairs) > 2:
            raise ValueError("The kernels fuse at most 2 pairs; fold the others into base.")
        self.batch = base.shape[0]
        self.vocab_size = vocab_size
        self.block = block
        self.chunk_size, self.num_chunks = _chunking(
            self.batch, vocab_size, base.device, block, chunk_size)
        pair_args = []
        for index in range(2):
            if index < len(pairs):
                pair = pairs[index]
                anti = pair.anti if pair.anti is not None else pair.expert
                pair_args += [pair.expert, anti, pair.expert.stride(0), anti.stride(0),
                              pair.row_map, pair.alpha]
            else:
                pair_args += [base, base, 0, 0, base, base]
        self.common = [base, base.stride(0), *pair_args,
                       penalty if penalty is not None else base,
                       seen if seen is not None else base,
                       seen.stride(0) if seen is not None else 0,
                       temperature if temperature is not None else base]
        self.flags = dict(
            NUM_PAIRS=len(pairs),
            HAS_ANTI1=len(pairs) >= 1 and pairs[0].anti is not None,
            HAS_ANTI2=len(pairs) >= 2 and pairs[1].anti is not None,
            HAS_PENALTY=seen is not None, USE_TEMPERATURE=temperature is not None,
        )
        self.grid = (self.batch, self.num_chunks)
        # the pivot tile holds BLOCK x NUM_PIVOTS comparisons: narrower on the GPU
        self.pivot_block = max(16, block // 4) if base.device.type == "cuda" else block
        self.device = base.device

    def empty(self, *shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=self.device)

    def run_pass(self, cut=None, floor=None, seeds=None, positions=None, scores=None):
        """Pass kernel, then its per-chunk results combined per row.

        Returns a dict of (B,) tensors: max, argmax, min, sum (of exp(s - max)),
        and with ``seeds`` the Gumbel winner's token and score.
        """
        shape = (self.batch, self.num_chunks)
        chunk = {name: self.empty(*shape) for name in ("max", "min", "sum", "key", "value")}
        chunk["argmax"] = self.empty(*shape, dtype=torch.int32)
        chunk["token"] = self.empty(*shape, dtype=torch.int32)
        sample = seeds is not None
        dummy = chunk["max"]
        _pass_kernel[self.grid](
            *self.common,
            seeds if sample else dummy, positions if sample else dummy,
            cut if cut is not None else dummy, floor if floor is not None else dummy,
            chunk["max"], chunk["argmax"], chunk["min"], chunk["sum"],
            chunk["key"], chunk["token"], chunk["value"],
            scores if scores is not None else dummy,
            scores.stride(0) if scores is not None else 0,
            self.vocab_size, self.chunk_size, self.num_chunks,
            FILTER=cut is not None, SAMPLE=sample, WRITE_SCORES=scores is not None,
            BLOCK=self.block, **self.flags,
        )
        row_max, best_chunk = chunk["max"].max(dim=1)  # first chunk among ties
        shift = torch.where(torch.isinf(row_max), 0.0, row_max)
        row = {
            "max": row_max,
            "argmax": chunk["argmax"].gather(1, best_chunk[:, None])[:, 0].long(),
            "min": chunk["min"].amin(dim=1),
            "sum": (chunk["sum"] * torch.exp(chunk["max"] - shift[:, None])).sum(dim=1),
        }
        if sample:
            winner = chunk["key"].argmax(dim=1, keepdim=True)
            row["token"] = chunk["token"].gather(1, winner)[:, 0].long()
            row["value"] = chunk["value"].gather(1, winner)[:, 0]
        return row

    def run_pivots(self, row_max, pivots):
        """(B, P) pivots -> per-chunk count, mass and min above, each (B, C, P)."""
        shape = (self.batch, self.num_chunks, NUM_PIVOTS)
        count = self.empty(*shape, dtype=torch.int32)
        mass, min_above = self.empty(*shape), self.empty(*shape)
        _pivot_kernel[self.grid](
            *self.common, row_max, pivots.contiguous(), count, mass, min_above,
            self.vocab_size, self.chunk_size, self.num_chunks,
            NUM_PIVOTS=NUM_PIVOTS, BLOCK=self.pivot_block, **self.flags,
        )
        return count, mass, min_above

    def run_collect(self, low, high, chunk_counts):
        """Scores in (low, high] per row, packed left, ``-inf`` padded: (B, W)."""
        width = max(1, int(chunk_counts.sum(dim=1).max()))
        write_start = (chunk_counts.cumsum(dim=1) - chunk_counts).to(torch.int32).contiguous()
        out = torch.full((self.batch, width), float("-inf"), device=self.device)
        _collect_kernel[self.grid](
            *self.common, low.contiguous(), high.contiguous(), write_start, out, width,
            self.vocab_size, self.chunk_size, self.num_chunks,
            BLOCK=self.block, **self.flags,
        )
        return out


def _first_true(flags):
    """Index of the first column from which ``flags`` (B, P) stays True; P if none."""
    suffix_true = flags.flip(1).int().cummin(dim=1).values.flip(1)
    return flags.shape[1] - suffix_true.sum(dim=1)


def _pivot_grid(low, start, high):
    """(B, P) ascending cuts: low, then P - 1 evenly spaced from start to high."""
    steps = torch.linspace(0.0, 1.0, NUM_PIVOTS - 1, device=low.device)
    spread = start[:, None] + (high - start)[:, None] * steps[None, :]
    spread[:, -1] = high
    return torch.cat([low[:, None], spread], dim=1)


def _exact_cut(candidates, low, row_max, count_above, mass_above, keeps):
    """The exact cut from the bracket's scores (B, W), sorted here.

    ``count_above`` / ``mass_above`` hold the count and exp-mass of scores above
    the bracket.  Returns (cut, mass of scores > cut): the row keeps s > cut.
    """
    ordered = candidates.sort(dim=1, descending=True).values
    weight = torch.exp(ordered - row_max[:, None])
    inclusive = weight.cumsum(dim=1)
    index = torch.arange(ordered.shape[1], device=ordered.device).expand_as(ordered)
    group_start = torch.ones_like(ordered, dtype=torch.bool)
    group_start[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first_of_tie = torch.where(group_start, index, 0).cummax(dim=1).values
    strictly_above = (inclusive - weight).gather(1, first_of_tie)
    ok = keeps(count_above[:, None] + first_of_tie, mass_above[:, None] + strictly_above)
    ok = ok & (ordered > float("-inf"))
    num_kept = ok.int().cummin(dim=1).values.sum(dim=1)
    num_valid = (ordered > float("-inf")).sum(dim=1)
    take = num_kept.clamp(max=ordered.shape[1] - 1)[:, None]
    all_kept = num_kept >= num_valid
    cut = torch.where(all_kept, low, ordered.gather(1, take)[:, 0])
    total = mass_above + inclusive[:, -1]  # the -inf padding weighs 0
    cut_mass = torch.where(all_kept, total, mass_above + strictly_above.gather(1, take)[:, 0])
    return cut, cut_mass


def _search_cut(launch, row_max, low, mass_above_low, active, keeps):
    """Smallest cut ``c >= low`` such that the row keeps exactly ``s > c``.

    ``keeps(count_gt, mass_gt)`` says whether a score with that many (and that
    exp-mass of) strictly higher scores is kept; it must be monotone.  Rows not
    ``active`` keep everything above ``low``.  Returns (cut, mass of s > cut).
    """
    high = torch.where(active, row_max, low)
    start = low.clone()
    cut, cut_mass = low.clone(), mass_above_low.clone()
    count_high = torch.zeros_like(low, dtype=torch.int64)
    mass_high = torch.zeros_like(low)
    chunk_counts = torch.zeros(low.shape[0], launch.num_chunks, dtype=torch.int64,
                               device=low.device)
    open_rows = active.clone()
    for _ in range(MAX_PIVOT_PASSES):
        pivots = _pivot_grid(low, start, high)
        count_c, mass_c, min_above_c = launch.run_pivots(row_max, pivots)
        count, mass = count_c.sum(dim=1).long(), mass_c.sum(dim=1)
        min_above = min_above_c.amin(dim=1)

        # the bracket becomes (pivot j - 1, pivot j] with j the first kept pivot
        j = _first_true(keeps(count, mass))
        lower = (j - 1).clamp(min=0)[:, None]
        upper = j.clamp(max=NUM_PIVOTS - 1)[:, None]
        new_low, new_high = pivots.gather(1, lower)[:, 0], pivots.gather(1, upper)[:, 0]
        counts_inside = count_c.gather(2, lower[:, None].expand(-1, launch.num_chunks, 1))
        counts_inside = counts_inside - count_c.gather(
            2, upper[:, None].expand(-1, launch.num_chunks, 1))
        smallest_inside = min_above.gather(1, lower)[:, 0]

        # a row is settled when nothing, or one tied group at the top, is inside
        settled = (j == 0) | (counts_inside.sum(dim=(1, 2)) == 0) | (smallest_inside >= new_high)
        settle = open_rows & settled
        cut = torch.where(settle, new_low, cut)
        cut_mass = torch.where(settle, mass.gather(1, lower)[:, 0], cut_mass)
        narrow = open_rows & ~settled
        low = torch.where(narrow, new_low, low)
        high = torch.where(narrow, new_high, torch.where(settle, low, high))
        start = torch.where(narrow, smallest_inside, start)
        count_high = torch.where(narrow, count.gather(1, upper)[:, 0], count_high)
        mass_high = torch.where(narrow, mass.gather(1, upper)[:, 0], mass_high)
        chunk_counts = torch.where(narrow[:, None], counts_inside[:, :, 0].long(), 0)
        open_rows = narrow
        # NOTE: one host synchronisation per pass, to stop once the brackets are small
        if int(chunk_counts.sum(dim=1).max()) <= COLLECT_TARGET:
            break

    if bool(open_rows.any()):
        inside = launch.run_collect(torch.where(open_rows, low, high), high, chunk_counts)
        exact, exact_mass = _exact_cut(inside, low, row_max, count_high, mass_high, keeps)
        cut = torch.where(open_rows, exact, cut)
        cut_mass = torch.where(open_rows, exact_mass, cut_mass)
    return cut, cut_mass


def sample_next_tokens(
    base, vocab_size, pairs, *, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
    min_p=0.0, repetition_penalty=1.0, seeds=0, positions=None, prev_tokens=None,
    return_logprobs=False, return_scores=False, block=1024, chunk_size=None,
):
    """Steer, penalise, filter and pick the next token of every row.

    Parameters
    ----------
    base : (B, V_b) float32 / bfloat16 / float16, unit column stride; V_b >= vocab_size.
    pairs : up to two :class:`SteerPair` (packed expert rows and their row map).
    temperature, top_k, top_p, min_p, repetition_penalty, seeds : a number or (B,).
    positions : (B,) int64, the row's count of tokens so far (keys the random stream).
    prev_tokens : (B, T) int64 or None; ids outside [0, vocab_size) are ignored.
    block, chunk_size : tile width and columns per program (tests shrink them).

    Returns ``(tokens (B,) int64, logprobs (B,) float32 or None, scores
    (B, vocab_size) float32 or None)``.  Inputs are not modified.  Greedy
    (``do_sample=False``) ignores temperature and the filters.
    """
    batch, device = base.shape[0], base.device
    knob = lambda value, dtype, name: _row_tensor(value, batch, dtype, device, name)
    penalty = seen = None
    no_penalty = not isinstance(repetition_penalty, torch.Tensor) and repetition_penalty == 1.0
    if prev_tokens is not None and not no_penalty:
        penalty = knob(repetition_penalty, torch.float32, "repetition_penalty")
        seen = _seen_bits(prev_tokens.to(device), vocab_size)
    temperatures = knob(temperature, torch.float32, "temperature") if do_sample else None
    launch = _Launch(base, vocab_size, pairs, penalty, seen, temperatures, block, chunk_size)
    scores = launch.empty(batch, vocab_size) if return_scores else None

    if not do_sample:
        stats = launch.run_pass(scores=scores)
        tokens = stats["argmax"]
        logprobs = -torch.log(stats["sum"]) if return_logprobs else None
        return tokens, logprobs, scores

    seed_row = knob(seeds, torch.int64, "seed")
    position_row = knob(0 if positions is None else positions, torch.int64, "positions")
    top_k_row = knob(top_k, torch.int64, "top_k")
    top_p_row = knob(top_p, torch.float32, "top_p")
    min_p_row = knob(min_p, torch.float32, "min_p")
    use_top_k = (top_k_row > 0) & (top_k_row < vocab_size)
    use_top_p = top_p_row < 1.0
    # NOTE: one host synchronisation to skip the cut searches that no row needs
    any_top_k, any_top_p, uses_min_p = torch.stack(
        [use_top_k.any(), use_top_p.any(), (min_p_row > 0).any()]).tolist()
    searching = any_top_k or any_top_p

    if not searching and not uses_min_p and scores is None:
        stats = launch.run_pass(seeds=seed_row, positions=position_row)
        logprobs = stats["value"] - stats["max"] - torch.log(stats["sum"])
        return stats["token"], logprobs if return_logprobs else None, None

    stats = launch.run_pass()
    row_max, total_mass = stats["max"], stats["sum"]
    cut = torch.nextafter(stats["min"], torch.full_like(row_max, float("-inf")))
    cut_mass = total_mass
    if any_top_k:
        cut, cut_mass = _search_cut(
            launch, row_max, cut, cut_mass, use_top_k,
            lambda count_gt, mass_gt: count_gt < top_k_row[:, None])
    if any_top_p:
        top_k_mass = cut_mass
        cut, cut_mass = _search_cut(
            launch, row_max, cut, cut_mass, use_top_p,
            lambda count_gt, mass_gt: (mass_gt < top_p_row[:, None] * top_k_mass[:, None])
            | (count_gt == 0))
    floor = row_max + torch.log(min_p_row)  # min-p: p >= min_p * p_max in log space
    picked = launch.run_pass(cut=cut, floor=floor, seeds=seed_row, positions=position_row,
                             scores=scores)
    logprobs = None
    if return_logprobs:
        logprobs = picked["value"] - picked["max"] - torch.log(picked["sum"])
    return picked["token"], logprobs, scores


def default_block(device: torch.device) -> int:
    """Tile width: wide tiles on the GPU, smaller ones for the CPU interpreter."""
    return 1024 if device.type == "cuda" else 512


__all__ = ["SteerPair", "sample_next_tokens", "default_block", "NUM_PIVOTS"]
