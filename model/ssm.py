"""Selective state space block (Mamba-style, Gu & Dao 2023, sec. 3) with two paths over one set of weights.

    forward(x, mask)       training: the whole (left-padded) sequence at once, chunked selective scan
    step(x_t, conv, ssm)   serving: one position, explicit state in, explicit state out
    forward_state(x, mask) warming: `forward`, plus the state `step` would hold after the last position

Shape letters: b batch, l length, d model dim, e inner dim (expand * d), n state dim,
k conv width, r rank of the step-size projection.

Recurrence per channel c and state s (zero-order hold on A, Euler on B, as in Mamba):
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        y_t = C_t . h_t + D * u_t
Padding positions get dt = 0 and u = 0, so they leave the state exactly at its initial zero:
that is why `step` from `init_state` agrees with `forward` over left-padded input.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def selective_scan_loop(dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """The recurrence written out, one position at a time: the readable reference (mamba-minimal's
    form) that the fast scans below are tested against. Same arguments and result as selective_scan:
    (b, l, e) step sizes, (b, l, e) inputs, (e, n), (b, l, n), (b, l, n) -> y (b, l, e)."""
    h = torch.zeros(dt.shape[0], *A.shape, dtype=dt.dtype, device=dt.device)  # (b, e, n)
    ys = []
    for t in range(dt.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]  # (b, e, n)
        ys.append((h * C[:, t, None, :]).sum(-1))  # (b, e)
    return torch.stack(ys, 1)  # (b, l, e)


def _doubling_scan(a: Tensor, b: Tensor) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t with h_{-1} = 0, over dim 1, in ceil(log2 l) rounds; no autograd.

    Hillis-Steele doubling: after the round with offset k, position t holds the composition of
    steps (t - 2k, t]. Exact (no log-space cancellation), O(l log l) work, no loop over l.
    """
    l, k = a.shape[1], 1
    a, b = a.clone(), b.clone()
    while k < l:
        b[:, k:] += a[:, k:] * b[:, :-k]  # the product is formed before b is written
        if 2 * k < l:
            a[:, k:] = a[:, k:] * a[:, :-k]
        k *= 2
    return b


