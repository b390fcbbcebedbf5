"""Per-row routing: pick each row's expert pair and alpha from a cheap signal.

A *signal* (:mod:`.signals`) turns a prompt into a ``(D,)`` vector before any
token is generated; a *router* (:mod:`.routers`) turns a ``(B, D)`` batch of
them into a :class:`~proxytune.steering.SteeringPlan` on the same device.
Routers are fit with scikit-learn (:mod:`.fitting`) and saved as JSON +
safetensors (:mod:`.persistence`).
"""

from proxytune.routing.signals import (
    BaseHiddenStateSignal,
    SentenceEmbeddingSignal,
    make_signal,
    packaged_minilm_dir,
    pool_hidden_states,
)
from proxytune.routing.routers import (
    NO_STEERING,
    ClusterRouter,
    DifficultyRouter,
    FixedRouter,
    OracleRouter,
    RandomRouter,
    Router,
    align_plan,
    plan_choices,
)
from proxytune.routing.persistence import RouterFolderError, load, save
from proxytune.routing.fitting import (
    compute_signals,
    fit_router,
    fit_router_from_jsonl,
    read_calibration_jsonl,
)

__all__ = [
    "BaseHiddenStateSignal",
    "SentenceEmbeddingSignal",
    "make_signal",
    "packaged_minilm_dir",
    "pool_hidden_states",
    "NO_STEERING",
    "Router",
    "ClusterRouter",
    "DifficultyRouter",
    "FixedRouter",
    "OracleRouter",
    "RandomRouter",
    "align_plan",
    "plan_choices",
    "RouterFolderError",
    "load",
    "save",
    "compute_signals",
    "fit_router",
    "fit_router_from_jsonl",
    "read_calibration_jsonl",
]
