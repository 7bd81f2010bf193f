"""What every scorer takes and returns: :class:`ScoreConfig` in, :class:`Scores` out.

Kept apart from the scorers so that the pipeline, the rounds (``optin_onnx.iterate``) and the
baseline criteria can use these types without importing any scorer.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

#: Called with the number of units just scored (a progress bar advances by it).
Progress = Callable[[int], None]
#: Values captured from a run, one dict (value name -> array) per calibration chunk.
Captured = list[dict[str, np.ndarray]]
#: Block name -> unit indices (kept units of a base selection, or the units to score).
Units = Mapping[str, Sequence[int]]


#: Where candidate batches run (optin_onnx.scoring.executors).
EXECUTORS = ("local", "processes", "ray")


@dataclass(frozen=True)
class ExecutorConfig:
    """Which executor and how wide. ``workers`` None: one per core (``processes``) or per CPU of
    the cluster (``ray``). ``ray_address`` None starts a Ray instance on this machine."""

    kind: str = "local"
    workers: int | None = None
    ray_address: str | None = None


@dataclass(frozen=True)
class ScoreConfig:
    """The settings of the trajectory scorers (frozen: a default instance is shared by every call
    that omits it, and a variant is made with :func:`dataclasses.replace`)."""

    lam: float = 1.0
    tokens: int = 768
    seed: int = 0
    # Candidates stacked into one suffix run: more amortise each run's fixed cost, too many
    # outgrow the caches; the default is the fastest per candidate (docs/RESULTS.md, "One-off
    # measurements").
    candidates_per_run: int = 4
    neuron_group: int = 1  # 1 = exact per-neuron scores
    output_kind: str = "auto"  # auto | logits | embedding | tokens (of every objective output)
    # The graph outputs the output term compares (features.objective_outputs); None: every output
    # some block can change.
    objective_outputs: tuple[str, ...] | None = None
    features: str = "trajectory"  # trajectory | local (ablation: the unit's own layer only)
    # With a base selection (pruning in rounds): "current" makes the base model the teacher
    # (OPTIN's score on the pruned model as if it were the dense one); "dense" keeps the original
    # model (a score is the loss a unit adds to the base's). current is the default, chosen on
    # validation data (docs/DESIGN.md, "Pruning in rounds").
    teacher: str = "current"
    feature_kind: str = "auto"  # what F_z is: auto | ffn | residual-ln | blocks (features.py)
    providers: list[str] | None = None
    # Where candidate batches run: in this process, a local process pool or Ray (executors.py).
    executor: ExecutorConfig = ExecutorConfig()
    # Scoring refuses to start when its dense cache and model copies would exceed this (None: no
    # limit); the chunk sizes under it are chosen by calibrate.chunking.
    max_memory_bytes: int | None = None


@dataclass(frozen=True)
class Scores:
    """Per-block importance (higher = keep), with the raw loss terms behind it.

    ``md`` ([units]) and ``kd`` ([units, objective outputs]: one column of L_KD per output the
    output term compares) are what a trajectory scorer measured; ``importance`` is what the search
    reads (the baselines fill only it)."""

    importance: dict[str, np.ndarray] = field(default_factory=dict)
    md: dict[str, np.ndarray] = field(default_factory=dict)
    kd: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def finalize(self, lam: float) -> Scores:
        """New scores whose importance is ``md / mean(md) + lam * mean_o(kd_o / mean(kd_o))``,
        every ``mean(.)`` over every candidate, ``mean_o`` over the objective outputs.

        Each term is divided by its own mean so that ``lam`` is the relative weight of the output
        term whatever the feature scale, and so that no output outweighs another by its scale (a
        KL of logits and a Gram-matrix loss of token states differ by orders of magnitude). The
        outputs are averaged, not summed, so that ``lam`` keeps that meaning however many outputs
        there are; with one output this is the one-output formula, to the bit. A new object, so
        one scoring serves several values of ``lam``."""
        md_scale = _scale(np.concatenate(list(self.md.values())) if self.md else np.zeros(0))
        kd_all = np.concatenate(list(self.kd.values())) if self.kd else np.zeros((0, 1))
        kd_scale = np.array([_scale(kd_all[:, o]) for o in range(kd_all.shape[1])])
        return replace(self, importance={
            name: self.md[name] / md_scale + (lam * self.kd[name] / kd_scale).mean(axis=1)
            for name in self.md})


def _scale(values: np.ndarray) -> float:
    """The mean over every candidate that was scored (NaN marks units that were not), or 1 when
    that is not positive (nothing scored, or a term that is zero everywhere). ``np.nanmean``
    would warn on stderr when every value is NaN (a model giving NaN outputs), ahead of the
    one-line error the CLI then prints."""
    values = values[~np.isnan(values)]
    mean = float(values.mean()) if values.size else 0.0
    return mean if mean > 0 else 1.0
