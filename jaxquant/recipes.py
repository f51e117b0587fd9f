"""Quantization recipes: which parameters to quantize, and how.

A :class:`Recipe` is an ordered tuple of :class:`Rule`; each rule's regular
expression is matched (``re.fullmatch``) against parameter paths such as
``layers.3.mlp.down_proj.weight`` (see ``docs/models.md``), and the first rule that
matches a path decides: quantize with its :class:`QuantSpec`, or keep in float when
its spec is ``None``. Paths no rule matches stay in float. Only 2-D weights can be
quantized: a rule that selects a norm or a bias is an error (``quantize`` names it).

The default recipe quantizes every linear layer of every block and keeps the
embeddings, ``lm_head`` and norms in float.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from jaxquant.errors import JaxquantError

#: Every linear layer inside the decoder blocks.
BLOCK_LINEARS = r"layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight"
#: Methods ``quantize`` knows; later modules add calibration-based ones.
METHODS = ("rtn", "gptq", "slim", "slim+", "claq")
#: Methods that need calibration data (layer Hessians).
CALIBRATED = ("gptq", "slim", "slim+", "claq")
#: Mixed-precision methods: ``bits`` is the average over groups of N-1, N and N+1 bits.
MIXED = ("slim", "slim+")
SCALE_DTYPES = ("bfloat16", "float16", "float32")


class RecipeError(JaxquantError):
    """A recipe that cannot be applied (bad regex, bits, group size)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize one weight."""

    method: str = "rtn"  # algorithm: rtn, or gptq / slim / slim+ / claq (need calibration)
    bits: int | float = 4  # code width, 2..8; slim/slim+: exact average, 2..7; claq: 2..8 avg
    group_size: int | None = 128  # input channels per scale; None: per output channel
    symmetric: bool = False  # symmetric range (no zeros stored)
    scale_dtype: str = "bfloat16"  # dtype of scales and zeros
    act_order: bool = False  # GPTQ: process columns by decreasing Hessian diagonal
    static_groups: bool = False  # GPTQ: find group scales up front from the float weights
    damp: float = 0.01  # GPTQ: relative Hessian damping (raised when Cholesky fails)
    block_size: int = 128  # GPTQ: columns per lazy batch update
    mse: bool = False  # GPTQ: search each group's range (shrink 1..0.21, |err|^2.4)
    salience_weight: float = 4.0  # SliM-LLM SQC: error weight of salient weights (ref.: 1)
    lwc_epochs: int = 10  # SliM-LLM+: passes over the calibration batches per block
    lwc_lr: float = 5e-3  # SliM-LLM+: AdamW learning rate of the clipping parameters
    lwc_dtype: str = "float32"  # SliM-LLM+: training compute dtype (bfloat16: faster on GPU)
    outlier_ratio: float = 0.0  # CLAQ: fraction of weights kept in float (0: no reservation)
    adaptive: bool = True  # CLAQ: outlier-heavy columns get 4 bits (fractional budgets)
    kmeans: bool = True  # CLAQ: K-Means codebooks (False: evenly spaced levels, ablation)
    total_bits: bool = False  # CLAQ: bits averages everything stored, not the code width

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RecipeError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        integral = isinstance(self.bits, int) and not isinstance(self.bits, bool)
        if self.method == "claq":
            from jaxquant.algorithms.claq import ClaqConfig  # its rules, not a copy

            if not isinstance(self.bits, (int, float)) or isinstance(self.bits, bool):
                raise RecipeError(f"CLAQ needs an average of 2 to 8 bits, got {self.bits!r}")
            try:
                ClaqConfig(bits=self.bits, adaptive=self.adaptive,
                           outlier_ratio=self.outlier_ratio, total_bits=self.total_bits)
            except ValueError as e:
                raise RecipeError(f"claq: {e}") from e
            if self.group_size is not None:
                raise RecipeError("CLAQ's codebooks are per input channel, without groups: "
                                  "drop --group-size")
        elif not integral or not 2 <= self.bits <= 8:
            raise RecipeError(f"unsupported bit width {self.bits!r}: use 2 to 8 (fractional "
                              "averages: --method claq)")
        if self.group_size is not None and (not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise RecipeError(f"group size must be a positive integer, got {self.group_size!r}")
        if self.method in MIXED and self.bits > 7:
            raise RecipeError(f"{self.method} averages N-1/N/N+1 bits: use N from 2 to 7")
        if self.method in MIXED and self.symmetric:
            raise RecipeError(f"{self.method} stores asymmetric groups (1-bit groups need a "
                              "zero point): drop --sym")
        if self.method in MIXED and self.group_size is None:
            raise RecipeError(f"{self.method} allocates bits per group: give a group size")
        if self.lwc_dtype not in ("float32", "bfloat16"):
            raise RecipeError(f"lwc dtype must be float32 or bfloat16, got {self.lwc_dtype!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise RecipeError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got "
                              f"{self.scale_dtype!r}")

    def describe(self) -> str:
        """``rtn 4-bit asym g128`` style label."""
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        act = " act-order" if self.act_order and self.method in CALIBRATED else ""
        if self.method == "claq":
            parts = [p for p, on in (("kmeans", self.kmeans), ("adaptive", self.adaptive),
                                     (f"outliers {self.outlier_ratio:g}", self.outlier_ratio > 0))
                     if on]
            width = f"{self.bits:g}-bit{' total' if self.total_bits else ''}"
            return f"claq {width} per-column {'+'.join(parts) or 'uniform'}{act}"
        return f"{self.method} {self.bits}-bit {'sym' if self.symmetric else 'asym'} {group}{act}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Parameters whose path fully matches ``pattern`` get ``spec`` (None: stay float)."""

    pattern: str  # regular expression, matched with re.fullmatch against parameter paths
    spec: QuantSpec | None  # how to quantize them; None keeps them in float

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise RecipeError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from e

    def matches(self, path: str) -> bool:
        """True if the rule applies to ``path``."""
        return re.fullmatch(self.pattern, path) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """An ordered set of rules; the first rule matching a path decides."""

    rules: tuple[Rule, ...]  # tried in order

    @classmethod
    def uniform(cls, spec: QuantSpec, pattern: str = BLOCK_LINEARS) -> Recipe:
        """One spec for every parameter matching ``pattern`` (default: block linears)."""
        return cls(rules=(Rule(pattern=pattern, spec=spec),))

    def plan(self, paths: Iterable[str]) -> tuple[dict[str, QuantSpec], list[Rule]]:
        """Assigns specs to ``paths``.

        Returns:
          ``(specs, unused)``: the spec of every path to quantize, and the rules that
          matched no path (usually a typo in a pattern).
        """
        specs: dict[str, QuantSpec] = {}
        used: set[int] = set()
        for path in paths:
            for i, rule in enumerate(self.rules):
                if rule.matches(path):
                    used.add(i)
                    if rule.spec is not None:
                        specs[path] = rule.spec
                    break
        return specs, [r for i, r in enumerate(self.rules) if i not in used]

    def to_dict(self) -> dict[str, Any]:
        """JSON form; inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """Rebuilds a recipe written by :meth:`to_dict`."""
        try:
            return cls(rules=tuple(
                Rule(pattern=r["pattern"],
                     spec=None if r.get("spec") is None else QuantSpec(**r["spec"]))
                for r in d["rules"]))
        except (KeyError, TypeError) as e:
            raise RecipeError(f"malformed recipe: {e}") from e
