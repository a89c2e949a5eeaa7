"""The torch heads of stage two: a linear or MLP head with early stopping, and logistic regression by
L-BFGS for large caches. A module of its own so that sklearn's heads train without importing torch.

Every torch optimizer imports torch._dynamo as it is made (2-3 s). Imported here, at the top, that falls in
the command's import window, with the garbage collector off (`pipeline.runtime.imports`): `pipeline audit`
of a small cache took 9.0-10.0 s instead of 10.4-11.0."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch._dynamo  # noqa: F401  (see above)
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from pipeline.runtime.devices import resolve_device
from pipeline.runtime.errors import InputError, check_minimums


class TorchHead(BaseEstimator, ClassifierMixin):
    """A linear (hidden=0) or MLP head trained with AdamW, mini-batches and early stopping on val loss."""

    early_stops = True   # fit(X, y, X_val, y_val) stops when the val loss stops falling

    def __init__(self, hidden: int = 0, depth: int = 1, dropout: float = 0.0, weight_decay: float = 1e-4,
                 lr: float | None = None, epochs: int = 200, batch_size: int = 256, patience: int = 10,
                 class_weight: str | None = None, seed: int = 0, device: str = "auto"):
        """Why so many parameters: a scikit-learn estimator takes each hyperparameter as an argument of its
        constructor (get_params, clone); they are the settings of torch_linear and torch_mlp."""
        self.hidden, self.depth, self.dropout = hidden, depth, dropout
        self.weight_decay, self.lr, self.epochs, self.batch_size = weight_decay, lr, epochs, batch_size
        self.patience, self.class_weight, self.seed, self.device = patience, class_weight, seed, device

    def default_lr(self, X: torch.Tensor) -> float:
        """AdamW moves each weight by about lr a step, so a linear head's logits move by about lr times the
        length of a vector: 0.1 over the mean length of the training vectors (0.1 on the default L2-normalised
        ones) reaches in 10-20 epochs the val accuracy that 0.01 reached in 130-180 on the demo's caches, with
        every preprocessing. An MLP's hidden layer does better at 0.01 (benchmarks/RESULTS.md)."""
        if self.hidden:
            return 1e-2
        return 0.1 / max(float(X.norm(dim=1).mean()), 1e-12)

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
        if not (self.lr is None or self.lr > 0) or not self.dropout < 1:
            raise InputError(f"torch heads need lr > 0 and dropout < 1, got lr={self.lr}, dropout={self.dropout}")
        torch.manual_seed(self.seed)
        dev = resolve_device(self.device)
        self.multi_label_ = np.ndim(y) == 2
        self.classes_ = np.arange(np.shape(y)[1]) if self.multi_label_ else np.unique(y)
        self.net_ = self._network(X.shape[1], len(self.classes_)).to(dev)
        loss_fn, yt = self._loss(y, dev), self._targets(y, dev)
        Xt = torch.as_tensor(X, dtype=torch.float32, device=dev)
        opt = torch.optim.AdamW(self.net_.parameters(), lr=self.lr or self.default_lr(Xt),
                                weight_decay=self.weight_decay)
        if X_val is not None:
            Xv = torch.as_tensor(X_val, dtype=torch.float32, device=dev)
            yv = self._targets(y_val, dev)
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

    def _targets(self, y, dev: torch.device) -> torch.Tensor:
        """Class indices; a multi-label 0/1 matrix as floats, the targets of BCE."""
        if self.multi_label_:
            return torch.as_tensor(np.asarray(y), dtype=torch.float32, device=dev)
        return torch.as_tensor(np.searchsorted(self.classes_, y), device=dev)

    def _loss(self, y, dev: torch.device) -> nn.Module:
        """Cross-entropy, its classes reweighted with class_weight 'balanced'; BCE on a multi-label matrix."""
        if self.multi_label_:
            if self.class_weight is not None:
                raise InputError("class_weight does not apply to a multi-label head")
            return nn.BCEWithLogitsLoss()
        weight = None
        if self.class_weight == "balanced":
            counts = np.bincount(np.searchsorted(self.classes_, y), minlength=len(self.classes_))
            weight = torch.tensor(len(y) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=dev)
        return nn.CrossEntropyLoss(weight=weight)

    def scores(self, X) -> np.ndarray:
        """Softmax probabilities; a multi-label head's: each class's sigmoid."""
        with torch.no_grad():
            logits = self.net_(torch.as_tensor(X, dtype=torch.float32))
            return (logits.sigmoid() if getattr(self, "multi_label_", False) else logits.softmax(1)).numpy()

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
            raise InputError(f"precision must be auto, float32 or bfloat16, got {self.precision!r}")
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
