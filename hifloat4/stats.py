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

The selection: the k = n - floor((n-1) q/100) largest values per channel (k = 6 for
4096 tokens). Tokens are cut into blocks of s; the k blocks with the largest maxima
contain the k largest values (proof in `_top_values`), so the exact top-k is taken over
k*s candidates. A two-pass per-channel radix histogram of bf16/fp16 bit patterns (no
top-k at all) was built and measured against it with the same bits: slower on the CPU
at every size (4.3-7.6 against 3.5-4.1 ns per value, 16k-98k tokens) and on an H200
(0.56-0.99 against 0.33-0.55 ms per ffn-sized chunk, 16k-65k tokens), so only this
path remains.

Why the code looks the way it does:
* Memory: an ffn.2 input at 720p/81 frames is ~75k tokens x 13824 channels. The
  input is read in channel chunks of about CHUNK_ELEMENTS values; only one chunk's
  temporaries exist at a time, never an fp32 copy of the activation.
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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Values materialized per channel chunk: cache-sized on CPU; on
# accelerators large enough that kernel launches stay few (64 MiB of bf16).
CHUNK_ELEMENTS = {"cpu": 1 << 22, "other": 1 << 25}
_NATIVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_MIN_BLOCK, _MAX_BLOCK = 4, 256
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
    values, bad = _topk_select(xs, ranks)
    absmax = values[row[n - 1]].float()
    if not qs:
        return _Chunk(absmax, None, bad)
    wide = wide_dtype(xs.device)
    tails = [_lerp_numpy(values[row[r.lo]], values[row[r.hi]], r.t, wide).float() for r in per_q]
    return _Chunk(absmax, torch.stack(tails), bad)


def _auto_chunk(n: int, device: torch.device) -> int:
    """Channels per chunk of an n-token call: about CHUNK_ELEMENTS values."""
    return max(1, CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "other"] // max(n, 1))


def _scan(x: Tensor, qs: tuple[float, ...], channel_chunk: int | None):
    """Yield (c0, c1, _Chunk) over channel chunks of x[..., C] (n >= 1 tokens)."""
    n, c = _as_tokens(x)
    step = channel_chunk or _auto_chunk(n, x.device)
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
