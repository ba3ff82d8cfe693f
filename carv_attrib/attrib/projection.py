"""Random projections of per-sample gradients of selected `nn.Linear` layers.

Each selected Linear with weight W (out, in) and bias b is treated as one augmented matrix
[W | b] of shape (out, in+1) acting on [x; 1]. For one sample, its gradient is

    ∇[W|b] = Σ_t δ_t [x_t; 1]ᵀ                                                     (1)

where x_t is the layer input at token t and δ_t the gradient of the loss w.r.t. the layer output.

Two projectors map that gradient to a feature vector:

* `KronProjector` (the default, LoGra's trick, anchors-attribution.md §7a). With fixed random
  P_in (in+1, k_in) and P_out (out, k_out),

      φ_layer = P_outᵀ ∇[W|b] P_in = Σ_t (P_outᵀ δ_t)(P_inᵀ [x_t; 1])ᵀ  ∈ R^{k_out × k_in}   (2)

  flattened row-major, which equals vec(∇[W|b]) @ kron(P_out, P_in) with a row-major vec.
  Forward hooks keep only x̃ = [x; 1] P_in and tensor hooks on the layer outputs receive δ, so
  the (out × in) gradient is never formed and parameter gradients stay switched off.
* `DenseProjector` (the reference): the flattened gradient of all selected [W|b] times one
  (p × dim) matrix generated chunk by chunk. Needs real parameter gradients (`flat_grad`).
* Exact sides: a `KronProjector` layer whose out or in side is marked exact uses the identity there
  (k = that side's size, no matrix is generated); with both sides exact its block is [∇W|b] itself,
  row-major, as `flat_grad` lays it out. LoRA adapters use it (`lora_projection`): an adapter's A/B
  gradient is kept exact when small, and each layer's rank side always is.

Every projection matrix is a function of (seed, layer name, role) alone (a SHA-256 of them seeds a
CPU `torch.Generator`), so every machine and every run builds the same matrices. Entries have
variance 1/k, so E[P Pᵀ] = I and projected inner products are unbiased estimates of the
gradient inner products (Johnson–Lindenstrauss); for Kronecker matrices
E[(P_out ⊗ P_in)(P_out ⊗ P_in)ᵀ] = E[P_out P_outᵀ] ⊗ E[P_in P_inᵀ] = I as well.

Feature size for Wan2.1-T2V-1.3B with the defaults (`DEFAULT_PATTERNS`, k_out = k_in = 16):
30 blocks × 10 Linear layers = 300 layers × 256 = D = 76,800 features per clip, standing in for
1,392,668,160 gradient entries (per block: 8 attention Linears of 1536 × 1537, ffn.net.0.proj
8960 × 1537 and ffn.net.2 1536 × 8961).

Usage::

    layers = select_linear_layers(model)                      # every Linear inside `blocks.*`
    proj = KronProjector(model, layers, seed=0, k_in=8, k_out=8)
    with proj.capture(num_slots=B):
        total = 0.0
        for b in range(B):
            proj.slot = b                                     # the next forward belongs to clip b
            total = total + loss_of_clip(model, b)            # one forward over its K draws
        total.backward()                                      # one backward, hooks fill the slots
    feats = proj.features()                                   # (B, D) float32
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from carv_attrib.attrib.gradients import ClipDraws, dense_features, kron_features
from carv_attrib.choices import MATRIX_KINDS, PROJECTORS

log = logging.getLogger(__name__)

DEFAULT_PATTERNS: tuple[str, ...] = ("blocks.*",)
# 16x16 per layer: on the LDS worlds of bench/factors.py, 8x8 lost 0.1-0.2 LDS against the exact
# gradient (the projection's error, not the estimator's), 12x12 to 32x32 recovered it.
DEFAULT_K_IN = 16
DEFAULT_K_OUT = 16
DEFAULT_DENSE_DIM = 1280  # the dense reference projector's default total dimension
# A LoRA adapter's gradient (Σ r·(in + out) over its adapted layers) up to this size is kept exact
# (identity projection, 256 KiB per clip in float32); above it, each lora_A / lora_B Linear keeps its
# rank side exact and projects its wide side (`lora_projection`). Wan2.1-1.3B's attention LoRA at rank
# 4 is 2.9 M numbers: projected, 16 per rank row and column (D = 240 layers x 128 = 30,720).
LORA_EXACT_MAX_DIM = 1 << 16
# What a LoRA projector spec records as its "patterns": the globs that select exactly the adapter's
# Linear modules (`carv_attrib.models.lora.lora_layers`).
LORA_PATTERNS = ("*.lora_A.default", "*.lora_B.default")
DENSE_CHUNK_ROWS = 65536
RNG_RULE = "torch.Generator(cpu).manual_seed(sha256('seed|name|role')[:8] & (2**63-1))"


# --------------------------------------------------------------------------------------------
# Parameter selection
# --------------------------------------------------------------------------------------------


def select_linear_layers(
    model: nn.Module, patterns: Sequence[str] = DEFAULT_PATTERNS
) -> list[tuple[str, nn.Linear]]:
    """Every `nn.Linear` whose module name matches one of the fnmatch glob `patterns`.

    The order is `model.named_modules()` order; it fixes the layer order of the features.
    `"*"` matches dots too, so `"blocks.*"` is every Linear inside the transformer blocks: for
    Wan2.1-T2V-1.3B that is 300 layers (30 blocks × 10), i.e. D = 300 · 8 · 8 = 19,200 features
    at the default 8 × 8 per layer, for 1.39 B gradient entries.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [(n, m) for n, m in linears if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        examples = ", ".join(n for n, _ in linears[:6]) or "none"
        raise ValueError(
            f"no nn.Linear module matches the patterns {list(patterns)}; "
            f"the model has {len(linears)} Linear layers (e.g. {examples}). Change the patterns."
        )
    return chosen


def augmented_shape(layer: nn.Linear) -> tuple[int, int]:
    """(out, in_aug): the shape of [W | b], in_aug = in + 1 when the layer has a bias."""
    return layer.out_features, layer.in_features + (layer.bias is not None)


def _layers_from_spec(model: nn.Module, entries: Sequence[Mapping[str, Any]]) -> list[tuple[str, nn.Linear]]:
    """The layers named in a projector spec, checked against the shapes recorded there."""
    modules = dict(model.named_modules())
    layers = []
    for entry in entries:
        module = modules.get(entry["name"])
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layer {entry['name']} of the projector spec is not a Linear of this model")
        if augmented_shape(module) != (entry["out"], entry["in_aug"]):
            raise ValueError(
                f"layer {entry['name']} has shape {augmented_shape(module)} in this model but "
                f"{(entry['out'], entry['in_aug'])} in the projector spec: another model?"
            )
        layers.append((entry["name"], module))
    return layers


# --------------------------------------------------------------------------------------------
# Projection matrices
# --------------------------------------------------------------------------------------------


def _stable_seed(*parts: object) -> int:
    """A 63-bit generator seed from a SHA-256 of `parts` (Python's hash() is salted per process)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _random_matrix(gen_seed: int, rows: int, cols: int, kind: str, scale: float) -> torch.Tensor:
    """(rows, cols) float32 on the CPU: N(0, 1) or ±1 entries times `scale`."""
    gen = torch.Generator(device="cpu").manual_seed(gen_seed)
    if kind == "gaussian":
        mat = torch.randn(rows, cols, generator=gen, dtype=torch.float32)
    elif kind == "rademacher":
        mat = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.float32).mul_(2).sub_(1)
    else:
        raise ValueError(f"unknown projection matrix kind {kind!r}; use one of {MATRIX_KINDS}")
    return mat.mul_(scale)


def layer_matrices(
    seed: int, name: str, in_aug: int, out: int, k_in: int, k_out: int, kind: str = "gaussian"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_in (in_aug, k_in), P_out (out, k_out)) of one layer, float32 on the CPU.

    A function of (seed, name, role) only; entries scaled by 1/sqrt(k) so that E[P Pᵀ] = I.
    """
    p_in = _random_matrix(_stable_seed(seed, name, "in"), in_aug, k_in, kind, 1.0 / math.sqrt(k_in))
    p_out = _random_matrix(_stable_seed(seed, name, "out"), out, k_out, kind, 1.0 / math.sqrt(k_out))
    return p_in, p_out


def shapes_for_total_dim(
    layers: Sequence[tuple[str, nn.Linear]], proj_dim: int
) -> dict[str, tuple[int, int]]:
    """Split a total feature dimension evenly: k_out = k_in = max(1, floor(sqrt(proj_dim / n_layers))).

    The exact resulting dimension (n_layers · k²) is logged; it is at most `proj_dim` unless
    proj_dim < n_layers, where every layer still gets one feature.
    """
    if proj_dim < 1:
        raise ValueError(f"proj_dim must be >= 1, got {proj_dim}")
    k = max(1, math.isqrt(proj_dim // len(layers)))  # isqrt(floor(x)) == floor(sqrt(x))
    shapes = {name: (k, k) for name, _ in layers}
    log.info(
        "proj_dim %d over %d layers: %d x %d per layer, exact dim %d",
        proj_dim,
        len(layers),
        k,
        k,
        k * k * len(layers),
    )
    return shapes


# --------------------------------------------------------------------------------------------
# Kronecker (LoGra) projector
# --------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    name: str
    module: nn.Linear
    out: int
    in_aug: int
    k_out: int
    k_in: int
    p_in: torch.Tensor | None  # (in_aug, k_in), CPU; None: the identity (k_in = in_aug, exact side)
    p_out: torch.Tensor | None  # (out, k_out), CPU; None: the identity (k_out = out, exact side)
    on_device: dict[torch.device, tuple[torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict
    )

    def matrices(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(P_in, P_out) on `device` (None for an exact side), copied once per device."""
        if device not in self.on_device:
            self.on_device[device] = (
                None if self.p_in is None else self.p_in.to(device),
                None if self.p_out is None else self.p_out.to(device),
            )
        return self.on_device[device]


class Projector(Protocol):
    """What featurize needs of a projector (`KronProjector`, `DenseProjector`)."""

    dim: int

    def batch_features(
        self,
        transformer: nn.Module,
        batch: Sequence[ClipDraws],
        output_fn: str = "loss",
        draws_per_backward: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def spec(self) -> dict[str, Any]: ...


def projector_from_spec(model: nn.Module, spec: Mapping[str, Any]) -> KronProjector | DenseProjector:
    """The projector a `spec()` describes, rebuilt on `model` (same layers, same matrices).
    ValueError for a kind outside `PROJECTORS`."""
    cls = PROJECTOR_CLASSES.get(spec.get("kind"))
    if cls is None:
        raise ValueError(
            f"unknown projector kind {spec.get('kind')!r}; expected one of {', '.join(PROJECTORS)}"
        )
    return cls.from_spec(model, spec)


class KronProjector:
    """Per-layer Kronecker projection of per-sample gradients, eq. (2), computed with hooks.

    `layers` come from `select_linear_layers`. Each layer gets (k_out, k_in) from `shapes` when
    listed there, else (`k_out`, `k_in`). Features are the concatenation over layers, in the
    order of `layers`, of φ_layer flattened row-major: D = Σ k_out · k_in.

    While `capture()` is open, every parameter of `model` has requires_grad False (restored on
    exit), and the forward of a selected layer records x̃ = [x; 1] P_in under the current
    `slot`: an int (the whole forward belongs to one sample) or a 1-D integer tensor with one
    slot id per input row. The backward (once, after any number of forwards) projects δ and adds
    (P_outᵀ δ_t)(x̃_t)ᵀ summed over tokens into that slot's accumulator.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[tuple[str, nn.Linear]],
        seed: int = 0,
        k_in: int = DEFAULT_K_IN,
        k_out: int = DEFAULT_K_OUT,
        kind: str = "gaussian",
        shapes: Mapping[str, tuple[int, int]] | None = None,
        patterns: Sequence[str] | None = None,
        exact: Mapping[str, tuple[bool, bool]] | None = None,
        lora: bool = False,
    ) -> None:
        if not layers:
            raise ValueError("KronProjector needs at least one layer; see select_linear_layers")
        if kind not in MATRIX_KINDS:
            raise ValueError(f"unknown projection matrix kind {kind!r}; use one of {MATRIX_KINDS}")
        shapes = dict(shapes or {})
        unknown = set(shapes) - {n for n, _ in layers}
        if unknown:
            raise ValueError(f"shapes given for layers that are not selected: {sorted(unknown)}")
        exact = dict(exact or {})
        unknown = set(exact) - {n for n, _ in layers}
        if unknown:
            raise ValueError(f"exact sides given for layers that are not selected: {sorted(unknown)}")
        self.model = model
        self.lora = bool(lora)
        self.seed = int(seed)
        self.kind = kind
        self.patterns = list(patterns) if patterns is not None else None
        self._layers: list[_Layer] = []
        for name, module in layers:
            out, in_aug = augmented_shape(module)
            ko, ki = shapes.get(name, (k_out, k_in))
            ex_out, ex_in = exact.get(name, (False, False))
            ko, ki = (out if ex_out else ko), (in_aug if ex_in else ki)
            if ko < 1 or ki < 1:
                raise ValueError(f"layer {name}: k_out and k_in must be >= 1, got ({ko}, {ki})")
            # layer_matrices' two matrices, the exact sides' left out (never generated)
            p_in = (
                None
                if ex_in
                else _random_matrix(
                    _stable_seed(self.seed, name, "in"), in_aug, ki, kind, 1.0 / math.sqrt(ki)
                )
            )
            p_out = (
                None
                if ex_out
                else _random_matrix(_stable_seed(self.seed, name, "out"), out, ko, kind, 1.0 / math.sqrt(ko))
            )
            self._layers.append(_Layer(name, module, out, in_aug, ko, ki, p_in, p_out))
        self._slot: int | torch.Tensor | None = None
        self._acc: list[torch.Tensor] | None = None  # per layer (num_slots, k_out, k_in)
        self._num_slots = 0
        self._handles: list[Any] = []
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._capturing = False

    # -- description -------------------------------------------------------------------------

    @property
    def layer_dims(self) -> list[tuple[str, int, int]]:
        """[(name, k_out, k_in)] in feature order."""
        return [(ly.name, ly.k_out, ly.k_in) for ly in self._layers]

    @property
    def dim(self) -> int:
        """D = Σ_layers k_out · k_in."""
        return sum(ly.k_out * ly.k_in for ly in self._layers)

    @property
    def grad_dim(self) -> int:
        """p = Σ_layers out · in_aug: the size of the gradient this projects."""
        return sum(ly.out * ly.in_aug for ly in self._layers)

    def matrices(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """[(name, P_in (in_aug, k_in), P_out (out, k_out))] in feature order (CPU tensors); an exact
        side as its identity matrix."""
        return [
            (
                ly.name,
                torch.eye(ly.in_aug) if ly.p_in is None else ly.p_in,
                torch.eye(ly.out) if ly.p_out is None else ly.p_out,
            )
            for ly in self._layers
        ]

    @property
    def exact(self) -> bool:
        """Every side of every layer exact: the features are the gradient itself (D = grad_dim)."""
        return all(ly.p_in is None and ly.p_out is None for ly in self._layers)

    def spec(self) -> dict[str, Any]:
        """JSON-able description; `from_spec` rebuilds the same projector from it. An exact side is
        recorded as "exact_out" / "exact_in": true on its layer, a LoRA projector as "lora": true (both
        absent otherwise, so the specs of earlier runs are unchanged)."""
        layers = []
        for ly in self._layers:
            entry: dict[str, Any] = {
                "name": ly.name, "out": ly.out, "in_aug": ly.in_aug, "k_out": ly.k_out, "k_in": ly.k_in
            }  # fmt: skip
            if ly.p_out is None:
                entry["exact_out"] = True
            if ly.p_in is None:
                entry["exact_in"] = True
            layers.append(entry)
        spec = {
            "kind": "kron",
            "seed": self.seed,
            "matrix": self.kind,
            "patterns": self.patterns,
            "rng": RNG_RULE,
            "dim": self.dim,
            "layers": layers,
        }
        return spec | ({"lora": True} if self.lora else {})

    @classmethod
    def build(
        cls,
        model: nn.Module,
        layers: list[tuple[str, nn.Linear]],
        *,
        patterns: Sequence[str],
        seed: int = 0,
        matrix: str = "gaussian",
        proj_dim: int | None = None,
        kron_dims: tuple[int, int] | None = None,
        lora: bool = False,
    ) -> KronProjector:
        """A new projector from featurize's options: (k_out, k_in) = `kron_dims` per layer (default
        DEFAULT_K_OUT×DEFAULT_K_IN), or a total `proj_dim` split over `layers` (`shapes_for_total_dim`).
        `lora`: `layers` are an adapter's lora_A / lora_B Linears, projected by `lora_projection`
        (exact when small). ValueError for both at once."""
        if proj_dim and kron_dims:
            raise ValueError("give --proj-dim (a total) or --kron-dims (per layer), not both")
        if lora:
            shapes, exact = lora_projection(layers, proj_dim, kron_dims)
            return cls(
                model, layers, seed=seed, kind=matrix, shapes=shapes, exact=exact, patterns=list(patterns),
                lora=True,
            )  # fmt: skip
        shapes = shapes_for_total_dim(layers, proj_dim) if proj_dim else None
        k_out, k_in = kron_dims or (DEFAULT_K_OUT, DEFAULT_K_IN)
        return cls(
            model,
            layers,
            seed=seed,
            kind=matrix,
            shapes=shapes,
            patterns=list(patterns),
            k_in=k_in,
            k_out=k_out,
        )

    @classmethod
    def from_spec(cls, model: nn.Module, spec: Mapping[str, Any]) -> KronProjector:
        """The projector described by `spec()` on `model` (same layers, shapes, matrices)."""
        if spec.get("kind") != "kron":
            raise ValueError(f"not a kron projector spec: kind={spec.get('kind')!r}")
        layers = _layers_from_spec(model, spec["layers"])
        shapes = {e["name"]: (e["k_out"], e["k_in"]) for e in spec["layers"]}
        exact = {
            e["name"]: (bool(e.get("exact_out")), bool(e.get("exact_in")))
            for e in spec["layers"]
            if e.get("exact_out") or e.get("exact_in")
        }
        return cls(
            model,
            layers,
            seed=spec["seed"],
            kind=spec["matrix"],
            shapes=shapes,
            patterns=spec.get("patterns"),
            exact=exact,
            lora=bool(spec.get("lora")),
        )

    # -- capture -----------------------------------------------------------------------------

    @property
    def slot(self) -> int | torch.Tensor | None:
        """The sample(s) the next forward belongs to: an int, or one slot id per input row."""
        return self._slot

    @slot.setter
    def slot(self, value: int | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
                raise ValueError("a slot tensor must be 1-D integer: one slot id per input row")
            if value.numel() and (int(value.min()) < 0 or int(value.max()) >= self._num_slots):
                raise ValueError(f"slot ids must lie in [0, {self._num_slots}); got {value.tolist()}")
            value = value.to(torch.long)
        else:
            value = int(value)
            if not 0 <= value < self._num_slots:
                raise ValueError(f"slot must lie in [0, {self._num_slots}); got {value}")
        self._slot = value

    @contextlib.contextmanager
    def capture(self, num_slots: int) -> Iterator[KronProjector]:
        """Attach the hooks, zero `num_slots` accumulators; detach and restore requires_grad on exit.

        Run the forwards *and* the backward inside the block.
        """
        if self._capturing:
            raise RuntimeError("KronProjector.capture() is already open; it does not nest")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self._num_slots = int(num_slots)
        self._acc = [
            torch.zeros(num_slots, ly.k_out, ly.k_in, dtype=torch.float32, device=ly.module.weight.device)
            for ly in self._layers
        ]
        self._slot = None
        # No parameter gradient is needed: the hooks see δ directly. Switching them off also
        # keeps autograd from allocating (out × in) weight gradients.
        self._saved_requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._saved_requires_grad:
            p.requires_grad_(False)
        self._handles = [
            ly.module.register_forward_hook(self._make_forward_hook(i)) for i, ly in enumerate(self._layers)
        ]
        self._capturing = True
        try:
            yield self
        finally:
            self._capturing = False
            for h in self._handles:
                h.remove()
            self._handles = []
            for p, flag in self._saved_requires_grad:
                p.requires_grad_(flag)
            self._saved_requires_grad = []
            self._slot = None

    def batch_features(
        self,
        transformer: nn.Module,
        batch: Sequence[ClipDraws],
        output_fn: str = "loss",
        draws_per_backward: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, D) float32, per-draw losses (B, K)): one backward over all B×K draws, or one
        per `draws_per_backward` draws of a clip (`kron_features`)."""
        return kron_features(transformer, self, batch, output_fn, draws_per_backward)

    def features(self) -> torch.Tensor:
        """(num_slots, D) float32 on the CPU: the accumulated φ of the last capture."""
        if self._acc is None:
            raise RuntimeError("no features yet: run forwards and a backward inside capture()")
        return torch.cat([a.reshape(a.shape[0], -1).cpu() for a in self._acc], dim=1)

    # -- hooks -------------------------------------------------------------------------------

    def _rows_slot(self, layer: _Layer, rows: int) -> int | torch.Tensor:
        """The slot spec valid for an input with `rows` leading rows, captured at forward time."""
        slot = self._slot
        if slot is None:
            raise RuntimeError("set KronProjector.slot before running a forward inside capture()")
        if isinstance(slot, int):
            return slot
        if slot.numel() == rows:
            return slot
        # A broadcast input (e.g. a batch-1 text context for attn2.to_k/to_v) can only be
        # attributed to one sample.
        if rows == 1 and slot.numel() > 0 and bool((slot == slot[0]).all()):
            return int(slot[0])
        raise ValueError(
            f"layer {layer.name} got an input with {rows} rows but the slot tensor has {slot.numel()} "
            "ids; a broadcast input cannot be split per row. Give every row its own inputs (e.g. a "
            "per-row text context) or run one forward per sample with an int slot."
        )

    def _make_forward_hook(self, idx: int):
        layer = self._layers[idx]

        def forward_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                return  # a no-grad evaluation pass: nothing will flow back
            x = args[0]
            rows = x.shape[0] if x.dim() >= 2 else 1
            slot = self._rows_slot(layer, rows)
            p_in, _ = layer.matrices(x.device)
            with torch.no_grad():
                x3 = x.reshape(rows, -1, x.shape[-1]).float()  # (N, T, in)
                if p_in is None:  # an exact side: x̃ = [x; 1] itself
                    xt = (
                        x3
                        if layer.in_aug == x3.shape[-1]
                        else torch.cat([x3, torch.ones_like(x3[..., :1])], -1)
                    )
                else:
                    # [x; 1] P_in = x P_in[:in] + P_in[in]: the bias row without building [x; 1]
                    xt = x3 @ p_in[: x3.shape[-1]]  # (N, T, k_in)
                    if layer.in_aug > x3.shape[-1]:
                        xt += p_in[-1]
            if not output.requires_grad:
                # No parameter requires grad, so the first selected layer's output is a fresh
                # leaf: nothing upstream of it feeds a selected layer's gradient.
                output.requires_grad_()
            output.register_hook(self._make_grad_hook(idx, xt, slot, rows, self._acc))

        return forward_hook

    def _make_grad_hook(
        self, idx: int, xt: torch.Tensor, slot: int | torch.Tensor, rows: int, acc_list: list[torch.Tensor]
    ):
        layer = self._layers[idx]

        def grad_hook(grad: torch.Tensor) -> None:
            if not self._capturing or acc_list is not self._acc:
                raise RuntimeError(
                    f"backward reached layer {layer.name} after its capture() block closed; "
                    "call backward inside the block"
                )
            _, p_out = layer.matrices(grad.device)
            acc = acc_list[idx]  # (S, k_out, k_in)
            with torch.no_grad():
                dt = grad.reshape(rows, -1, layer.out).float()  # (N, T, out)
                if p_out is not None:
                    dt = dt @ p_out  # (N, T, k_out)
                if isinstance(slot, int):
                    # Σ_{rows, tokens} (P_outᵀ δ)(x̃)ᵀ as one matmul: (k_out, N·T) @ (N·T, k_in)
                    acc[slot] += dt.reshape(-1, layer.k_out).T @ xt.reshape(-1, layer.k_in)
                else:
                    phi = dt.transpose(1, 2) @ xt  # (N, k_out, k_in), summed over tokens
                    acc.index_add_(0, slot.to(acc.device), phi.to(acc.device))

        return grad_hook


def lora_projection(
    layers: Sequence[tuple[str, nn.Linear]],
    proj_dim: int | None = None,
    kron_dims: tuple[int, int] | None = None,
) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[bool, bool]]]:
    """(shapes, exact) for a KronProjector over a LoRA adapter's Linears (lora_A (r, in), lora_B
    (out, r)): "projected or exact when small".

    The whole gradient p = Σ r·(in + out) is kept exact (identity on both sides, D = p) when p fits:
    p ≤ `proj_dim` when one is given, else p ≤ LORA_EXACT_MAX_DIM with neither option. Otherwise each
    layer keeps its rank side exact (r numbers, already small) and projects its wide side (in of A,
    out of B) to k: `kron_dims` (k_in for A, k_out for B), or proj_dim // Σ r (so D ≤ proj_dim), or
    DEFAULT_K_IN; a wide side no larger than k stays exact too."""
    p = sum(out * in_aug for out, in_aug in (augmented_shape(m) for _, m in layers))
    fits = p <= proj_dim if proj_dim else (kron_dims is None and p <= LORA_EXACT_MAX_DIM)
    if fits:
        return {}, {name: (True, True) for name, _ in layers}
    ranks = [(name, ".lora_A." in f".{name}.", m) for name, m in layers]
    rank_total = sum((m.out_features if is_a else m.in_features) for _, is_a, m in ranks)
    if proj_dim:
        k_a = k_b = max(1, proj_dim // rank_total)
    elif kron_dims:
        k_b, k_a = kron_dims
    else:
        k_a = k_b = DEFAULT_K_IN
    shapes: dict[str, tuple[int, int]] = {}
    exact: dict[str, tuple[bool, bool]] = {}
    for name, is_a, m in ranks:
        out, in_aug = augmented_shape(m)
        if is_a:  # (r, in): rows are the rank side
            shapes[name] = (out, min(k_a, in_aug))
            exact[name] = (True, k_a >= in_aug)
        else:  # (out, r): columns are the rank side
            shapes[name] = (min(k_b, out), in_aug)
            exact[name] = (k_b >= out, True)
    log.info("LoRA gradient of %d numbers over %d layers: projected to %d", p, len(layers),
             sum(a * b for a, b in shapes.values()))  # fmt: skip
    return shapes, exact


def kron_matrix(proj: KronProjector) -> torch.Tensor:
    """(p, D) block-diagonal matrix with blocks kron(P_out, P_in): φ = flat_grad @ it (tests only)."""
    return torch.block_diag(*[torch.kron(p_out, p_in) for _, p_in, p_out in proj.matrices()])


# --------------------------------------------------------------------------------------------
# Dense reference projector
# --------------------------------------------------------------------------------------------


class DenseProjector:
    """g @ P for a flattened gradient g (p,) or (B, p) and a (p, dim) JL matrix.

    P is generated in row chunks of `chunk_rows`: chunk c comes from a generator seeded by
    hash(seed, "dense", c), scaled 1/sqrt(dim). For large p the full matrix is never stored.
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, nn.Linear]],
        seed: int = 0,
        dim: int = 1024,
        kind: str = "gaussian",
        chunk_rows: int = DENSE_CHUNK_ROWS,
    ) -> None:
        if kind not in MATRIX_KINDS:
            raise ValueError(f"unknown projection matrix kind {kind!r}; use one of {MATRIX_KINDS}")
        if dim < 1 or chunk_rows < 1:
            raise ValueError(f"dim and chunk_rows must be >= 1, got {dim}, {chunk_rows}")
        self.seed = int(seed)
        self.dim = int(dim)
        self.kind = kind
        self.chunk_rows = int(chunk_rows)
        self.layer_shapes = [(name, *augmented_shape(m)) for name, m in layers]  # (name, out, in_aug)
        self.grad_dim = sum(out * in_aug for _, out, in_aug in self.layer_shapes)

    def _chunk(self, c: int) -> torch.Tensor:
        """Rows [c·chunk_rows, (c+1)·chunk_rows) of P, (rows_c, dim) float32 on the CPU."""
        rows = min(self.chunk_rows, self.grad_dim - c * self.chunk_rows)
        return _random_matrix(
            _stable_seed(self.seed, "dense", c), rows, self.dim, self.kind, 1.0 / math.sqrt(self.dim)
        )

    def matrix(self) -> torch.Tensor:
        """The full (p, dim) matrix (small p only: tests)."""
        n_chunks = math.ceil(self.grad_dim / self.chunk_rows)
        return torch.cat([self._chunk(c) for c in range(n_chunks)])

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """(p,) -> (dim,) or (B, p) -> (B, dim), float32 on g's device."""
        if g.shape[-1] != self.grad_dim or g.dim() not in (1, 2):
            raise ValueError(
                f"expected a gradient of shape (p,) or (B, p) with p={self.grad_dim}, got {tuple(g.shape)}"
            )
        g2 = g.reshape(-1, self.grad_dim).float()  # (B, p)
        out = torch.zeros(g2.shape[0], self.dim, dtype=torch.float32, device=g.device)
        for c, start in enumerate(range(0, self.grad_dim, self.chunk_rows)):
            chunk = self._chunk(c).to(g.device)  # (rows_c, dim)
            out += g2[:, start : start + chunk.shape[0]] @ chunk
        return out.reshape(*g.shape[:-1], self.dim)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        layers: list[tuple[str, nn.Linear]],
        *,
        patterns: Sequence[str],
        seed: int = 0,
        matrix: str = "gaussian",
        proj_dim: int | None = None,
        kron_dims: tuple[int, int] | None = None,
        lora: bool = False,  # the layers are an adapter's: nothing changes for a dense matrix
    ) -> DenseProjector:
        """A new projector from featurize's options: one (p, `proj_dim`) JL matrix (default
        DEFAULT_DENSE_DIM). ValueError for `kron_dims`, which only kron takes."""
        if kron_dims:
            raise ValueError("--kron-dims applies to --projector kron only; give --proj-dim for dense")
        return cls(layers, seed=seed, dim=proj_dim or DEFAULT_DENSE_DIM, kind=matrix)

    @classmethod
    def from_spec(cls, model: nn.Module, spec: Mapping[str, Any]) -> DenseProjector:
        """The projector described by `spec()` on `model` (same layers, same matrix)."""
        if spec.get("kind") != "dense":
            raise ValueError(f"not a dense projector spec: kind={spec.get('kind')!r}")
        layers = _layers_from_spec(model, spec["layers"])
        return cls(
            layers, seed=spec["seed"], dim=spec["dim"], kind=spec["matrix"], chunk_rows=spec["chunk_rows"]
        )

    def layers_in(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        """This projector's layers, looked up by name in `model` (a transformer of the same config)."""
        modules = dict(model.named_modules())
        return [(name, modules[name]) for name, _, _ in self.layer_shapes]

    def batch_features(
        self,
        transformer: nn.Module,
        batch: Sequence[ClipDraws],
        output_fn: str = "loss",
        draws_per_backward: int | None = None,  # the reference does one backward per clip anyway
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, D) float32, per-draw losses (B, K)): one backward per clip, dense projection."""
        return dense_features(transformer, self.layers_in(transformer), self, batch, output_fn)

    def spec(self) -> dict[str, Any]:
        """JSON-able description for provenance; `from_spec` rebuilds the projector from it."""
        return {
            "kind": "dense",
            "seed": self.seed,
            "matrix": self.kind,
            "dim": self.dim,
            "chunk_rows": self.chunk_rows,
            "rng": RNG_RULE,
            "grad_dim": self.grad_dim,
            "layers": [{"name": n, "out": o, "in_aug": i} for n, o, i in self.layer_shapes],
        }


# The projector classes by `spec()["kind"]`, the names of `carv_attrib.choices.PROJECTORS`.
PROJECTOR_CLASSES: dict[str, type[KronProjector] | type[DenseProjector]] = {
    "kron": KronProjector,
    "dense": DenseProjector,
}
assert tuple(PROJECTOR_CLASSES) == PROJECTORS, "choices.PROJECTORS and PROJECTOR_CLASSES must agree"