def _chunked_scan(a: Tensor, b: Tensor, chunk: int = 16) -> Tensor:
    """The same recurrence, chunked: a loop over the `chunk` positions of a chunk, all chunks at once.

    Within each chunk the recurrence runs position by position on (b, l/chunk, ...) slices while
    also accumulating the chunk's decay P_t = a_1 ... a_t; the true state at each chunk's end comes
    from a doubling scan over the few chunk carries; then h_t += P_t * carry of the previous chunk.
    About four passes over the (b, l, ...) tensors instead of the doubling scan's three per round:
    on a CPU, where these tensors do not fit in cache, that is what the time is.
    """
    bsz, l, rest = a.shape[0], a.shape[1], a.shape[2:]
    t_len = min(chunk, l)
    nc = -(-l // t_len)
    pad = nc * t_len - l
    if pad:  # identity steps in front (a = 1, b = 0) leave every later state unchanged
        a = torch.cat([a.new_ones(bsz, pad, *rest), a], dim=1)
        b = torch.cat([b.new_zeros(bsz, pad, *rest), b], dim=1)
    a, b = a.reshape(bsz, nc, t_len, *rest), b.reshape(bsz, nc, t_len, *rest)  # (b, c, t, ...)
    h, p = torch.empty_like(b), torch.empty_like(a)
    h[:, :, 0], p[:, :, 0] = b[:, :, 0], a[:, :, 0]
    for t in range(1, t_len):
        h[:, :, t] = torch.addcmul(b[:, :, t], a[:, :, t], h[:, :, t - 1])
        p[:, :, t] = a[:, :, t] * p[:, :, t - 1]
    if nc > 1:
        carry = _doubling_scan(p[:, :, -1], h[:, :, -1])  # (b, c, ...) true state at each chunk's end
        h[:, 1:] += p[:, 1:] * carry[:, :-1, None]
    return h.reshape(bsz, nc * t_len, *rest)[:, pad:]


class _Scan(torch.autograd.Function):
    """The scan with its own backward, itself a scan run in reverse:
    g_b[t] = g[t] + a[t+1] * g_b[t+1],  g_a[t] = g_b[t] * h[t-1].
    Autograd through the doubling rounds would keep every round's tensors; this keeps a and h only.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        h = _chunked_scan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        a, h = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        gb = _chunked_scan(a_next.flip(1), g.flip(1)).flip(1)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return gb * h_prev, gb


def parallel_scan(a: Tensor, b: Tensor) -> Tensor:  # (b, l, ...) twice -> (b, l, ...)
    """h_t = a_t * h_{t-1} + b_t with h_{-1} = 0 along dim 1, differentiable; a and b broadcast."""
    a, b = torch.broadcast_tensors(a, b)  # autograd sums the gradient back to each input's shape
    return _Scan.apply(a, b)


CHUNK = 16  # positions per chunk of the selective scan: the Python loops run CHUNK times, never l


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t,  h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t,  h_{-1} = 0; chunked, fused.

    The sequence is cut into nc chunks of T = CHUNK positions, all chunks processed at once: each
    loop runs over the T positions of a chunk on (b, nc, e, n) slices, and the state entering each
    chunk comes from a doubling scan over the nc chunk-end states. Unlike materialising
    exp(dt A) and dt u B as (b, l, e, n) tensors and scanning them (parallel_scan), this never
    holds more than one (b, nc, e, n) slice per step in the forward pass; on a CPU, where those big
    tensors do not fit in cache, that is 4-5x faster for training and 8x for inference.
    Backward recomputes the states instead of saving them (as Mamba's kernel does):
        gh_t = a_{t+1} gh_{t+1} + gy_t C_t      (reverse scan, same chunking)
        g(dt u)_t = gh_t . B_t,  gB_t = sum_e gh_t (dt u)_t,  gC_t = sum_e gy_t h_t,
        w_t = gh_t * h_{t-1} * a_t:  g dt_t += sum_n w_t A,  gA += sum_{b,t} w_t dt_t.
    """

    @staticmethod
    def forward(ctx, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None) -> Tensor:  # type: ignore[override]
        l = dt.shape[1]
        dtc, xc, Bc, Cc = _chunk(dt), _chunk(dt * u), _chunk(B), _chunk(C)  # (b, c, T, e) and (b, c, T, n)
        h_in = _chunk_inputs(dtc, xc, Bc, A)  # (b, c, e, n): true state entering each chunk, from zero
        if h0 is not None:  # a carried state (constant: no gradient) decays into every chunk's entering state
            decay = torch.exp(dtc.sum(2)[..., None] * A)  # (b, c, e, n)
            h_in = h_in + torch.cat([torch.ones_like(decay[:, :1]), decay[:, :-1]], 1).cumprod(1) * h0[:, None]
        _, y = _within_chunks(dtc, xc, Bc, A, h_in, Cc)  # (b, c, T, e)
        ctx.save_for_backward(dt, u, A, B, C, h_in)
        return _unchunk(y, l)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        """Given the true states (h_in includes a carried h0), the recurrence's gradients are the same formulas."""
        dt, u, A, B, C, h_in = ctx.saved_tensors
        l = dt.shape[1]
        dtc, uc, Bc, Cc, gyc = _chunk(dt), _chunk(u), _chunk(B), _chunk(C), _chunk(gy)
        xc = dtc * uc
        T = dtc.shape[2]
        a = [torch.exp(dtc[:, :, t, :, None] * A) for t in range(T)]  # T x (b, c, e, n)
        # gradient reaching each chunk's end state from later chunks: a reverse scan over chunks of
        # g_in (what a chunk sends to the state before it, from zero) with the chunk decays
        g = torch.zeros_like(h_in)
        for t in reversed(range(T)):
            g = g + gyc[:, :, t, :, None] * Cc[:, :, t, None, :]
            g = a[t] * g
        decay = torch.exp(dtc.sum(2)[..., None] * A)  # (b, c, e, n): whole-chunk decay
        g_end = torch.zeros_like(g)
        if g.shape[1] > 1:  # g_end[c] = g[c+1] + decay[c+1] g_end[c+1]
            g_end[:, :-1] = _doubling_scan(decay[:, 1:].flip(1), g[:, 1:].flip(1)).flip(1)
        hs = [h_in]  # hs[t] = true state before position t
        for t in range(T):
            hs.append(a[t] * hs[-1] + xc[:, :, t, :, None] * Bc[:, :, t, None, :])
        g_x, g_B, g_C, g_dt = torch.empty_like(xc), torch.empty_like(Bc), torch.empty_like(Cc), torch.empty_like(dtc)
        gA = torch.zeros_like(A)
        gh = g_end
        for t in reversed(range(T)):
            gh = gh + gyc[:, :, t, :, None] * Cc[:, :, t, None, :]  # (b, c, e, n): dL/dh_t
            g_C[:, :, t] = (gyc[:, :, t, None, :] @ hs[t + 1])[:, :, 0]
            g_x[:, :, t] = (gh @ Bc[:, :, t, :, None])[..., 0]
            g_B[:, :, t] = (xc[:, :, t, None, :] @ gh)[:, :, 0]
            w = gh * hs[t] * a[t]  # (b, c, e, n): dL/d(dt_t A) through the decay
            g_dt[:, :, t] = (w * A).sum(-1)
            gA += (w * dtc[:, :, t, :, None]).sum((0, 1))
            gh = a[t] * gh
        g_dt = g_dt + g_x * uc
        g_u = g_x * dtc
        return _unchunk(g_dt, l), _unchunk(g_u, l), gA, _unchunk(g_B, l), _unchunk(g_C, l), None


def _chunk(x: Tensor) -> Tensor:  # (b, l, f) -> (b, c, T, f), zeros in front up to a multiple of T
    b, l, f = x.shape
    T = min(CHUNK, l)
    pad = -l % T  # dt = 0 in front: identity steps (decay 1, no input) that leave every state unchanged
    return F.pad(x, (0, 0, pad, 0)).view(b, (l + pad) // T, T, f)


def _unchunk(x: Tensor, l: int) -> Tensor:  # (b, c, T, f) -> (b, l, f)
    b, c, T, f = x.shape
    return x.reshape(b, c * T, f)[:, c * T - l :]


def _within_chunks(dtc: Tensor, xc: Tensor, Bc: Tensor, A: Tensor, h: Tensor, Cc: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The recurrence over the T positions of every chunk at once, from states h (b, c, e, n) entering
    the chunks: -> the chunks' end states (b, c, e, n), and y (b, c, T, e) when C is given."""
    y = torch.empty_like(xc) if Cc is not None else None
    for t in range(dtc.shape[2]):
        h = torch.exp(dtc[:, :, t, :, None] * A) * h + xc[:, :, t, :, None] * Bc[:, :, t, None, :]
        if y is not None:
            y[:, :, t] = (h @ Cc[:, :, t, :, None])[..., 0]  # type: ignore[index]
    return h, y


def _chunk_inputs(dtc: Tensor, xc: Tensor, Bc: Tensor, A: Tensor) -> Tensor:  # -> (b, c, e, n)
    """The true state entering each chunk: each chunk's end state from zero, then a scan over chunks."""
    h = torch.zeros(*dtc.shape[:2], *A.shape, dtype=dtc.dtype, device=dtc.device)
    if dtc.shape[1] == 1:
        return h
    h, _ = _within_chunks(dtc, xc, Bc, A, h)
    decay = torch.exp(dtc.sum(2)[..., None] * A)  # (b, c, e, n)
    ends = _doubling_scan(decay, h)  # (b, c, e, n): true state at each chunk's end
    return torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)


def selective_scan(dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None = None) -> Tensor:
    """(b, l, e) step sizes, (b, l, e) inputs, (e, n), (b, l, n), (b, l, n) -> y (b, l, e) without the D skip;
    h0 (b, e, n): the state before the first position (zero when None), treated as a constant."""
    return _SelectiveScan.apply(dt, u, A, B, C, None if h0 is None else h0.detach())


def selective_scan_state(dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """selective_scan's forward without autograd, also giving the final state h_l (b, e, n): the `step` state after
    the sequence. The whole sequence is one chunk: without a backward pass to save, the chunked form's second
    pass over every position (the states entering each chunk) buys nothing on a CPU, and costs 2x."""
    h0 = torch.zeros(dt.shape[0], 1, *A.shape, dtype=dt.dtype, device=dt.device)  # (b, 1, e, n)
    h_end, y = _within_chunks(dt[:, None], (dt * u)[:, None], B[:, None], A, h0, C[:, None])  # (b, 1, e, n), (b, 1, l, e)
    return y[:, 0], h_end[:, 0]  # type: ignore[index]


class SelectiveSSM(nn.Module):
    """Pre-norm residual block: x + out(SSM(SiLU(conv(in_u(norm x)))) * SiLU(in_z(norm x))).
    `post_norm`: norm(x + out(SSM(SiLU(conv(in_u x))) * SiLU(in_z x))), Mamba4Rec's placement (its input arrives normed)."""

    def __init__(self, d: int, d_state: int = 16, expand: int = 2, d_conv: int = 4, dropout: float = 0.0,
                 dt_range: tuple[float, float] = (1e-3, 0.1), post_norm: bool = False) -> None:
        super().__init__()
        self.post = post_norm
        self.drop = nn.Dropout(dropout)  # on the block's output, before the residual (Mamba4Rec's placement)
        e, r = expand * d, math.ceil(d / 16)
        self.e, self.n, self.k, self.r = e, d_state, d_conv, r
        self.norm = nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, 2 * e)
        self.conv = nn.Conv1d(e, e, d_conv, groups=e)  # depthwise; causal by left padding
        self.x_proj = nn.Linear(e, r + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(r, e)
        lo, hi = dt_range
        dt = torch.exp(torch.rand(e) * (math.log(hi) - math.log(lo)) + math.log(lo))
        with torch.no_grad():  # softplus(bias) = dt log-uniform in dt_range; [1e-3, 0.1] is Mamba's initialisation
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(e, 1))  # (e, n)
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, d)

    def _pre(self, x: Tensor) -> Tensor:  # (..., d): what in_proj reads
        return x if self.post else self.norm(x)

    def _res(self, x: Tensor, y: Tensor) -> Tensor:  # (..., d) input, (..., d) block output -> the residual sum
        return self.norm(x + self.drop(y)) if self.post else x + self.drop(y)

    def _select(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # (..., e) -> dt (..., e), B, C (..., n)
        dt, B, C = self.x_proj(u).split([self.r, self.n, self.n], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def _inputs(self, x: Tensor, mask: Tensor, conv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(b, l, d), (b, l), the conv state before the first position (b, e, k-1) or None for zeros ->
        the conv's padded input (b, e, k-1+l), u, z, dt (b, l, e), B, C (b, l, n)."""
        l = x.shape[1]
        u, z = self.in_proj(self._pre(x)).chunk(2, dim=-1)  # (b, l, e) each
        u = u * mask[..., None]  # padding feeds zeros to the conv window, as init_state does
        before = conv.detach() if conv is not None else u.new_zeros(u.shape[0], self.e, self.k - 1)
        padded = torch.cat([before, u.transpose(1, 2)], dim=-1)  # (b, e, k-1+l)
        u = F.silu(self.conv(padded)[..., :l].transpose(1, 2))  # (b, l, e)
        dt, B, C = self._select(u)  # (b, l, e), (b, l, n), (b, l, n)
        dt = dt * mask[..., None]  # dt = 0 on padding: exp(0) = 1 and no input, state stays 0
        return padded, u, z, dt, B, C

    def forward(self, x: Tensor, mask: Tensor, state: tuple[Tensor, Tensor] | None = None) -> Tensor:  # (b, l, d), (b, l) bool -> (b, l, d)
        """`state`: (conv, h) as `step` holds them, carried in from earlier positions (a constant, as truncated
        backpropagation through time treats it); left padding must not follow a non-zero state."""
        conv, h0 = state if state is not None else (None, None)
        _, u, z, dt, B, C = self._inputs(x, mask, conv)
        y = selective_scan(dt, u, -torch.exp(self.A_log), B, C, h0) + self.D * u  # (b, l, e)
        return self._res(x, self.out_proj(y * F.silu(z)))  # (b, l, d)

    def forward_state(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`forward`, plus the state `step` holds after the last position: conv (b, e, k-1), the last k-1 inputs
        before the conv, and h (b, e, n). One parallel pass instead of l steps (warming a user's state)."""
        padded, u, z, dt, B, C = self._inputs(x, mask)
        y, h = selective_scan_state(dt, u, -torch.exp(self.A_log), B, C)  # (b, l, e), (b, e, n)
        y = y + self.D * u
        return self._res(x, self.out_proj(y * F.silu(z))), padded[..., x.shape[1] :], h

    def forward_peek(self, x: Tensor, mask: Tensor) -> Tensor:  # (b, L, g, d), (b, L) bool -> (b, L, g, d)
        """Temporal bundling's training path: at each group position j, g input streams x[:, j, p].

        Stream g - 1 is the committed one: it runs the recurrence (conv window and h) exactly as
        `forward` does. Every stream p is then read out as a `step` from the committed state
        after position j - 1 would read it, without committing: conv window = committed inputs
        j-k+1 .. j-1 plus stream p's own input, h = dA_p * h_{j-1} + dBu_p. That is what serving
        does for a partial group ("peek"), so training sees what serving produces.
        """
        L = x.shape[1]
        u, z = self.in_proj(self._pre(x)).chunk(2, dim=-1)  # (b, L, g, e) each
        u = u * mask[..., None, None]
        uc = u[:, :, -1]  # (b, L, e): the committed stream
        conv_c = self.conv(F.pad(uc.transpose(1, 2), (self.k - 1, 0)))[..., :L].transpose(1, 2)  # (b, L, e)
        w_last = self.conv.weight[:, 0, -1]  # (e,): the tap on the current input
        u = F.silu((conv_c - w_last * uc)[:, :, None] + w_last * u)  # (b, L, g, e): swap in each stream's input
        dt, B, C = self._select(u)  # (b, L, g, e), (b, L, g, n), (b, L, g, n)
        dt = dt * mask[..., None, None]
        dA = torch.exp(dt[..., None] * -torch.exp(self.A_log))  # (b, L, g, e, n)
        dBu = (dt * u)[..., None] * B[..., None, :]  # (b, L, g, e, n)
        h = parallel_scan(dA[:, :, -1], dBu[:, :, -1])  # (b, L, e, n): committed states
        h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # (b, L, e, n): state before j
        h = dA * h_prev[:, :, None] + dBu  # (b, L, g, e, n): every stream read from the committed state
        y = torch.einsum("blgen,blgn->blge", h, C) + self.D * u  # (b, L, g, e)
        return self._res(x, self.out_proj(y * F.silu(z)))  # (b, L, g, d)

    def init_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """conv: the last k-1 inputs of the conv, (b, e, k-1); ssm: h, (b, e, n). Both start at zero."""
        return torch.zeros(batch_size, self.e, self.k - 1), torch.zeros(batch_size, self.e, self.n)

    def step(self, x: Tensor, conv: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One position: x (b, d), conv (b, e, k-1), h (b, e, n) -> y (b, d), conv, h."""
        u, z = self.in_proj(self._pre(x)).chunk(2, dim=-1)  # (b, e)
        window = torch.cat([conv, u[..., None]], dim=-1)  # (b, e, k)
        u = F.silu((window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias)  # (b, e)
        dt, B, C = self._select(u)  # (b, e), (b, n), (b, n)
        A = -torch.exp(self.A_log)  # (e, n)
        h = torch.exp(dt[..., None] * A) * h + (dt * u)[..., None] * B[:, None, :]  # (b, e, n)
        y = (h * C[:, None, :]).sum(-1) + self.D * u  # (b, e)
        return self._res(x, self.out_proj(y * F.silu(z))), window[..., 1:], h
