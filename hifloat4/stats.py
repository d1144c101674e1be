"""Per-input-channel activation statistics of a Linear: running absmax, a tail percentile,
and the ADAPTIVE_PERCENTILES tails (p99, p99.9, p99.99) a per-layer "adaptive" statistic
chooses among. All percentiles of a call come out of one top-k selection (k for the
lowest of them), so each is exact in the sense below.

The tail statistic is the q-th percentile (default 99.9) of |x[:, c]| over the tokens
of one forward call (tokens = all leading dims flattened), with numpy's default
'linear' interpolation (torch.quantile's definition), aggregated over calls by max. Per call it
is exact: the two order statistics come out of the tensor's own dtype (|x| is exact
in every float format) and the interpolation runs in float64 with numpy's own
formula, so the result equals numpy.percentile(|x| in float64) rounded to float32.
Note the aggregation makes the tail depend on how tokens are batched into calls
(cond and uncond batched together form one call).

Why the code looks the way it does:
* Memory: an ffn.2 input at 720p/81 frames is ~75k tokens x 13824 channels. The
  input is read in channel chunks of about CHUNK_ELEMENTS values; only one chunk's
  |x| (in the input dtype, never an fp32 copy of the activation) plus small
  candidate sets exist at a time.
* No host sync: every decision (ranks, interpolation weight, chunking, which
  selection path) depends only on shapes and the percentile, never on tensor values,
  so on CUDA an update is a queue of kernels. Accumulators are fp32 on x.device.
* Speed: a high percentile needs only the k = n - floor((n-1) q/100) largest values
  per channel (k = 6 for 4096 tokens, 76 for 75k). Instead of a top-k over all n
  tokens, tokens are cut into blocks of s; the k blocks with the largest maxima
  contain the k largest values (proof in `_top_values`), so the exact top-k is
  taken over k*s candidates: about half the time of a plain torch.topk over all
  tokens, and far less than kthvalue or a sort (`python -m hifloat4 bench` measures
  this machine). Selecting along dim 0 beats transposing the chunk first (bf16
  transposes are slow).
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

# Values of |x| materialized per channel chunk: cache-sized on CPU; on accelerators
# large enough that kernel launches stay few (64 MiB in bf16).
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


@dataclass
class _Chunk:
    absmax: Tensor  # (w,) fp32
    tails: Tensor | None  # (len(qs), w) fp32, one row per percentile; None when only absmax was asked for
    nonfinite: Tensor  # (w,) bool: any NaN/Inf in this call


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


def _from_top(r: _Ranks, n: int) -> bool:
    """Whether the percentile at ranks r is cheaper to select from the top than the bottom."""
    return n - r.lo <= r.hi + 1


def _chunk_stats(xs: Tensor, qs: tuple[float, ...]) -> _Chunk:
    """Statistics of one (n, w) channel chunk with n >= 1: absmax and the percentiles qs.

    All high percentiles come out of ONE top-k selection (k for the lowest of them:
    the higher order statistics are among the same sorted top values); low ones
    (rare) out of one bottom-k selection.
    """
    n, w = xs.shape
    ranks = [_Ranks.of(n, q) for q in qs]
    k_top = max((n - r.lo for r in ranks if _from_top(r, n)), default=0)
    if k_top:
        s = _block_size(n, k_top)
        buf = _abs_chunk(xs, -(-n // s) * s if s else n)
        top, bad = _top_values(buf, n, k_top, s)  # descending: top[j] = ascending n-1-j
        absmax = top[0]
    else:
        buf = _abs_chunk(xs, n)
        bad = ~torch.isfinite(buf.amax(dim=0))
        buf.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        absmax = buf.amax(dim=0)
    if not qs:
        return _Chunk(absmax.float(), None, bad)
    k_bottom = max((r.hi + 1 for r in ranks if not _from_top(r, n)), default=0)
    bottom = buf[:n].topk(k_bottom, dim=0, largest=False).values if k_bottom else None  # ascending
    wide = wide_dtype(xs.device)
    rows = []
    for r in ranks:
        a, b = (top[n - 1 - r.lo], top[n - 1 - r.hi]) if _from_top(r, n) else (bottom[r.lo], bottom[r.hi])
        rows.append(_lerp_numpy(a, b, r.t, wide).float())
    return _Chunk(absmax.float(), torch.stack(rows), bad)


def _auto_chunk(n: int, device: torch.device) -> int:
    budget = CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "other"]
    return max(1, budget // max(n, 1))


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


class ChannelStats:
    """Running statistics of one Linear's input: absmax, tail and the
    ADAPTIVE_PERCENTILES tails, each max over calls.

    `update` queues device work only (no host sync); the accumulators live on the
    device of the inputs (they move there if an input arrives elsewhere). Read
    `absmax`, `tail` (fp32, (channels,)), `tails` (fp32, (3, channels): |x| at
    ADAPTIVE_PERCENTILES, the statistics a per-layer "adaptive" choice picks from),
    `nonfinite` (int64: calls per channel that contained NaN/Inf), `calls` and
    `tokens` (host ints; calls without tokens are not counted). One selection per
    channel chunk serves the tail and the three tails together.
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

    def update(self, x: Tensor) -> None:
        """Fold one call's input x[..., channels] into the running statistics."""
        x = x.detach()  # statistics are not differentiable; inputs may come from a graph
        n, _ = _as_tokens(x, self.channels)
        if n == 0:
            return
        if x.device != self.device:
            self.to(x.device)
        for c0, c1, chunk in _scan(x, (self.percentile,) + ADAPTIVE_PERCENTILES, self.channel_chunk):
            torch.maximum(self.absmax[c0:c1], chunk.absmax, out=self.absmax[c0:c1])
            torch.maximum(self.tail[c0:c1], chunk.tails[0], out=self.tail[c0:c1])
            torch.maximum(self.tails[:, c0:c1], chunk.tails[1:], out=self.tails[:, c0:c1])
            self.nonfinite[c0:c1] += chunk.nonfinite
        self.calls += 1
        self.tokens += n

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
