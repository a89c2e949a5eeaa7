"""Stage two classifiers: one small sklearn-style surface over sklearn and torch.

Every head has fit(X, y), predict(X), scores(X) (probabilities where the model has them,
decision values otherwise) and names the one hyperparameter model selection tunes.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.class_weight import compute_sample_weight
from threadpoolctl import threadpool_limits
from torch import nn

from pipeline.heads.settings import CLASSIFIERS
from pipeline.runtime.devices import resolve_device
from pipeline.runtime.errors import UserError, check_minimums

SMALL_PROBLEM = 4_000_000   # training values (rows x features) up to which a head trains on one CPU thread


@contextlib.contextmanager
def one_thread_if_small(n_values: int):
    """One CPU thread (BLAS, OpenMP and torch) while fitting a small problem: its products are too small to
    share, and waking a second thread for each cost up to 20x the time on a busy 2-core machine (sklearn's
    logreg on 1,120 x 1,280 vectors: 5 s against 100 s; a torch head on 245 x 1,280: 0.3 s against 15 s)."""
    if n_values > SMALL_PROBLEM:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


class TorchHead(BaseEstimator, ClassifierMixin):
    """A linear (hidden=0) or MLP head trained with AdamW, mini-batches and early stopping on val loss."""

    def __init__(self, hidden: int = 0, depth: int = 1, dropout: float = 0.0, weight_decay: float = 1e-4,
                 lr: float = 1e-2, epochs: int = 200, batch_size: int = 256, patience: int = 10,
                 class_weight: str | None = None, seed: int = 0, device: str = "auto"):
        self.hidden, self.depth, self.dropout = hidden, depth, dropout
        self.weight_decay, self.lr, self.epochs, self.batch_size = weight_decay, lr, epochs, batch_size
        self.patience, self.class_weight, self.seed, self.device = patience, class_weight, seed, device

    def _network(self, dim: int, n_classes: int) -> nn.Module:
        layers, width = [], dim
        for _ in range(self.depth if self.hidden else 0):
            layers += [nn.Linear(width, self.hidden), nn.ReLU(), nn.Dropout(self.dropout)]
            width = self.hidden
        return nn.Sequential(*layers, nn.Linear(width, n_classes))

    def fit(self, X, y, X_val=None, y_val=None):
        """Train; with a val set, stop when its loss stops improving and keep the best epoch.
        Without one, train for `epochs` epochs (model selection passes the best epoch count)."""
        check_minimums({"hidden": 0, "depth": 1, "dropout": 0, "weight_decay": 0, "epochs": 1, "batch_size": 1,
                        "patience": 1}, vars(self))
        if not self.lr > 0 or not self.dropout < 1:
            raise UserError(f"torch heads need lr > 0 and dropout < 1, got lr={self.lr}, dropout={self.dropout}")
        torch.manual_seed(self.seed)
        dev = resolve_device(self.device)
        self.classes_ = np.unique(y)
        yi = np.searchsorted(self.classes_, y)
        self.net_ = self._network(X.shape[1], len(self.classes_)).to(dev)
        weight = None
        if self.class_weight == "balanced":
            counts = np.bincount(yi, minlength=len(self.classes_))
            weight = torch.tensor(len(yi) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=dev)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        opt = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        Xt = torch.as_tensor(X, dtype=torch.float32, device=dev)
        yt = torch.as_tensor(yi, device=dev)
        if X_val is not None:
            Xv = torch.as_tensor(X_val, dtype=torch.float32, device=dev)
            yv = torch.as_tensor(np.searchsorted(self.classes_, y_val), device=dev)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        best, best_state, waited = float("inf"), None, 0
        self.best_epoch_ = self.epochs
        for epoch in range(1, self.epochs + 1):
            self.net_.train()
            for batch in torch.randperm(len(Xt), generator=gen).split(self.batch_size):
                opt.zero_grad()
                loss_fn(self.net_(Xt[batch.to(dev)]), yt[batch.to(dev)]).backward()
                opt.step()
            if X_val is None:
                continue
            self.net_.eval()
            with torch.no_grad():
                val_loss = loss_fn(self.net_(Xv), yv).item()
            if val_loss < best - 1e-4:
                best, best_state, waited, self.best_epoch_ = val_loss, copy.deepcopy(self.net_.state_dict()), 0, epoch
            else:
                waited += 1
                if waited >= self.patience:
                    break
        if best_state is not None:
            self.net_.load_state_dict(best_state)
        self.net_.eval().cpu()
        return self

    def scores(self, X) -> np.ndarray:
        with torch.no_grad():
            return self.net_(torch.as_tensor(X, dtype=torch.float32)).softmax(1).numpy()

    def predict_proba(self, X) -> np.ndarray:
        return self.scores(X)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.scores(X).argmax(1)]


def _cpu_has_bfloat16() -> bool:
    """Native bfloat16 arithmetic (AVX512-BF16 or AMX), where bfloat16 products beat float32 ones."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")   # torch.cpu's own probes
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def _float32_product(X: torch.Tensor, W: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """X @ W in float32 for float32 W and float32 or bfloat16 X, reading X in blocks of `rows`. A bfloat16
    product returns bfloat16, and logits rounded to 8 bits make the objective so noisy that L-BFGS stops
    up to 0.03 (in probability) from the optimum, at a point that depends on the CPU's matmul kernel."""
    if X.dtype == torch.float32:
        return X @ W
    return torch.cat([block.float() @ W for block in X.split(rows)])


class TorchLogReg(BaseEstimator, ClassifierMixin):
    """Multinomial logistic regression with sklearn's objective for `C` (L2 on the weights, not the
    intercept), solved by full-batch L-BFGS in torch: several times faster than sklearn on large caches.

    The gradient is written out rather than left to autograd, whose backward product with the
    transposed feature matrix is several times slower on CPUs. `precision` "auto" keeps the features in
    bfloat16 on CPUs with native bfloat16 arithmetic (products still sum in float32, and the logits are
    float32; 3-4x faster, since each evaluation reads the whole matrix twice) and in float32 elsewhere."""

    def __init__(self, C: float = 1.0, max_iter: int = 100, class_weight: str | None = None, device: str = "auto",
                 precision: str = "auto"):
        self.C, self.max_iter, self.class_weight, self.device = C, max_iter, class_weight, device
        self.precision = precision

    def _dtype(self, dev: torch.device) -> torch.dtype:
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise UserError(f"precision must be auto, float32 or bfloat16, got {self.precision!r}")
        if self.precision == "auto":
            return torch.bfloat16 if dev.type == "cpu" and _cpu_has_bfloat16() else torch.float32
        return getattr(torch, self.precision)

    def fit(self, X, y):
        check_minimums({"max_iter": 1}, vars(self))
        dev = resolve_device(self.device)
        self.classes_ = np.unique(y)
        yi = np.searchsorted(self.classes_, y)
        n, k = len(yi), len(self.classes_)
        Xt = torch.as_tensor(np.asarray(X, np.float32), device=dev).to(self._dtype(dev))
        target = nn.functional.one_hot(torch.as_tensor(yi, device=dev), k).float()
        row_weight = torch.ones(n, device=dev)
        if self.class_weight == "balanced":
            counts = np.bincount(yi, minlength=k)
            row_weight = torch.tensor(n / (k * counts), dtype=torch.float32, device=dev)[yi]
        W = torch.zeros(X.shape[1], k, device=dev)
        b = torch.zeros(k, device=dev)
        opt = torch.optim.LBFGS([W, b], max_iter=self.max_iter, history_size=10, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-4, tolerance_change=1e-9)   # sklearn's tol
        scale = 1 / (self.C * n)

        def objective():   # sklearn's C * sum(w_i loss_i) + |W|^2 / 2, divided by C * n, and its gradient
            z = _float32_product(Xt, W) + b
            log_p = z.log_softmax(1)
            residual = (log_p.exp() - target) * row_weight[:, None] / n
            W.grad = ((residual.T.to(Xt.dtype) @ Xt).float().T + W * scale).contiguous()
            b.grad = residual.sum(0)
            return -(log_p * target).sum(1) @ row_weight / n + (W * W).sum() * scale / 2
        opt.step(objective)
        self.coef_, self.intercept_ = W.T.cpu().numpy(), b.cpu().numpy()
        return self

    def predict_proba(self, X) -> np.ndarray:
        z = np.asarray(X, np.float32) @ self.coef_.T + self.intercept_
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


class CalibratedRbfSVM(BaseEstimator, ClassifierMixin):
    """An RBF SVM with calibrated probabilities. class_weight='balanced' weights the samples of both the
    SVM and its calibration; weighting the SVM alone is undone by calibrating on unweighted data."""

    def __init__(self, C: float = 1.0, gamma="scale", class_weight: str | None = None, seed: int = 0):
        self.C, self.gamma, self.class_weight, self.seed = C, gamma, class_weight, seed

    def fit(self, X, y):
        weight = compute_sample_weight(self.class_weight, y) if self.class_weight else None
        svc = SVC(C=self.C, gamma=self.gamma, random_state=self.seed)
        self.model_ = CalibratedClassifierCV(svc, ensemble=False).fit(X, y, sample_weight=weight)
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X) -> np.ndarray:
        return self.model_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        return self.model_.predict(X)


