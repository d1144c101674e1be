"""Per-input-channel activation statistics of a Linear: running absmax, a tail percentile,
and the ADAPTIVE_PERCENTILES tails (p99, p99.9, p99.99) a per-layer "adaptive" statistic
chooses among. All of a call's order statistics (the max and the two neighbours of
each percentile) come out of one selection per channel chunk, so each is exact in
the sense below.

The tail statistic is the q-th percentile (default 99.9) of |x[:, c]| over the tokens
of one forward call (tokens = all leading dims flattened), with numpy's default
'linear' interpolation (torch.quantile's definition), aggregated over calls by max. Per call it
is exact: the two order statistics come out of the tensor's own dtype (|x| is exact
in every float format) and the interpolation runs in float64 with numpy's own
formula, so the result equals numpy.percentile(|x| in float64) rounded to float32.
Note the aggregation makes the tail depend on how tokens are batched into calls
(cond and uncond batched together form one call).

Two selections, chosen by dtype and token count only (never by values):
* Histogram (bf16/fp16 calls of at least HISTOGRAM_MIN_TOKENS tokens on an
  accelerator, i.e. video calls): |x| of a 16-bit float is its bit pattern with the sign cleared, and that
  15-bit integer orders like the value. One pass over the data counts each
  channel's patterns into 2^15 bins (`index_add_`, no sort, no top-k); then the
  bins are resolved in two steps on the small histogram alone: 256 coarse bins
  (the high 8 bits) say which bucket holds each wanted rank, and that bucket's 128
  fine bins say which pattern. Every rank of a call costs the same one pass.
* Top-k (on the CPU, where it measured faster at every size (3.5-4.1 ns per value
  against 4.3-7.6 for the histogram, 16k-98k tokens, one thread); fp32/fp64/fp8
  inputs; and shorter calls such as the text context, where 2^15 bins per channel
  would outnumber the tokens): the k = n - floor((n-1) q/100)
  largest values per channel (k = 6 for 4096 tokens). Tokens are cut into blocks
  of s; the k blocks with the largest maxima contain the k largest values (proof in
  `_top_values`), so the exact top-k is taken over k*s candidates. fp32 keeps this
  path: a 32-bit pattern needs a second full pass per wanted bucket, and a two-level
  (15 + 16 bit) radix prototype measured 13x (65,520 tokens) to 370x (1,152 tokens,
  the demo's calls) slower than this path on the CPU. Models calibrated at scale
  run in bf16/fp16.
hifloat4.calibration_check times both selections on one ffn.2-sized chunk.

Why the code looks the way it does:
* Memory: an ffn.2 input at 720p/81 frames is ~75k tokens x 13824 channels. The
  input is read in channel chunks of about CHUNK_ELEMENTS values (a histogram bin
  counts as a value); only one chunk's temporaries (|x| or its bin indices, and the
  histogram) exist at a time, never an fp32 copy of the activation.
* No host sync: every decision (ranks, interpolation weight, chunking, which
  selection path) depends only on shapes, dtypes and the percentiles, never on
  tensor values, so on CUDA an update is a queue of kernels. Accumulators are fp32
  on x.device.
* Non-finite values (NaN, +-Inf, i.e. a bf16/fp16 overflow upstream) count as 0 for
  both statistics. Excluding them would make the rank per channel data-dependent
  (a host sync and ragged selection); 0 keeps the rank fixed, cannot inflate either
  statistic (a single overflowed token cannot push a mask to its clamp), and shifts
  the percentile's rank by at most the number of bad values in the channel. So that it is not silent,
  `ChannelStats.nonfinite` counts per channel the calls that contained any.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Values (or histogram bins) materialized per channel chunk: cache-sized on CPU; on
# accelerators large enough that kernel launches stay few (64 MiB of bf16).
CHUNK_ELEMENTS = {"cpu": 1 << 22, "other": 1 << 25}
_NATIVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_MIN_BLOCK, _MAX_BLOCK = 4, 256
# Histogram selection: bf16/fp16 calls with at least this many tokens (below it the
# 2^15 bins per channel outnumber the tokens more than 2:1 and k is small); never on
# the CPU (None), where the top-k measured faster. The bit pattern of +Inf: |x|
# patterns at or above it are Inf/NaN.
HISTOGRAM_MIN_TOKENS: dict[str, int | None] = {"cpu": None, "other": 16384}
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
_BINS, _FINE = 1 << 15, 1 << 7  # 15-bit |x| patterns; the low 7 bits resolve a coarse bucket
# The tails an "adaptive" statistic chooses among per layer (with the max); recorded
# by every ChannelStats. hifloat4.state re-exports it with the names of the choices.
ADAPTIVE_PERCENTILES: tuple[float, ...] = (99.0, 99.9, 99.99)


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has none: there float32, off by <= 1 ulp)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True)
class _Ranks:
    """Where the q-th percentile of n sorted values lies: numpy's 'linear' method."""

    lo: int  # ascending index of the lower neighbour
    hi: int  # ascending index of the upper neighbour (== lo at the top)
    t: float  # interpolation weight in [0, 1)

    @staticmethod
    def of(n: int, q: float) -> "_Ranks":
        virtual = (n - 1) * (q / 100.0)  # same float64 ops as numpy
        if virtual >= n - 1:
            return _Ranks(n - 1, n - 1, 0.0)
        lo = math.floor(virtual)
        return _Ranks(lo, lo + 1, virtual - lo)


