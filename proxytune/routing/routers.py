"""Routers: from a ``(B, D)`` signal to a per-row :class:`SteeringPlan`.

Every router chooses, per row, one of ``P + 1`` *options*: option 0 is "no
steering", option ``p + 1`` is pair ``pair_names[p]``.  Hard routing puts the
option's alpha in its column of the plan; soft routing (cluster router,
``soft_top_k > 1``) spreads weights over several options.

Fitting uses scikit-learn on the host.  Routing is a few torch matrix
products on the signal's device and never reads a value back to the host,
so it adds no round trip to a batch.

Quality data for fitting is an ``(N, P + 1)`` array of scores per option
(column 0 = no steering, NaN = not measured), or an ``(N,)`` sequence of
labels (a pair name, or ``None`` for no steering) which is read as a one-hot
score.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Sequence

import numpy as np
import torch

from proxytune.steering import SteeringPlan

logger = logging.getLogger(__name__)

NO_STEERING = "none"


def option_names(pair_names: Sequence[str]) -> list[str]:
    """``["none", *pair_names]``: the columns of a quality array."""
    return [NO_STEERING, *pair_names]


def labels_to_quality(labels: Sequence[str | None], pair_names: Sequence[str]) -> np.ndarray:
    """One-hot ``(N, P + 1)`` quality from per-row labels (``None`` = no steering)."""
    options = option_names(pair_names)
    quality = np.zeros((len(labels), len(options)), dtype=np.float64)
    for row, label in enumerate(labels):
        name = NO_STEERING if label is None else label
        if name not in options:
            raise ValueError(
                f"Label {label!r} of row {row} is not one of the pairs {list(pair_names)} "
                f"(or None / {NO_STEERING!r} for no steering)."
            )
        quality[row, options.index(name)] = 1.0
    return quality


def _as_quality(quality_or_labels, pair_names: Sequence[str], num_rows: int) -> np.ndarray:
    if isinstance(quality_or_labels, np.ndarray) and quality_or_labels.dtype.kind == "f":
        quality = quality_or_labels
    elif isinstance(quality_or_labels, torch.Tensor):
        quality = quality_or_labels.detach().cpu().double().numpy()
    else:
        quality = labels_to_quality(list(quality_or_labels), pair_names)
    expected = (num_rows, len(pair_names) + 1)
    if quality.shape != expected:
        raise ValueError(
            f"Quality must be (rows, 1 + pairs) = {expected} with column 0 for no steering, "
            f"got {quality.shape}."
        )
    return quality


def _as_numpy_signals(signal_values) -> np.ndarray:
    if isinstance(signal_values, torch.Tensor):
        signal_values = signal_values.detach().float().cpu().numpy()
    values = np.asarray(signal_values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"Signals must be (rows, dim), got shape {values.shape}.")
    if not np.isfinite(values).all():
        raise ValueError("Signals hold NaN or infinite values; check the signal model.")
    return values


def _pair_alphas(pair_names: Sequence[str], alpha) -> torch.Tensor:
    """``(P,)`` float32 alphas from one float or a ``{name: alpha}`` dict."""
    if isinstance(alpha, dict):
        unknown = set(alpha) - set(pair_names)
        if unknown:
            raise ValueError(f"Alphas given for unknown pairs {sorted(unknown)}.")
        return torch.tensor([float(alpha.get(name, 1.0)) for name in pair_names])
    return torch.full((len(pair_names),), float(alpha))


def plan_choices(plan: SteeringPlan) -> list[tuple[str | None, float]]:
    """Per row, the pair with the largest alpha (``None`` if none) and that alpha.

    Reads the plan back to the host: for display and tests, not the hot path.
    """
    alpha = plan.alpha.detach().float().cpu()
    choices = []
    for row in range(alpha.shape[0]):
        if alpha.shape[1] == 0 or not (alpha[row] != 0).any():
            choices.append((None, 0.0))
            continue
        column = int(alpha[row].abs().argmax())
        choices.append((plan.pair_names[column], float(alpha[row, column])))
    return choices


def align_plan(plan: SteeringPlan, pair_names: Sequence[str]) -> SteeringPlan:
    """The plan with its columns put in the order of ``pair_names``.

    A router may know fewer pairs than the model (their columns stay zero) but
    never a pair the model lacks.
    """
    pair_names = list(pair_names)
    if plan.pair_names == pair_names:
        return plan
    missing = [name for name in plan.pair_names if name not in pair_names]
    if missing:
        raise ValueError(
            f"The router routes to pairs {missing} that the model does not have "
            f"(it has {pair_names}). Register them, or refit the router."
        )
    alpha = plan.alpha.new_zeros(plan.batch_size, len(pair_names))
    columns = [pair_names.index(name) for name in plan.pair_names]
    alpha[:, columns] = plan.alpha
    return SteeringPlan(pair_names, alpha)


class Router:
    """Common interface: ``route((B, D) signal values) -> SteeringPlan``.

    Subclasses set ``kind`` and implement :meth:`_option_weights` returning a
    ``(B, P + 1)`` float32 weight per option; the plan is its pair columns
    times each pair's alpha.  ``signal`` is the signal spec the router was fit
    on (``None`` for routers that ignore the signal).
    """

    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type["Router"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Router.registry[cls.kind] = cls

    def __init__(self, signal, pair_names: Sequence[str], alpha=1.0):
        self.signal = signal
        self.pair_names = list(pair_names)
        if len(set(self.pair_names)) != len(self.pair_names) or NO_STEERING in self.pair_names:
            raise ValueError(
                f"Pair names must be distinct and not {NO_STEERING!r}, got {self.pair_names}."
            )
        self.pair_alpha = _pair_alphas(self.pair_names, alpha)  # (P,)

    @property
    def device(self) -> torch.device:
        return self.pair_alpha.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the router routes with, by name (saved by persistence)."""
        return {"pair_alpha": self.pair_alpha}

    def config(self) -> dict:
        """JSON-ready settings that, with :meth:`tensors`, rebuild the router."""
        return {}

    @classmethod
    def from_saved(cls, signal, pair_names, config: dict, tensors: dict) -> "Router":
        router = cls.__new__(cls)
        router.signal = signal
        router.pair_names = list(pair_names)
        for name, value in config.items():
            setattr(router, name, value)
        for name, value in tensors.items():
            setattr(router, name, value)
        return router

    def to(self, device: str | torch.device) -> "Router":
        """Move the router's tensors to ``device`` (in place; returns self)."""
        for name, value in self.tensors().items():
            setattr(self, name, value.to(device))
        return self

    def _check_signal_values(self, signal_values: torch.Tensor) -> torch.Tensor:
        if signal_values.dim() != 2:
            raise ValueError(
                f"route() takes (batch, dim) signal values, got shape "
                f"{tuple(signal_values.shape)}."
            )
        if self.signal is not None and signal_values.shape[1] != self.signal.dim:
            raise ValueError(
                f"This router reads {self.signal.dim}-dim signals ({self.signal.describe()}), "
                f"got {signal_values.shape[1]} dims."
            )
        if signal_values.device != self.device:
            logger.info("Moving %s router to %s", self.kind, signal_values.device)
            self.to(signal_values.device)
        return signal_values.float()

    def _option_weights(self, signal_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def route(self, signal_values: torch.Tensor) -> SteeringPlan:
        """Route ``(B, D)`` signal values to a ``(B, P)`` plan on their device."""
        signal_values = self._check_signal_values(signal_values)
        option_weights = self._option_weights(signal_values)  # (B, P + 1)
        alpha = option_weights[:, 1:] * self.pair_alpha  # (B, P)
        return SteeringPlan(self.pair_names, alpha)

    def route_names(self, signal_values: torch.Tensor) -> list[tuple[str | None, float]]:
        """Per row, the chosen pair name (or ``None``) and its alpha; host side."""
        return plan_choices(self.route(signal_values))


def _one_hot_options(option_index: torch.Tensor, num_options: int) -> torch.Tensor:
    """``(B,)`` option indices to ``(B, num_options)`` float32, without a host sync."""
    options = torch.arange(num_options, device=option_index.device)
    return (option_index[:, None] == options).float()


class FixedRouter(Router):
    """Every row gets the same pair (or no steering)."""

    kind = "fixed"

    def __init__(self, pair_names: Sequence[str], expert: str | None, alpha=1.0, signal=None):
        super().__init__(signal, pair_names, alpha)
        if expert is not None and expert not in self.pair_names:
            raise ValueError(f"Expert {expert!r} is not one of the pairs {self.pair_names}.")
        self.expert = expert

    def config(self) -> dict:
        return {"expert": self.expert}

    def _option_weights(self, signal_values):
        option = 0 if self.expert is None else 1 + self.pair_names.index(self.expert)
        index = torch.full((signal_values.shape[0],), option, device=signal_values.device)
        return _one_hot_options(index, len(self.pair_names) + 1)


class RandomRouter(Router):
    """Each row draws an option uniformly (seeded; no steering included if asked).

    Draws come from a CPU generator and are copied to the device, so the same
    seed gives the same routes on every device.  Each call advances it.
    """

    kind = "random"

    def __init__(
        self,
        pair_names: Sequence[str],
        seed: int = 0,
        include_none: bool = True,
        alpha=1.0,
        signal=None,
    ):
        super().__init__(signal, pair_names, alpha)
        self.seed = int(seed)
        self.include_none = bool(include_none)
        if not self.pair_names and not self.include_none:
            raise ValueError("A random router without pairs must allow no steering.")
        self._generator = torch.Generator().manual_seed(self.seed)

    def config(self) -> dict:
        return {"seed": self.seed, "include_none": self.include_none}

    @classmethod
    def from_saved(cls, signal, pair_names, config, tensors):
        router = super().from_saved(signal, pair_names, config, tensors)
        router._generator = torch.Generator().manual_seed(router.seed)
        return router

    def reset(self) -> None:
        """Start the random stream again from the seed."""
        self._generator.manual_seed(self.seed)

    def _option_weights(self, signal_values):
        first = 0 if self.include_none else 1
        index = torch.randint(
            first, len(self.pair_names) + 1, (signal_values.shape[0],), generator=self._generator
        )
        index = index.to(signal_values.device, non_blocking=True)
        return _one_hot_options(index, len(self.pair_names) + 1)


class OracleRouter(Router):
    """Routes the rows of one known batch by their labels (best measured option).

    Build it per batch, from labels or from an ``(B, P + 1)`` quality array
    (the row's argmax); ``route`` refuses a batch of another size.
    """

    kind = "oracle"

    def __init__(
        self, pair_names: Sequence[str], quality_or_labels, alpha=1.0, signal=None
    ):
        super().__init__(signal, pair_names, alpha)
        num_rows = len(quality_or_labels)
        quality = _as_quality(quality_or_labels, self.pair_names, num_rows)
        best = np.where(np.isnan(quality), -np.inf, quality).argmax(axis=1)
        self.best_option = torch.as_tensor(best, dtype=torch.long)  # (N,)

    def tensors(self):
        return {**super().tensors(), "best_option": self.best_option}

    def _option_weights(self, signal_values):
        if signal_values.shape[0] != self.best_option.shape[0]:
            raise ValueError(
                f"This oracle knows {self.best_option.shape[0]} rows but the batch has "
                f"{signal_values.shape[0]}; build one oracle per batch."
            )
        return _one_hot_options(self.best_option, len(self.pair_names) + 1)


class _Standardizer:
    """Per-dimension centring and scaling fit by scikit-learn, applied in torch."""

    @staticmethod
    def fit(values: np.ndarray, enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.preprocessing import StandardScaler

        if not enabled:
            dim = values.shape[1]
            return torch.zeros(dim), torch.ones(dim)
        scaler = StandardScaler().fit(values)
        return (
            torch.as_tensor(scaler.mean_, dtype=torch.float32),
            torch.as_tensor(scaler.scale_, dtype=torch.float32),
        )


class ClusterRouter(Router):
    """k-means clusters of calibration signals, each routed to its best option.

    Fitting: k-means over the (standardised) signals; each cluster takes the
    option with the best mean quality minus ``cost_weight * cost[option]`` over
    its members, as Avengers-Pro does per cluster.

    Routing: distances to the ``(K, D)`` centroids.  Hard (``soft_top_k == 1``):
    the nearest cluster's option.  Soft: the ``soft_top_k`` nearest clusters
    mix with weights ``softmax(-distance / temperature)``, each adding its
    weight to its option; a pair's alpha is then scaled by its total weight
    (weight given to "no steering" simply steers less).
    """

    kind = "cluster"

    @classmethod
    def fit(
        cls,
        signal,
        pair_names: Sequence[str],
        signal_values,
        quality_or_labels,
        n_clusters: int = 8,
        cost_weight: float = 0.0,
        costs: Sequence[float] | None = None,
        alpha=1.0,
        soft_top_k: int = 1,
        temperature: float = 1.0,
        standardize: bool = True,
        seed: int = 0,
    ) -> "ClusterRouter":
        """Fit on ``(N, D)`` signals and ``(N, P + 1)`` quality or ``(N,)`` labels.

        ``costs`` holds one cost per option (no steering first), e.g. the
        extra forward passes a pair needs; default 0 for none, 1 per pair.
        """
        from sklearn.cluster import KMeans

        values = _as_numpy_signals(signal_values)
        quality = _as_quality(quality_or_labels, pair_names, values.shape[0])
        if signal is not None and values.shape[1] != signal.dim:
            raise ValueError(f"Signals have {values.shape[1]} dims, the signal spec {signal.dim}.")
        if not 1 <= n_clusters <= values.shape[0]:
            raise ValueError(
                f"n_clusters must be between 1 and the {values.shape[0]} calibration rows, "
                f"got {n_clusters}."
            )
        num_options = len(pair_names) + 1
        costs = np.array([0.0] + [1.0] * len(pair_names) if costs is None else costs, float)
        if costs.shape != (num_options,):
            raise ValueError(f"costs needs one value per option (none first): {num_options}.")

        center, scale = _Standardizer.fit(values, standardize)
        standardized = (values - center.double().numpy()) / scale.double().numpy()
        kmeans = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(standardized)

        cluster_option = np.zeros(n_clusters, dtype=np.int64)
        for cluster in range(n_clusters):
            members = quality[kmeans.labels_ == cluster]
            measured = ~np.isnan(members)
            counts = measured.sum(axis=0)
            mean_quality = np.where(measured, members, 0.0).sum(axis=0) / np.maximum(counts, 1)
            utility = np.where(counts > 0, mean_quality - cost_weight * costs, -np.inf)
            cluster_option[cluster] = int(np.argmax(utility))
            logger.debug("cluster %d (%d rows): utility %s", cluster, len(members), utility)

        router = cls(
            signal,
            pair_names,
            centroids=torch.as_tensor(kmeans.cluster_centers_, dtype=torch.float32),
            cluster_option=torch.as_tensor(cluster_option),
            center=center,
            scale=scale,
            alpha=alpha,
            soft_top_k=soft_top_k,
            temperature=temperature,
        )
        router.cost_weight = float(cost_weight)
        return router

    def __init__(
        self,
        signal,
        pair_names: Sequence[str],
        centroids: torch.Tensor,
        cluster_option: torch.Tensor,
        center: torch.Tensor,
        scale: torch.Tensor,
        alpha=1.0,
        soft_top_k: int = 1,
        temperature: float = 1.0,
    ):
        super().__init__(signal, pair_names, alpha)
        self.centroids = centroids  # (K, D) in standardised units
        self.cluster_option = cluster_option.long()  # (K,) option per cluster
        self.center = center  # (D,)
        self.scale = scale  # (D,)
        self.cost_weight = 0.0
        self.set_soft(soft_top_k, temperature)

    def set_soft(self, soft_top_k: int, temperature: float = 1.0) -> None:
        """Switch between hard (``soft_top_k=1``) and soft top-k mixing."""
        num_clusters = self.centroids.shape[0]
        if not 1 <= soft_top_k <= num_clusters:
            raise ValueError(f"soft_top_k must be in [1, {num_clusters}], got {soft_top_k}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.soft_top_k = int(soft_top_k)
        self.temperature = float(temperature)

    def tensors(self):
        return {
            **super().tensors(),
            "centroids": self.centroids,
            "cluster_option": self.cluster_option,
            "center": self.center,
            "scale": self.scale,
        }

    def config(self):
        return {
            "soft_top_k": self.soft_top_k,
            "temperature": self.temperature,
            "cost_weight": self.cost_weight,
        }

    def cluster_distances(self, signal_values: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` Euclidean distances to the centroids, in standardised units."""
        standardized = (signal_values.float() - self.center) / self.scale
        return torch.cdist(standardized, self.centroids)

    def assign(self, signal_values: torch.Tensor) -> torch.Tensor:
        """``(B,)`` index of each row's nearest cluster."""
        signal_values = self._check_signal_values(signal_values)
        return self.cluster_distances(signal_values).argmin(dim=1)

    def _option_weights(self, signal_values):
        distances = self.cluster_distances(signal_values)  # (B, K)
        num_options = len(self.pair_names) + 1
        if self.soft_top_k == 1:
            nearest = distances.argmin(dim=1)
            return _one_hot_options(self.cluster_option[nearest], num_options)

        top_distances, top_clusters = distances.topk(self.soft_top_k, dim=1, largest=False)
        weights = torch.softmax(-top_distances / self.temperature, dim=1)  # (B, k)
        option_weights = distances.new_zeros(distances.shape[0], num_options)
        return option_weights.scatter_add_(1, self.cluster_option[top_clusters], weights)


class DifficultyRouter(Router):
    """A linear model predicts from the signal whether steering helps a row.

    The *gain* of a row is its best pair's quality minus its no-steering
    quality.  With binary data (labels, or gains that are all 0 / 1) a
    logistic regression predicts P(gain > 0); otherwise ridge regression
    predicts the gain.  Both give a linear score ``w . x + b``; rows whose
    score exceeds ``threshold`` are steered.  The threshold is calibrated as a
    quantile of calibration scores so that a target share of rows is steered
    (RouteLLM calibrates its win-rate threshold the same way).

    Steered rows go to ``expert`` when it is given, else to the pair picked by
    a multi-class logistic head fit on the rows' best pairs.

    TODO: steered rows all get their pair's fixed alpha; scaling alpha with the
    predicted gain ("how strongly steering helps") needs calibration data that
    scores several alphas per prompt, which our JSONL format does not hold yet.
    """

    kind = "difficulty"

    @classmethod
    def fit(
        cls,
        signal,
        pair_names: Sequence[str],
        signal_values,
        quality_or_labels,
        target_share: float = 0.5,
        expert: str | None = None,
        alpha=1.0,
        calibration_signals=None,
        regularization: float = 1.0,
        standardize: bool = True,
        seed: int = 0,
    ) -> "DifficultyRouter":
        """Fit the gain model (and pair head), then calibrate to ``target_share``.

        ``calibration_signals`` (unlabelled ``(M, D)``) set the threshold; by
        default the fitting signals do.  ``regularization`` is the inverse
        strength ``C`` for logistic models and ``1 / alpha`` for ridge.
        """
        from sklearn.linear_model import LogisticRegression, Ridge

        pair_names = list(pair_names)
        if not pair_names:
            raise ValueError("A difficulty router needs at least one pair to steer with.")
        if expert is not None and expert not in pair_names:
            raise ValueError(f"Expert {expert!r} is not one of the pairs {pair_names}.")
        values = _as_numpy_signals(signal_values)
        quality = _as_quality(quality_or_labels, pair_names, values.shape[0])
        filled = np.where(np.isnan(quality), -np.inf, quality)
        if expert is None:
            best_pair = filled[:, 1:].argmax(axis=1)
            steered_quality = filled[:, 1:].max(axis=1)
        else:
            best_pair = np.full(values.shape[0], pair_names.index(expert))
            steered_quality = filled[:, 1 + pair_names.index(expert)]
        gain = steered_quality - filled[:, 0]
        usable = np.isfinite(gain)
        if usable.sum() < 2:
            raise ValueError(
                "Fewer than two rows have both a no-steering and a steered score; "
                "the difficulty router cannot learn a gain."
            )

        center, scale = _Standardizer.fit(values, standardize)
        standardized = (values - center.double().numpy()) / scale.double().numpy()
        x_fit, gain_fit = standardized[usable], gain[usable]

        binary = np.isin(gain_fit, (0.0, 1.0)).all() or np.isin(gain_fit, (-1.0, 1.0)).all()
        if binary:
            helps = gain_fit > 0
            if helps.all() or not helps.any():
                raise ValueError(
                    "Every calibration row has the same label (steering always or never "
                    "helps): a difficulty router needs both kinds. Use a FixedRouter."
                )
            model = LogisticRegression(C=regularization, random_state=seed).fit(x_fit, helps)
            weight, bias = model.coef_[0], model.intercept_[0]
        else:
            model = Ridge(alpha=1.0 / regularization).fit(x_fit, gain_fit)
            weight, bias = model.coef_, model.intercept_

        head_weight = torch.zeros(len(pair_names), values.shape[1])
        head_bias = torch.zeros(len(pair_names))
        if expert is None:
            head_rows = usable & (gain > 0) if (usable & (gain > 0)).sum() >= 2 else usable
            classes = np.unique(best_pair[head_rows])
            if len(classes) == 1:
                head_bias[int(classes[0])] = 1.0
            else:
                head = LogisticRegression(C=regularization, random_state=seed)
                head.fit(standardized[head_rows], best_pair[head_rows])
                coef, intercept = head.coef_, head.intercept_
                if len(classes) == 2:  # sklearn keeps one row for two classes
                    coef = np.stack([-coef[0], coef[0]]) / 2
                    intercept = np.array([-intercept[0], intercept[0]]) / 2
                head_weight[classes] = torch.as_tensor(coef, dtype=torch.float32)
                head_bias[:] = -1e9  # pairs never best in calibration are never picked
                head_bias[classes] = torch.as_tensor(intercept, dtype=torch.float32)

        router = cls(
            signal,
            pair_names,
            weight=torch.as_tensor(weight, dtype=torch.float32),
            bias=torch.tensor(float(bias)),
            head_weight=head_weight,
            head_bias=head_bias,
            center=center,
            scale=scale,
            threshold=0.0,
            alpha=alpha,
        )
        router.predicts = "log_odds" if binary else "gain"
        if calibration_signals is None:
            calibration_signals = values
        router.calibrate(calibration_signals, target_share)
        return router

    def __init__(
        self,
        signal,
        pair_names: Sequence[str],
        weight: torch.Tensor,
        bias: torch.Tensor,
        head_weight: torch.Tensor,
        head_bias: torch.Tensor,
        center: torch.Tensor,
        scale: torch.Tensor,
        threshold: float = 0.0,
        alpha=1.0,
    ):
        super().__init__(signal, pair_names, alpha)
        self.weight = weight  # (D,) gain model, standardised units
        self.bias = bias  # () scalar tensor
        self.head_weight = head_weight  # (P, D) pair head
        self.head_bias = head_bias  # (P,)
        self.center = center  # (D,)
        self.scale = scale  # (D,)
        self.threshold_value = torch.tensor(float(threshold))  # () scalar tensor
        self.target_share = None
        self.predicts = "gain"

    @property
    def threshold(self) -> float:
        return float(self.threshold_value)

    def tensors(self):
        return {
            **super().tensors(),
            "weight": self.weight,
            "bias": self.bias,
            "head_weight": self.head_weight,
            "head_bias": self.head_bias,
            "center": self.center,
            "scale": self.scale,
            "threshold_value": self.threshold_value,
        }

    def config(self):
        return {"target_share": self.target_share, "predicts": self.predicts}

    def _standardized(self, signal_values: torch.Tensor) -> torch.Tensor:
        return (signal_values.float() - self.center) / self.scale

    def scores(self, signal_values: torch.Tensor) -> torch.Tensor:
        """``(B,)`` predicted gain (or log-odds that steering helps) per row."""
        signal_values = self._check_signal_values(signal_values)
        return self._standardized(signal_values) @ self.weight + self.bias

    def calibrate(self, calibration_signals, target_share: float) -> float:
        """Set the threshold so ``target_share`` of these rows is steered.

        The threshold is the ``1 - target_share`` quantile of their scores;
        rows scoring strictly above it are steered.  Returns the threshold.
        """
        if not 0.0 <= target_share <= 1.0:
            raise ValueError(f"target_share must be in [0, 1], got {target_share}.")
        values = torch.as_tensor(_as_numpy_signals(calibration_signals), dtype=torch.float32)
        scores = self.scores(values.to(self.device)).double().cpu().numpy()
        if target_share >= 1.0:
            threshold = -np.inf
        else:
            threshold = float(np.quantile(scores, 1.0 - target_share, method="linear"))
        self.threshold_value = torch.tensor(threshold, dtype=torch.float32, device=self.device)
        self.target_share = float(target_share)
        logger.info("difficulty router: threshold %.4g steers %.1f%% of calibration rows",
                    threshold, 100 * float((scores > threshold).mean()))
        return threshold

    def _option_weights(self, signal_values):
        standardized = self._standardized(signal_values)  # (B, D)
        steer = (standardized @ self.weight + self.bias) > self.threshold_value  # (B,)
        pair = (standardized @ self.head_weight.T + self.head_bias).argmax(dim=1)  # (B,)
        option = torch.where(steer, pair + 1, torch.zeros_like(pair))
        return _one_hot_options(option, len(self.pair_names) + 1)
