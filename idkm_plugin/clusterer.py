"""`WeightClusterer`: the one stateful module every integration wraps."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from .config import ChannelScale, ClusterConfig, Method
from .core import SolveStats, compute_dtype, from_vectors, hard_assign, init_centroids, lookup, soft_kmeans
from .core.frozen import frozen_soft_assign
from .core.init import init_centroids_masked
from .core.prune import magnitude_mask, num_pruned, on_survivors, scatter_survivors
from .core.vectors import vector_shape
from .nn.channel_scale import scale_weight, unscale_weight
from .nn.palettized_tensor import PaletteSpec, PalettizedTensor


_OWNER = "_idkm_owner"  # on a weight Parameter: an _OwnerRef to the clusterer that clusters it (tied weights)


class _OwnerRef:
    """A weak reference to the clusterer that owns a Parameter, kept on the Parameter itself (a dropped model releases
    its clusterers); it pickles as a dead reference, and copies of the Parameter start without one."""

    __slots__ = ("ref",)

    def __init__(self, owner: Optional["WeightClusterer"] = None) -> None:
        self.ref = None if owner is None else weakref.ref(owner)

    def __call__(self) -> Optional["WeightClusterer"]:
        return None if self.ref is None else self.ref()

    def __reduce__(self):
        return (_OwnerRef, ())


def _registered_owner(weight: torch.Tensor) -> Optional["WeightClusterer"]:
    ref = weight.__dict__.get(_OWNER) if isinstance(weight, nn.Parameter) else None
    return None if ref is None else ref()


# idkm / idkm_jfb: map evaluations of a cold solve (fresh or externally set centroids), in units of max_iter. A cold
# start is far from the fixed point (grouped LUTs of SmolLM2: 136-197 evaluations to tol); solving it once lets
# every later warm-started step take one evaluation, where max_iter-capped cold solves kept restarting for steps.
COLD_START_BUDGET = 10


class WeightClusterer(nn.Module):
    """Clusters one weight tensor: soft (differentiable) in training, hard in eval.

    Buffers:
        centroids: [groups, k, d] float32 (float64 for float64 weights); empty until first use,
            then initialised from the weight and warm-started from the previous step, as DKM does.
        step: training forwards seen; clustering switches on after `config.start_step` of them.
        mask: bool [groups, m] (True = kept), one entry per d-vector in the order of `vectors(weight)` and of
            the codes; empty (numel 0) until pruning (`config.sparsity` > 0) first prunes a vector.

    forward(weight [out, ...]) -> weight of the same shape and dtype:
        training: A(C*, W) C* (the soft clustering, differentiable w.r.t. W, updates the centroids);
        eval: every d-vector snapped to its nearest centroid of the LUT (lut_dtype), i.e. exactly
            the weight the converted model will use;
        training with the LUT frozen (`freeze_lut()`, torch.ao's `disable_observer`): A(C, W) C with C
            fixed, still differentiable w.r.t. W;
        disabled or before start_step: the weight unchanged (but for pruned entries, which stay 0).
    With pruning (`config.sparsity`), from step `config.pruning_start` on the smallest-norm d-vectors of the raw
    weight are pruned (`config.sparsity_at(step)` of them, layer-wise, monotone): the mask is updated, the
    pruned entries of the weight Parameter are set to exactly 0 in place, the soft k-means (and its init) runs
    on the surviving vectors only, and in every mode above the output is exactly 0 at pruned entries (which
    therefore get zero gradient); eval codes of pruned vectors are 0.
    With `config.per_channel_scale`, each output channel is divided by its scale (`channel_scale`) before
    the clustering and multiplied back after, in every mode (differentiably in training).
    With an importance (`set_importance`, e.g. the Fisher information `idkm_plugin.ptq.init_luts` sets), the
    training clustering is weighted by it (the objective of sensitivity-weighted k-means), so QAT keeps
    optimising what post-training palettization optimised.

    Adapters only set `enabled` / `lut_frozen` and call it; it is the one door to the math.
    """

    def __init__(self, config: ClusterConfig, name: str = "weight") -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.enabled = True
        self.lut_frozen = False
        self.last_stats = SolveStats()
        self.register_buffer("centroids", torch.empty(0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("mask", torch.empty(0, dtype=torch.bool))
        # [weight shape] or None: how much each weight matters (see set_importance); moves with .to(), not saved
        self.register_buffer("importance", None, persistent=False)
        self._eval_cache: Optional[tuple] = None  # (key, eval output): see _eval_key
        # ((id, version) of the weight, clustered output) of this step until backward: a tied weight is clustered once
        self._memo: Optional[tuple] = None
        # the centroid tensor the last training solve wrote (a weak reference): centroids set since then (an init,
        # init_luts) are a cold start, which gets COLD_START_BUDGET times max_iter evaluations
        self._solved: Optional[weakref.ref] = None

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_eval_cache"] = None  # deepcopy / pickling never carry the cached decoded weight
        state["_memo"] = None  # nor a non-leaf tensor of the current step
        state["_solved"] = None  # (a weak reference cannot be pickled; a copy's first solve counts as cold)
        return state

    @property
    def group_size(self) -> int:
        return self.config.lut_group_size

    @property
    def initialized(self) -> bool:
        return self.centroids.numel() > 0

    @property
    def pruned(self) -> bool:
        """Pruning has pruned at least one vector (the mask is set)."""
        return self.mask.numel() > 0

    def pruning_mask(self) -> Optional[torch.Tensor]:
        """The mask bool [groups, m] (True = kept), or None before any vector is pruned."""
        return self.mask if self.pruned else None

    def check_weight(self, weight: torch.Tensor) -> None:
        """Raise ValueError (naming the layer) if this weight cannot be clustered with the config."""
        vector_shape(weight.shape, self.config.dim, self.group_size, self.name)
        if self.config.per_channel_scale:
            self._scale_block(weight)

    def _scale_block(self, weight: torch.Tensor) -> int:
        """Weights per scale in a row of `weight` [out, ...] (`config.scale_block`); raises where blocks of at
        least half of scale_block_size do not divide the row."""
        out = weight.shape[0] if weight.dim() else 1
        row = weight.numel() // out if out else 0
        block, n = self.config.scale_block(row), self.config.scale_block_size
        if n and row > n and 2 * block < n:
            raise ValueError(f"{self.name}: scale_block_size={n} is not allowed for rows of {row} weights: the "
                             f"largest block <= {n} that divides {row} is {block}; use a divisor of the row "
                             "length, or 0 for per-channel scales")
        return block or 1

    def vectors(self, weight: torch.Tensor) -> torch.Tensor:
        """weight -> [groups, m, d]."""
        return weight.reshape(vector_shape(weight.shape, self.config.dim, self.group_size, self.name))

    def active(self) -> bool:
        """Enabled, and `start_step` training forwards have already run unclustered."""
        return self.enabled and int(self.step) >= self.config.start_step

    def count_step(self) -> bool:
        """Count one training forward; True if clustering applies to it."""
        on = self.active()
        if self.enabled:
            self.step += 1
        return on

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        owner = self._tie_owner(weight)
        if owner is not self:
            out = owner(weight)
            self.centroids = owner.centroids  # one LUT, seen (and saved) through both layers
            self.mask = owner.mask
            return out
        memo = self.__dict__.get("_memo")
        if self.training and memo is not None and memo[0] == (id(weight), weight._version):
            return memo[1]  # the same weight again before backward (a tied weight): cluster once
        if not self.training:
            return self._eval_forward(weight)
        self._eval_cache = None  # training moves the weight and the LUT: free the decoded copy now
        on = self._count_and_prune(weight)
        if not on:
            return self._masked(weight)
        self.check_finite(weight, "weight")
        scale = self.channel_scale(weight) if self.config.per_channel_scale else None
        normalized = weight if scale is None else unscale_weight(weight, scale)
        x = self.vectors(normalized)
        self.initialize(weight)
        if self.lut_frozen:
            x_hat = self._frozen_assign(x)
            out = from_vectors(x_hat, weight.shape)
            return out if scale is None else scale_weight(out, scale).to(weight.dtype)
        stats = SolveStats()
        x_hat, c = self._soft_kmeans(x, stats, self._training_row_weights(weight, scale))
        self.last_stats = stats
        self.check_finite(c, "new LUT")  # never store non-finite centroids
        with torch.no_grad():
            self.centroids.copy_(c)
        self._solved = weakref.ref(self.centroids)
        out = from_vectors(x_hat, weight.shape)
        out = self._check_gradient(out if scale is None else scale_weight(out, scale).to(weight.dtype))
        if isinstance(weight, nn.Parameter) and out.requires_grad:
            # until backward, a second use of this same weight version reuses this output: a tied weight is
            # clustered once per step (the graph keeps this tensor alive for backward anyway)
            self._memo = ((id(weight), weight._version), out)
            out.register_hook(self._forget_memo)
        return out

    # ---- eval mode ------------------------------------------------------------------------------
    def _eval_forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The hard-clustered weight, computed once per (weight version, LUT version, mask, config, state).

        The cache holds the output against the weight's identity, storage, layout and `_version` (bumped by
        every in-place write: optimizer steps, `load_state_dict`, `copy_`), and the same of the centroid and
        mask buffers (a training step writes the centroids in place; `load_state_dict` copies or replaces
        them); `enabled`, the step gate and the config are part of the key. A miss recomputes and replaces it.
        """
        if not self.active():
            return self._masked(weight)  # unclustered: the weight itself (it keeps its gradient)
        if not self.initialized:  # before the key: initialising replaces the centroid buffer
            self.check_finite(weight, "weight")
            self.initialize(weight)
        key = self._eval_key(weight)
        if self._eval_cache is not None and self._eval_cache[0] == key:
            return self._eval_cache[1]
        # computed outside inference mode (so it can be reused in any mode) and without autograd (the eval
        # output is piecewise constant in the weight and carries no gradient)
        with torch.inference_mode(False), torch.no_grad():
            out = self._hard_weight(weight)
        self._eval_cache = (key, out)
        return out

    def _hard_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Every d-vector snapped to its nearest LUT entry (pruned: 0), times the channel scales."""
        self.check_finite(weight, "weight")
        self.initialize(weight)
        lut = self.lut()
        vectors = lookup(self._codes(weight, lut), lut).to(weight.dtype)
        if self.pruned:
            vectors = vectors.masked_fill(~self.mask.unsqueeze(-1), 0)
        return self._rescale(from_vectors(vectors, weight.shape), weight)

    def _eval_key(self, weight: torch.Tensor) -> tuple:
        """What the eval output depends on. Tensors enter by identity (a weak reference, compared with `is`
        on lookup), storage pointer, layout and version counter; no tensor value is read."""
        return _tensor_key(weight), _tensor_key(self.centroids), _tensor_key(self.mask), self.config

    def _soft_kmeans(self, x: torch.Tensor, stats: SolveStats, row_weights: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [groups, m, d] -> (A(C*, x) C* [groups, m, d], C* [groups, k, d]) from the current centroids,
        weighted by row_weights [groups, m] if given (never with pruning: set_importance refuses it).

        Pruned: each group's surviving vectors are clustered on their own (pruned rows of the output are 0,
        a group without survivors keeps its centroids); `stats` then holds the last group's solve."""
        cfg = self.config
        warm = self._solved is not None and self._solved() is self.centroids
        max_iter = cfg.max_iter if warm or cfg.method is Method.DKM else COLD_START_BUDGET * cfg.max_iter

        def solve(rows: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return soft_kmeans(rows, centroids, tau=cfg.tau, method=cfg.method, max_iter=max_iter,
                               tol=cfg.tol, chunk_size=cfg.chunk_size, uniquify=cfg.uniquify,
                               adjoint_max_iter=cfg.adjoint_max_iter, adjoint_tol=cfg.adjoint_tol,
                               solver=cfg.solver, stats=stats, weights=row_weights)

        if not self.pruned:
            return solve(x, self.centroids)
        parts = on_survivors(lambda rows, gi: solve(rows, self.centroids[gi:gi + 1]), x, self.mask)
        dtype = _solved_dtype(parts, self.centroids)
        centroids = torch.cat([self.centroids[gi:gi + 1].to(dtype) if p is None else p[1]
                               for gi, p in enumerate(parts)])
        x_hat = scatter_survivors([None if p is None else p[0] for p in parts], self.mask, x)
        return x_hat, centroids

    def _frozen_assign(self, x: torch.Tensor) -> torch.Tensor:
        """x [groups, m, d] -> A(C, x) C [groups, m, d] with the centroids fixed (pruned rows: 0, and the
        default tau from the survivors)."""
        cfg = self.config
        if not self.pruned:
            return frozen_soft_assign(x, self.centroids, tau=cfg.tau, chunk_size=cfg.chunk_size)
        parts = on_survivors(lambda rows, gi: frozen_soft_assign(rows, self.centroids[gi:gi + 1], tau=cfg.tau,
                                                                 chunk_size=cfg.chunk_size), x, self.mask)
        return scatter_survivors(parts, self.mask, x)

    # ---- pruning --------------------------------------------------------------------------------
    def _count_and_prune(self, weight: torch.Tensor) -> bool:
        """Count one training forward (see count_step), update the pruning mask for it (when enabled) and zero
        the pruned entries of the weight Parameter. True if clustering applies to this forward."""
        t = int(self.step)
        on = self.count_step()
        if self.enabled and self.config.sparsity > 0:
            self._update_mask(weight, t)
        if self.pruned:
            self._zero_pruned(weight)
        return on

    @torch.no_grad()
    def _update_mask(self, weight: torch.Tensor, t: int) -> None:
        """Prune up to `config.sparsity_at(t)` of the vectors (by the L2 norm of the raw weight's d-vectors).
        When the mask is first set before any clustered training step (t <= start_step), centroids already
        initialised (e.g. by an eval pass) are re-initialised from the survivors."""
        x = self.vectors(weight.detach())
        target = num_pruned(self.config.sparsity_at(t), x.shape[0] * x.shape[1])
        have = int((~self.mask).sum()) if self.pruned else 0
        if target <= have:
            return
        first = not self.pruned
        mask = magnitude_mask(x, target, self.mask if self.pruned else None)
        if first:
            self.mask = mask
        else:
            self.mask.copy_(mask)
        self._zero_pruned(weight)
        if first and self.initialized and t <= self.config.start_step:
            self.initialize(weight, force=True)

    def _weight_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The mask as bool of the weight's shape (True = kept)."""
        g, m = self.mask.shape
        return self.mask.unsqueeze(-1).expand(g, m, self.config.dim).reshape(weight.shape)

    def _masked(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with pruned entries exactly 0 (zero gradient there); unchanged when nothing is pruned."""
        return weight.masked_fill(~self._weight_mask(weight), 0) if self.pruned else weight

    @torch.no_grad()
    def _zero_pruned(self, weight: torch.Tensor) -> None:
        """Set the pruned entries of the weight Parameter to exactly 0 in place (when the weight is the
        Parameter or a view of it, and only if one is not 0: e.g. an optimizer's momentum moved it)."""
        is_param = isinstance(weight, nn.Parameter) or isinstance(weight._base, nn.Parameter)
        if not is_param:
            return
        pruned = ~self._weight_mask(weight)
        if bool(weight.masked_select(pruned).any()):
            weight.masked_fill_(pruned, 0)

    def _tie_owner(self, weight: torch.Tensor) -> "WeightClusterer":
        """The clusterer that owns this Parameter: self, or the first clusterer that saw it (tied weights,
        e.g. an embedding shared with lm_head: clustered once, one LUT)."""
        if not isinstance(weight, nn.Parameter):
            return self
        owner = _registered_owner(weight)
        if owner is None:
            weight.__dict__[_OWNER] = _OwnerRef(self)
            return self
        if owner is not self:
            if owner.config != self.config:
                raise ValueError(f"{self.name} and {owner.name} share one (tied) weight but have different configs "
                                 f"({self.config} vs {owner.config}); give both layers the same ClusterConfig")
        return owner

    def _forget_memo(self, grad: torch.Tensor) -> None:
        self._memo = None

    def tie_owner(self, weight: torch.Tensor) -> "WeightClusterer":
        """The clusterer whose LUT clusters `weight` (self unless the weight is tied to another layer's)."""
        owner = _registered_owner(weight)
        return self if owner is None else owner

    def check_finite(self, tensor: torch.Tensor, what: str) -> None:
        """Raise ValueError naming the layer, the NaN / Inf counts and the step if `tensor` is not finite."""
        if bool(torch.isfinite(tensor).all()):
            return
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise ValueError(f"{self.name}: the {what} has {nan} NaN and {inf} Inf entries (of {tensor.numel()}) at "
                         f"clustering step {int(self.step)}; k-means needs finite values (check the learning rate, "
                         "the loss scale and the data feeding this layer)")

    def _check_gradient(self, out: torch.Tensor) -> torch.Tensor:
        """Report a non-finite incoming gradient in backward, before it reaches the clustering."""
        if out.requires_grad:
            out.register_hook(lambda grad: self.check_finite(grad, "gradient of the clustered weight"))
        return out

    def freeze_lut(self, frozen: bool = True) -> "WeightClusterer":
        """Stop (or resume) updating the LUT; training then fine-tunes the weights against it."""
        self.lut_frozen = frozen
        return self

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor, force: bool = False) -> None:
        """Set the centroids from the weight with the configured init (once, unless force)."""
        if self.initialized and not force:
            return
        x = self.vectors(self._normalized(weight.detach())).to(compute_dtype(weight.dtype))
        if self.pruned:  # from the surviving vectors only
            self.centroids = init_centroids_masked(x, self.mask, self.config.k, self.config.init, self.config.seed)
        else:
            self.centroids = init_centroids(x, self.config.k, self.config.init, self.config.seed)

    def set_importance(self, importance: Optional[torch.Tensor]) -> "WeightClusterer":
        """Weight the training clustering by `importance` [weight shape] (>= 0, e.g. the diagonal Fisher
        information); None removes it. Not saved in the state dict (set it again after loading a checkpoint)."""
        if importance is not None:
            if self.config.method is Method.DKM or self.config.sparsity > 0:
                raise ValueError(f"{self.name}: an importance is not allowed with method={self.config.method.value!r}"
                                 f" / sparsity={self.config.sparsity}; it needs method 'idkm' or 'idkm_jfb' and no "
                                 "pruning")
            if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
                raise ValueError(f"{self.name}: the importance must be finite and >= 0")
            importance = importance.detach().to(torch.float32)
        self.importance = importance
        return self

    def row_weights(self, importance: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-vector weights [groups, m] (mean 1 per group) from a per-weight importance [weight shape].

        The clustering sees the normalised weight w / s, whose error costs s**2 times as much in the layer's
        weight, hence importance * s**2 (s: channel or block scales [out] / [out, blocks], or None); a d-vector
        weighs the sum of its entries."""
        f = importance.to(compute_dtype(importance.dtype))
        if scale is not None:
            f = scale_weight(f, scale.detach().to(f.dtype).square())
        w = self.vectors(f).sum(-1)
        mean = w.mean(1, keepdim=True)
        return torch.where(mean > 0, w / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.ones_like(w))

    def _training_row_weights(self, weight: torch.Tensor, scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.importance is None:
            return None
        if self.importance.shape != weight.shape:
            raise ValueError(f"{self.name}: the importance has shape {list(self.importance.shape)}, the weight "
                             f"{list(weight.shape)}")
        return self.row_weights(self.importance.to(weight.device), scale)

    def channel_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """Scales (float32; float64 for float64 weights) of a weight [out, ...]: [out], one per output channel, or
        [out, blocks] where `config.scale_block_size` splits a row (one per block of `config.scale_block(row)`
        consecutive weights). Each is max |w| or the RMS of its channel or block (`config.per_channel_scale`), 1
        where all are zero, rounded to `config.scale_dtype` (straight-through). Differentiable w.r.t. the
        weight."""
        out = weight.shape[0] if weight.dim() else 1
        w = weight.to(compute_dtype(weight.dtype)).reshape(out, -1, self._scale_block(weight))
        if self.config.per_channel_scale is ChannelScale.RMS:
            # sqrt after the all-zero test: sqrt's infinite slope at 0 would make the gradient NaN (a pruned channel)
            square = w.square().mean(2)
            scale = torch.where(square > 0, square, torch.ones_like(square)).sqrt()
        else:
            scale = w.abs().amax(2)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return self._stored_precision(scale if scale.shape[1] > 1 else scale.view(out))  # one block: per channel

    def _stored_precision(self, scale: torch.Tensor) -> torch.Tensor:
        """scale rounded to the stored scale dtype; the cast's gradient is the identity (straight-through)."""
        dtype = self.config.scale_torch_dtype
        if dtype == torch.float32:  # float32 is the compute precision already (float64 weights keep theirs)
            return scale
        info = torch.finfo(dtype)
        if bool((scale.detach() > info.max).any()):
            raise ValueError(f"{self.name}: a per-channel scale of {float(scale.detach().max()):.4g} does not fit "
                             f"scale_dtype={self.config.scale_dtype!r} (at most {info.max:g}); use 'float32'")
        rounded = scale.detach().clamp_min(info.smallest_normal).to(dtype).to(scale.dtype)
        # the gradient must not pass through the cast: a scale's gradient (-w / s**2 summed) overflows float16
        return rounded + (scale - scale.detach())

    def _normalized(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight divided by its channel scales (unchanged without per_channel_scale)."""
        if not self.config.per_channel_scale:
            return weight
        return unscale_weight(weight, self.channel_scale(weight))

    def _rescale(self, out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """out [weight shape, weight dtype] times the channel scales of `weight`, exactly as the converted
        module applies them (scale cast to the weight dtype, one multiply)."""
        if not self.config.per_channel_scale:
            return out
        scale = self.channel_scale(weight.detach()).to(torch.float32)
        return scale_weight(out, scale.to(out.dtype))

    def lut(self) -> torch.Tensor:
        """The lookup table [groups, k, d] as the converted model decodes it, in the centroid dtype:
        rounded to lut_dtype, or for "int8" the int8 entries times their per-LUT scale."""
        if not self.initialized:
            raise RuntimeError(f"{self.name}: the clusterer has no centroids yet; run a forward pass first")
        if self.config.lut_quantized:
            q, scale = self.quantized_lut()
            return (q.to(torch.float32) * scale.view(-1, 1, 1)).to(self.centroids.dtype)
        return self.centroids.to(self.config.lut_torch_dtype).to(self.centroids.dtype)

    @torch.no_grad()
    def quantized_lut(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric int8 LUT: entries int8 [groups, k, d] in -127..127 and scales float32 [groups]
        (max |centroid| / 127 per LUT; 1 for an all-zero LUT)."""
        c = self.centroids.detach().to(torch.float32)
        scale = c.abs().amax(dim=(1, 2)) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(c / scale.view(-1, 1, 1)).clamp_(-127, 127).to(torch.int8)
        return q, scale

    @torch.no_grad()
    def codes_and_lut(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard codes [groups, m] (int64) and LUT [groups, k, d] (lut_dtype; int8 entries for "int8",
        whose scales `scales()` gives) for conversion."""
        self.check_finite(weight, "weight")
        self.initialize(weight)
        lut = self.lut()
        stored = self.quantized_lut()[0] if self.config.lut_quantized else lut.to(self.config.lut_torch_dtype)
        return self._codes(weight, lut), stored

    @torch.no_grad()
    def scales(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The scales the converted module stores beside codes + LUT (empty without them):
        "channel_scale": [out] per output channel (scale_dtype); "lut_scale": float32 [groups] of an int8 LUT."""
        out: dict[str, torch.Tensor] = {}
        if self.config.per_channel_scale:
            out["channel_scale"] = self.channel_scale(weight.detach()).to(self.config.scale_torch_dtype)
        if self.config.lut_quantized:
            self.initialize(weight)
            out["lut_scale"] = self.quantized_lut()[1]
        return out

    def _codes(self, weight: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid codes [groups, m] of the (channel-normalised) weight, assigned in the LUT's
        (float32) precision whatever the weight dtype: eval mode and conversion share this, so bf16 / fp16
        models convert exactly. Pruned vectors get code 0."""
        codes = hard_assign(self.vectors(self._normalized(weight.detach())).to(lut.dtype), lut)
        return codes.masked_fill_(~self.mask, 0) if self.pruned else codes

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        for name in ("centroids", "mask"):  # lazily sized buffers take the saved shape
            key, current = prefix + name, getattr(self, name)
            if key in state_dict and state_dict[key].shape != current.shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "mask" in missing_keys and not self.pruned:  # saved before pruning existed: nothing pruned
            missing_keys.remove(prefix + "mask")
        # a checkpoint of a trained clusterer holds the fixed point of its last step: resume warm, as it would have
        self._solved = weakref.ref(self.centroids) if int(self.step) > 0 and self.initialized else None

    @torch.no_grad()
    def export(self, weight: torch.Tensor, transposed: bool = False) -> PalettizedTensor:
        """The stored form of `weight` [out, ...]: hard nearest-centroid codes against the LUT, with the LUT in
        lut_dtype, the channel and LUT scales, the pruning mask and the spec (bits, dim, shape, LUT groups, dtype),
        in one call. transposed: the layer stores the weight as its transpose (decoding transposes back)."""
        codes, lut = self.codes_and_lut(weight)
        scales = self.scales(weight)
        spec = PaletteSpec(self.config.bits, self.config.dim, tuple(weight.shape), lut.shape[0], weight.dtype,
                           transposed)
        return PalettizedTensor.build(codes, lut, spec, scales.get("channel_scale"), scales.get("lut_scale"),
                                      self.pruning_mask())

    def export_parameter(self, weight: torch.Tensor, transposed: bool = False) -> nn.Parameter:
        """`export` as a frozen Parameter, from the clusterer that owns the weight. A weight Parameter converted
        again at the same version (a tied weight, converted through each of its layers) gives the same Parameter:
        the result is noted on the weight Parameter itself, so it outlives the layers and clusterers that
        converted it (torch.ao's convert drops each QAT layer as it goes)."""
        owner = self._tie_owner(weight)
        source = weight if isinstance(weight, nn.Parameter) else weight._base
        key = None if source is None else (source._version, tuple(weight.shape), transposed, owner.config)
        memo = None if source is None else source.__dict__.get(_EXPORTED)
        if memo is not None and memo[0] == key:
            return memo[1]
        parameter = nn.Parameter(owner.export(weight, transposed), requires_grad=False)
        if source is not None:
            source.__dict__[_EXPORTED] = (key, parameter)
        return parameter

    def extra_repr(self) -> str:
        c = self.config
        pruned = f", sparsity={c.sparsity}" if c.sparsity else ""
        return (f"method={c.method.value}, bits={c.bits}, dim={c.dim}{pruned}, enabled={self.enabled}, "
                f"lut_frozen={self.lut_frozen}")


_EXPORTED = "_idkm_exported"  # on a weight Parameter: (its version, shape, layout, config) -> its palettized Parameter


class _Ref:
    """A weak reference to a tensor that compares equal only to a reference to the very same live tensor."""

    __slots__ = ("ref",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = weakref.ref(tensor)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Ref):
            return NotImplemented
        mine = self.ref()
        return mine is not None and mine is other.ref()

    def __hash__(self) -> int:
        return id(self.ref())


def _tensor_key(t: torch.Tensor) -> tuple:
    """(identity, base identity, data pointer, dtype, device, shape, stride, offset, version) of a tensor.

    A view made afresh on every call (e.g. a reshaped Parameter) matches through its base and layout."""
    base = t._base if t._base is not None else t
    return (_Ref(base), base.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride(), t.storage_offset(),
            t._version)


def _solved_dtype(parts: list, centroids: torch.Tensor) -> torch.dtype:
    """The dtype of the solved centroids among `parts` ((x_hat, c) or None), else the current centroids'."""
    return next((p[1].dtype for p in parts if p is not None), centroids.dtype)


def freeze_luts(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Freeze (or unfreeze) the LUT of every clusterer in `model`, whichever toolkit prepared it.

    (torch.ao fake-quants follow their observer switch instead: use `disable_observer`.) Returns `model`.
    """
    for module in model.modules():
        if isinstance(module, WeightClusterer):
            module.freeze_lut(frozen)
    return model