def _rbf_svm(v, gamma="scale", seed=0, class_weight=None):
    return CalibratedRbfSVM(v, gamma, class_weight, seed)


def _knn(v, class_weight=None):
    if class_weight is not None:
        raise UserError("classifier knn does not support class_weight")
    return KNeighborsClassifier(n_neighbors=int(v), weights="distance")


BUILDERS = {   # name -> (tuned value, **fixed params) -> an unfitted estimator; names and params: CLASSIFIERS
    "logreg": lambda v, max_iter=2000, seed=0, class_weight=None: LogisticRegression(
        C=v, max_iter=max_iter, random_state=seed, class_weight=class_weight),
    "torch_logreg": lambda v, max_iter=100, device="auto", precision="auto", class_weight=None: TorchLogReg(
        C=v, max_iter=max_iter, class_weight=class_weight, device=device, precision=precision),
    "linear_svm": lambda v, max_iter=5000, seed=0, class_weight=None: LinearSVC(
        C=v, max_iter=max_iter, random_state=seed, class_weight=class_weight),
    "rbf_svm": _rbf_svm,
    "knn": _knn,
    "torch_linear": lambda v, **kw: TorchHead(weight_decay=v, **kw),
    "torch_mlp": lambda v, hidden=256, dropout=0.5, **kw: TorchHead(weight_decay=v, hidden=hidden, dropout=dropout,
                                                                   **kw),
}


def make_head(name: str, value, class_weight: str | None = None, **params):
    """A fresh, unfitted classifier `name` with its tuned hyperparameter set to `value`."""
    if name not in CLASSIFIERS:
        raise UserError(f"unknown classifier '{name}'; choose one of: {', '.join(CLASSIFIERS)}")
    spec = CLASSIFIERS[name]
    unknown = set(params) - set(spec.params)
    if unknown:
        raise UserError(f"classifier {name} has no parameter {sorted(unknown)[0]!r}; "
                        f"it takes: {', '.join((spec.tuned, 'class_weight', *spec.params))}")
    if class_weight not in (None, "balanced"):
        raise UserError(f"class_weight must be 'balanced' or empty, got {class_weight!r}")
    return BUILDERS[name](value, class_weight=class_weight, **params)


def head_scores(model, X) -> np.ndarray:
    """Per-class scores: probabilities where available, else decision values."""
    if isinstance(model, TorchHead):
        return model.scores(X)
    if hasattr(model, "predict_proba"):
        return model.predict_proba(X)
    s = model.decision_function(X)
    return np.stack([-s, s], 1) if s.ndim == 1 else s


def has_probabilities(model) -> bool:
    return isinstance(model, TorchHead) or hasattr(model, "predict_proba")