def _lerp_numpy(a: Tensor, b: Tensor, t: float, dtype: torch.dtype) -> Tensor:
    """numpy's _lerp, operation for operation (it switches formula at t = 0.5)."""
    a, b = a.to(dtype), b.to(dtype)
    diff = b - a
    if t >= 0.5:
        return b - diff * (1.0 - t)
    return a + diff * t


def _check_percentile(q: float) -> float:
    q = float(q)
    if not (0.0 <= q <= 100.0):  # also rejects NaN
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    return q


def _as_tokens(x: Tensor, channels: int | None = None) -> tuple[int, int]:
    """(tokens, channels) of x[..., C], validating dtype and channel count."""
    if x.dim() == 0:
        raise ValueError("x must have a channel dimension, got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    c = x.shape[-1]
    if channels is not None and c != channels:
        raise ValueError(f"x has {c} channels (last dim, shape {tuple(x.shape)}), expected {channels}")
    return x.numel() // c if c else 0, c


def _block_size(n: int, k: int) -> int:
    """Block length s for the block-max prefilter, or 0 when a plain top-k is as good.

    Cost ~ n/s (block maxima) + k*s (candidates): minimal near s = sqrt(n/k); a power
    of two at or below it measured best.
    """
    s = 1 << max(0, int(math.log2(math.sqrt(n / k))))
    s = min(max(s, _MIN_BLOCK), _MAX_BLOCK)
    return s if -(-n // s) >= 4 * k else 0


def _uses_histogram(n: int, dtype: torch.dtype, device: torch.device) -> bool:
    least = HISTOGRAM_MIN_TOKENS["cpu" if device.type == "cpu" else "other"]
    return dtype in _INF_BITS and least is not None and n >= least


def _abs_chunk(xs: Tensor, rows: int) -> Tensor:
    """|xs| as a (rows, w) buffer in a selectable dtype; rows beyond xs are zero."""
    n, w = xs.shape
    dtype = xs.dtype if xs.dtype in _NATIVE_DTYPES else torch.float32  # e.g. fp8: upcast the chunk
    buf = torch.empty((rows, w), dtype=dtype, device=xs.device)
    if dtype == xs.dtype:
        torch.abs(xs, out=buf[:n])
    else:
        buf[:n].copy_(xs).abs_()
    buf[n:].zero_()
    return buf


def _top_values(buf: Tensor, n: int, k: int, s: int) -> tuple[Tensor, Tensor]:
    """The k largest of buf[:n] per column, descending (k, w), and the any-non-finite flag.

    Non-finite entries of buf are zeroed in place first. With s > 0, buf has
    ceil(n/s)*s zero-padded rows. Exactness of the block prefilter: let M be the k-th
    largest block maximum and v the k-th largest value (v >= M, since k blocks hold a
    value >= M). Every value > v lies in a block whose max exceeds M, and all such
    blocks are among the chosen k; if v == M, each of the k chosen blocks holds a
    value >= v. Either way the candidates contain every value > v and at least k
    values >= v, so their top k equals the true top k. Zero padding cannot change the
    top k of non-negative values when k <= n.
    """
    w = buf.shape[1]
    if s == 0:
        bad = ~torch.isfinite(buf[:n].amax(dim=0))
        buf.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return buf[:n].topk(k, dim=0).values, bad
    blocks = buf.view(-1, s, w)
    bad = ~torch.isfinite(blocks.amax(dim=1)).all(dim=0)  # amax propagates NaN
    buf.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    chosen = blocks.amax(dim=1).topk(k, dim=0, sorted=False).indices  # (k, w)
    candidates = blocks.gather(0, chosen.unsqueeze(1).expand(k, s, w)).view(k * s, w)
    return candidates.topk(k, dim=0).values, bad


def _from_top(rank: int, n: int) -> bool:
    """Whether ascending rank `rank` of n is cheaper to select from the top than the bottom."""
    return n - rank <= rank + 1


def _topk_select(xs: Tensor, ranks: list[int]) -> tuple[Tensor, Tensor]:
    """The order statistics at ascending `ranks` (sorted, containing n - 1) of |xs| per
    column, (len(ranks), w), and the any-non-finite flag: ONE top-k selection for the high
    ranks (k for the lowest of them: the higher ones are among the same sorted values)
    and, rarely, one bottom-k selection for low ones."""
    n = xs.shape[0]
    top = [r for r in ranks if _from_top(r, n)]
    bottom = [r for r in ranks if not _from_top(r, n)]
    k = n - top[0]
    s = _block_size(n, k)
    buf = _abs_chunk(xs, -(-n // s) * s if s else n)
    descending, bad = _top_values(buf, n, k, s)  # descending[j] = ascending rank n-1-j
    rows = [descending[n - 1 - r] for r in top]
    if bottom:
        ascending = buf[:n].topk(bottom[-1] + 1, dim=0, largest=False).values
        rows = [ascending[r] for r in bottom] + rows
    return torch.stack(rows), bad


@functools.lru_cache(maxsize=64)
def _device_ints(values: tuple[int, ...], device: torch.device) -> Tensor:
    """values as an int32 tensor on `device`, written by fills: a host-to-device copy from
    pageable memory may make the driver wait for the device. Cached: a calibration
    sees a handful of call shapes."""
    out = torch.empty(len(values), dtype=torch.int32, device=device)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _histogram_select(xs: Tensor, ranks: list[int]) -> tuple[Tensor, Tensor]:
    """_topk_select's result for bf16/fp16 columns, from a histogram of |x| bit patterns.

    Non-finite values count as pattern 0 (the value 0, the smallest |x|): their count is
    moved into bin 0. For each rank, the coarse bucket holding it is the number of
    buckets whose cumulative count does not exceed it; within that bucket the same
    count over its 128 fine bins gives the low 7 bits. Ranks are the same for every
    column, so this is a fixed sequence of tensor ops: no host sync.
    """
    n, w = xs.shape
    device = xs.device
    bits = torch.bitwise_and(xs.view(torch.int16), 0x7FFF)  # |x| as a monotone 15-bit integer
    index = torch.add(bits, torch.arange(0, w * _BINS, _BINS, dtype=torch.int32, device=device))
    del bits
    hist = torch.zeros(w * _BINS, dtype=torch.int32, device=device)
    hist.index_add_(0, index.reshape(-1), torch.ones(1, dtype=torch.int32, device=device).expand(n * w))
    del index
    hist = hist.view(w, _BINS // _FINE, _FINE)
    coarse = hist.sum(dim=2, dtype=torch.int32)  # (w, 256)
    inf_bucket = _INF_BITS[xs.dtype] // _FINE  # Inf's low 7 bits are 0: whole buckets are non-finite
    bad = coarse[:, inf_bucket:].sum(dim=1, dtype=torch.int32)
    hist[:, 0, 0] += bad
    coarse[:, 0] += bad
    cumulative = coarse[:, :inf_bucket].cumsum(dim=1, dtype=torch.int32)  # (w, buckets) values <= bucket
    wanted = _device_ints(tuple(ranks), device)
    bucket = (cumulative.unsqueeze(1) <= wanted.view(1, -1, 1)).sum(dim=2)  # (w, R)
    below = cumulative.gather(1, (bucket - 1).clamp_min(0)).masked_fill_(bucket == 0, 0)
    fine = hist.gather(1, bucket.unsqueeze(2).expand(w, len(ranks), _FINE))  # (w, R, 128)
    low = (fine.cumsum(dim=2, dtype=torch.int32) <= (wanted - below).unsqueeze(2)).sum(dim=2)
    patterns = (bucket * _FINE + low).t().to(torch.int16)
    return patterns.view(xs.dtype), bad > 0


@dataclass
class _Chunk:
    absmax: Tensor  # (w,) fp32
    tails: Tensor | None  # (len(qs), w) fp32, one row per percentile; None when only absmax was asked for
    nonfinite: Tensor  # (w,) bool: any NaN/Inf in this call


def _order_ranks(n: int, qs: tuple[float, ...]) -> list[int]:
    """The ascending ranks (sorted, distinct) that absmax and the percentiles qs of n values need."""
    per_q = [_Ranks.of(n, q) for q in qs]
    return sorted({n - 1, *(r.lo for r in per_q), *(r.hi for r in per_q)})


def _chunk_stats(xs: Tensor, qs: tuple[float, ...]) -> _Chunk:
    """Statistics of one (n, w) channel chunk with n >= 1: absmax and the percentiles qs,
    every order statistic they need out of one selection."""
    n, _ = xs.shape
    per_q = [_Ranks.of(n, q) for q in qs]
    ranks = _order_ranks(n, qs)
    row = {r: i for i, r in enumerate(ranks)}
    select = _histogram_select if _uses_histogram(n, xs.dtype, xs.device) else _topk_select
    values, bad = select(xs, ranks)
    absmax = values[row[n - 1]].float()
    if not qs:
        return _Chunk(absmax, None, bad)
    wide = wide_dtype(xs.device)
    tails = [_lerp_numpy(values[row[r.lo]], values[row[r.hi]], r.t, wide).float() for r in per_q]
    return _Chunk(absmax, torch.stack(tails), bad)


def _chunk_width(n: int, histogram: bool, device: torch.device) -> int:
    """Channels per chunk of an n-token call: CHUNK_ELEMENTS values (or histogram bins)."""
    budget = CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "other"]
    return max(1, budget // (max(n, _BINS) if histogram else max(n, 1)))


def _auto_chunk(n: int, dtype: torch.dtype, device: torch.device) -> int:
    return _chunk_width(n, _uses_histogram(n, dtype, device), device)


def _scan(x: Tensor, qs: tuple[float, ...], channel_chunk: int | None):
    """Yield (c0, c1, _Chunk) over channel chunks of x[..., C] (n >= 1 tokens)."""
    n, c = _as_tokens(x)
    step = channel_chunk or _auto_chunk(n, x.dtype, x.device)
    if step < 1:
        raise ValueError(f"channel_chunk must be >= 1, got {channel_chunk}")
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        yield c0, c1, _chunk_stats(x[..., c0:c1].reshape(n, c1 - c0), qs)


def _gather(x: Tensor, qs: tuple[float, ...], channel_chunk: int | None) -> Tensor:
    """The percentiles qs of |x| per channel as (len(qs), C) fp32, or absmax as (C,) when qs is empty."""
    n, c = _as_tokens(x)
    if n == 0:
        raise ValueError(f"x has no tokens (shape {tuple(x.shape)}): statistics are undefined")
    out = torch.empty((len(qs), c) if qs else (c,), dtype=torch.float32, device=x.device)
    for c0, c1, chunk in _scan(x, qs, channel_chunk):
        out[..., c0:c1] = chunk.tails if qs else chunk.absmax
    return out


def channel_absmax(x: Tensor, channel_chunk: int | None = None) -> Tensor:
    """max over tokens of |x[..., c]| as (C,) fp32 (non-finite values count as 0)."""
    return _gather(x, (), channel_chunk)


def channel_percentile(x: Tensor, q: float, channel_chunk: int | None = None) -> Tensor:
    """q-th percentile over tokens of |x[..., c]| as (C,) fp32, numpy 'linear' method.

    Equals numpy.percentile(abs(x as float64), q, axis=0).astype(float32) after
    flattening leading dims, with non-finite values counted as 0.
    """
    return _gather(x, (_check_percentile(q),), channel_chunk)[0]


@dataclass(frozen=True)
class CallStats:
    """One forward call's statistics of x[..., C]: what ChannelStats folds in. Computed
    once per distinct input and shared by every layer reading it (hifloat4.calibrate)."""

    percentiles: tuple[float, ...]  # the rows of `tails`
    absmax: Tensor  # (C,) fp32
    tails: Tensor  # (len(percentiles), C) fp32
    nonfinite: Tensor  # (C,) bool: any NaN/Inf in this call
    tokens: int


def call_stats(x: Tensor, percentiles: tuple[float, ...], channel_chunk: int | None = None) -> CallStats | None:
    """CallStats of one call's input x[..., C] at `percentiles`; None when x has no tokens."""
    x = x.detach()  # statistics are not differentiable; inputs may come from a graph
    n, c = _as_tokens(x)
    if n == 0:
        return None
    absmax = torch.empty(c, dtype=torch.float32, device=x.device)
    tails = torch.empty((len(percentiles), c), dtype=torch.float32, device=x.device)
    nonfinite = torch.empty(c, dtype=torch.bool, device=x.device)
    for c0, c1, chunk in _scan(x, percentiles, channel_chunk):
        absmax[c0:c1] = chunk.absmax
        tails[:, c0:c1] = chunk.tails
        nonfinite[c0:c1] = chunk.nonfinite
    return CallStats(percentiles, absmax, tails, nonfinite, n)


class ChannelStats:
    """Running statistics of one Linear's input: absmax, tail and the
    ADAPTIVE_PERCENTILES tails, each max over calls.

    `update` queues device work only (no host sync); the accumulators live on the
    device of the inputs (they move there if an input arrives elsewhere). Read
    `absmax`, `tail` (fp32, (channels,)), `tails` (fp32, (3, channels): |x| at
    ADAPTIVE_PERCENTILES, the statistics a per-layer "adaptive" choice picks from),
    `nonfinite` (int64: calls per channel that contained NaN/Inf), `calls` and
    `tokens` (host ints; calls without tokens are not counted). One selection per
    channel chunk serves the tail and the three tails together. `update` is
    `fold(measure(x))`; hifloat4.calibrate calls the two apart to measure an input
    that several layers read only once.
    """

    def __init__(
        self,
        channels: int,
        percentile: float = 99.9,
        device: torch.device | str | None = None,
        channel_chunk: int | None = None,
    ) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if channel_chunk is not None and channel_chunk < 1:
            raise ValueError(f"channel_chunk must be >= 1 or None (auto), got {channel_chunk}")
        self.channels = channels
        self.percentile = _check_percentile(percentile)
        self.channel_chunk = channel_chunk
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.absmax = torch.zeros(channels, dtype=torch.float32, device=device)
        self.tail = torch.zeros(channels, dtype=torch.float32, device=device)
        self.tails = torch.zeros((len(ADAPTIVE_PERCENTILES), channels), dtype=torch.float32, device=device)
        self.nonfinite = torch.zeros(channels, dtype=torch.int64, device=device)
        self.calls = 0
        self.tokens = 0

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device: torch.device | str) -> "ChannelStats":
        """Move the accumulators (in place) and return self."""
        self.absmax = self.absmax.to(device)
        self.tail = self.tail.to(device)
        self.tails = self.tails.to(device)
        self.nonfinite = self.nonfinite.to(device)
        return self

    @property
    def percentiles(self) -> tuple[float, ...]:
        """The percentiles a call is measured at: the tail's, then ADAPTIVE_PERCENTILES."""
        return (self.percentile,) + ADAPTIVE_PERCENTILES

    def measure(self, x: Tensor) -> CallStats | None:
        """This layer's statistics of one call's input x[..., channels] (None: no tokens)."""
        _as_tokens(x, self.channels)
        return call_stats(x, self.percentiles, self.channel_chunk)

    def fold(self, call: CallStats | None) -> None:
        """Fold one call's statistics (from `measure`, maybe another layer's of the same input)."""
        if call is None:
            return
        if call.percentiles != self.percentiles or call.absmax.shape != (self.channels,):
            raise ValueError(f"call statistics at {call.percentiles} for {call.absmax.shape[0]} channels do not "
                             f"fit {self}")
        if call.absmax.device != self.device:
            self.to(call.absmax.device)
        torch.maximum(self.absmax, call.absmax, out=self.absmax)
        torch.maximum(self.tail, call.tails[0], out=self.tail)
        torch.maximum(self.tails, call.tails[1:], out=self.tails)
        self.nonfinite += call.nonfinite
        self.calls += 1
        self.tokens += call.tokens

    def update(self, x: Tensor) -> None:
        """Fold one call's input x[..., channels] into the running statistics."""
        self.fold(self.measure(x))

    def merge(self, other: "ChannelStats") -> None:
        """Fold another observer of the same layer into this one (e.g. another GPU)."""
        self._check_compatible(other.channels, other.percentile)
        self.absmax = torch.maximum(self.absmax, other.absmax.to(self.device))
        self.tail = torch.maximum(self.tail, other.tail.to(self.device))
        self.tails = torch.maximum(self.tails, other.tails.to(self.device))
        self.nonfinite = self.nonfinite + other.nonfinite.to(self.device)
        self.calls += other.calls
        self.tokens += other.tokens

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors (safetensors-compatible); scalars as 0-d tensors."""
        return {
            "absmax": self.absmax.clone(),
            "tail": self.tail.clone(),
            "tails": self.tails.clone(),
            "nonfinite": self.nonfinite.clone(),
            "calls": torch.tensor(self.calls, dtype=torch.int64),
            "tokens": torch.tensor(self.tokens, dtype=torch.int64),
            "percentile": torch.tensor(self.percentile, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the statistics with a saved state of the same layer and percentile."""
        missing = {"absmax", "tail", "tails", "nonfinite", "calls", "tokens", "percentile"} - state.keys()
        if missing:
            raise ValueError(f"ChannelStats state lacks {sorted(missing)}")
        self._check_compatible(state["absmax"].numel(), float(state["percentile"]))
        for key, shape in self._shapes().items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"ChannelStats state: {key} has shape {tuple(state[key].shape)}, expected {shape}")
        self.absmax = state["absmax"].to(self.device, torch.float32).clone()
        self.tail = state["tail"].to(self.device, torch.float32).clone()
        self.tails = state["tails"].to(self.device, torch.float32).clone()
        self.nonfinite = state["nonfinite"].to(self.device, torch.int64).clone()
        self.calls = int(state["calls"])
        self.tokens = int(state["tokens"])

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], device: torch.device | str | None = None
    ) -> "ChannelStats":
        stats = cls(int(state["absmax"].numel()), float(state["percentile"]), device=device)
        stats.load_state_dict(state)
        return stats

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.channels
        return {"absmax": (c,), "tail": (c,), "tails": (len(ADAPTIVE_PERCENTILES), c), "nonfinite": (c,)}

    def _check_compatible(self, channels: int, percentile: float) -> None:
        if channels != self.channels:
            raise ValueError(f"channel count mismatch: {channels} vs {self.channels}")
        if percentile != self.percentile:
            raise ValueError(f"percentile mismatch: {percentile} vs {self.percentile} (tails not comparable)")

    def __repr__(self) -> str:
        return (
            f"ChannelStats(channels={self.channels}, percentile={self.percentile}, "
            f"calls={self.calls}, tokens={self.tokens}, device={self.device})"
        )
