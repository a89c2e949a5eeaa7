"""The classifier zoo: torch heads (architecture, determinism, early stopping, GPU), class weights,
and parameter checks."""
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.heads.classifiers import (
    CLASSIFIERS,
    SMALL_PROBLEM,
    head_scores,
    make_head,
    one_thread_if_small,
    runs_in_torch,
)
from pipeline.heads.torch_heads import TorchHead
from pipeline.runtime.errors import InputError


def blobs(counts, seed=0, dim=16):
    """Gaussian classes with `counts[k]` rows each; neighbouring classes overlap."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0, 1.0, (len(counts), dim))
    y = np.repeat(np.arange(len(counts)), counts)
    return (centres[y] + rng.normal(0, 1.0, (len(y), dim))).astype(np.float32), y


def test_mlp_head_takes_hidden_size_depth_and_dropout():
    X, y = blobs([20, 20, 20])
    head = make_head("torch_mlp", 1e-3, hidden=32, depth=2, dropout=0.3, epochs=2).fit(X, y)
    linears = [m for m in head.net_ if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 3)]
    assert [m.p for m in head.net_ if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    default = make_head("torch_mlp", 1e-3, epochs=1).fit(X, y)             # a 256-unit hidden layer, dropout 0.5
    assert [m.out_features for m in default.net_ if isinstance(m, nn.Linear)] == [256, 3]
    assert [m.p for m in default.net_ if isinstance(m, nn.Dropout)] == [0.5]
    linear = make_head("torch_linear", 1e-3, epochs=1).fit(X, y)
    assert [type(m) for m in linear.net_] == [nn.Linear]


@pytest.mark.parametrize("name", ["torch_linear", "torch_mlp"])
def test_same_seed_same_predictions(name):
    X, y = blobs([30, 30, 30])
    Xv, yv = blobs([10, 10, 10], seed=1)
    size = {"hidden": 32} if name == "torch_mlp" else {}
    fitted = [make_head(name, 1e-3, seed=seed, epochs=10, batch_size=16, **size).fit(X, y, Xv, yv)
              for seed in (3, 3, 4)]
    probe = blobs([5, 5, 5], seed=2)[0]
    a, b, c = (head.scores(probe) for head in fitted)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)                       # the seed does drive initialisation and batches


def test_early_stopping_keeps_the_best_epoch():
    """With val labels the features cannot predict, val loss rises early; the head stops and keeps
    the best epoch's weights, which retraining for exactly that many epochs reproduces."""
    X, y = blobs([40, 40, 40])
    Xv = blobs([20, 20, 20], seed=1)[0]
    yv = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], 20))
    head = TorchHead(hidden=64, lr=1e-2, epochs=100, patience=3, batch_size=32, device="cpu").fit(X, y, Xv, yv)
    assert head.best_epoch_ < 100 - 3
    again = TorchHead(hidden=64, lr=1e-2, epochs=head.best_epoch_, batch_size=32, device="cpu").fit(X, y)
    np.testing.assert_allclose(head.scores(Xv), again.scores(Xv), rtol=1e-5, atol=1e-6)


def test_a_linear_heads_default_learning_rate_follows_the_length_of_the_vectors():
    """L2-normalised vectors and the same vectors 40 times longer train alike with the default rate (0.1 over
    the mean length), within tens of epochs; the former fixed 0.01 needs more than twice as many on unit vectors."""
    X, y = blobs([60, 60, 60], dim=8)
    Xv, yv = blobs([30, 30, 30], seed=1, dim=8)
    X, Xv = (A / np.linalg.norm(A, axis=1, keepdims=True) for A in (X, Xv))
    unit, long = (TorchHead(patience=5, device="cpu").fit(scale * X, y, scale * Xv, yv) for scale in (1, 40))
    fixed = TorchHead(lr=1e-2, patience=5, device="cpu").fit(X, y, Xv, yv)
    assert unit.default_lr(torch.as_tensor(X)) == pytest.approx(0.1)
    assert unit.best_epoch_ <= 60 and long.best_epoch_ <= 60 and fixed.best_epoch_ > 2 * unit.best_epoch_
    accuracy = [np.mean(head.predict(scale * Xv) == yv) for head, scale in ((unit, 1), (long, 40), (fixed, 1))]
    assert abs(accuracy[0] - accuracy[1]) <= 0.05 and accuracy[0] >= accuracy[2] - 0.05
    assert TorchHead(hidden=8).default_lr(torch.as_tensor(X)) == 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_head_trains_on_the_gpu_when_present():
    X, y = blobs([30, 30, 30])
    Xv, yv = blobs([10, 10, 10], seed=1)
    on_gpu = TorchHead(hidden=32, epochs=20, device="auto")
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(o.device.type))
    try:
        on_gpu.fit(X, y, Xv, yv)
    finally:
        handle.remove()
    assert set(seen) == {"cuda"}
    on_cpu = TorchHead(hidden=32, epochs=20, device="cpu").fit(X, y, Xv, yv)
    assert on_gpu.best_epoch_ == on_cpu.best_epoch_
    assert np.mean(on_gpu.predict(Xv) == on_cpu.predict(Xv)) >= 0.95


@pytest.mark.parametrize("name", ["logreg", "linear_svm", "rbf_svm", "torch_linear"])
def test_balanced_class_weight_favours_the_rare_class(name):
    X, y = blobs([150, 15], seed=3, dim=4)
    Xt, yt = blobs([100, 100], seed=4, dim=4)
    value = 1e-3 if name == "torch_linear" else 1.0
    extra = {"epochs": 30, "device": "cpu"} if name == "torch_linear" else {}
    recall = [np.mean(make_head(name, value, weight, **extra).fit(X, y).predict(Xt[yt == 1]) == 1)
              for weight in (None, "balanced")]
    assert recall[1] > recall[0] + 0.1, recall


def test_bad_settings_are_user_errors():
    with pytest.raises(InputError, match="unknown classifier 'svm'"):
        make_head("svm", 1.0)
    with pytest.raises(InputError, match="has no parameter 'hidden'"):
        make_head("logreg", 1.0, hidden=3)
    with pytest.raises(InputError, match="knn does not support class_weight"):
        make_head("knn", 3, "balanced")
    with pytest.raises(InputError, match="class_weight must be 'balanced'"):
        make_head("logreg", 1.0, "auto")
    with pytest.raises(InputError, match="device must be auto, cpu or cuda"):
        make_head("torch_linear", 1e-3, device="tpu").fit(*blobs([3, 3]))
    for spec in CLASSIFIERS.values():
        assert list(spec.grid) == sorted(spec.grid)


def test_binary_decision_values_get_one_column_per_class():
    X, y = blobs([20, 20])
    svm = make_head("linear_svm", 1.0).fit(X, y)
    scores = head_scores(svm, X)
    assert scores.shape == (40, 2)
    np.testing.assert_array_equal(scores[:, 1], svm.decision_function(X))
    np.testing.assert_array_equal(scores.argmax(1), svm.predict(X))


def test_small_fits_run_on_one_thread_torch_heads_included():
    """train enters the limit before it builds the head (which is when the torch heads import torch)."""
    from threadpoolctl import threadpool_info
    threads = torch.get_num_threads()
    assert [runs_in_torch(name) for name in CLASSIFIERS] == [name.startswith("torch_") for name in CLASSIFIERS]
    with one_thread_if_small(1000, in_torch=True):
        assert torch.get_num_threads() == 1 and all(p["num_threads"] == 1 for p in threadpool_info())
    assert torch.get_num_threads() == threads
    with one_thread_if_small(SMALL_PROBLEM + 1, in_torch=True):
        assert torch.get_num_threads() == threads


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_each_spec_says_what_its_fitted_head_can_do(name):
    """A module of pipeline.heads.classifiers is the one place that names its classifier's capabilities."""
    spec = CLASSIFIERS[name]
    X, y = blobs([12, 12, 12])
    quick = {"epochs": 2} if "epochs" in spec.params else {}
    head = make_head(name, spec.grid[len(spec.grid) // 2], **quick).fit(X, y)
    assert hasattr(head, "predict_proba") == spec.probabilities
    assert getattr(head, "early_stops", False) == spec.early_stops
    scores = head_scores(head, X)
    assert scores.shape == (36, 3) and (scores.argmax(1) == np.searchsorted(head.classes_, head.predict(X))).all()
    if spec.to_torch:
        layers, fill = spec.to_torch(head)
        with torch.no_grad():
            exported = nn.Sequential(*layers)(torch.from_numpy(X)).numpy()
        np.testing.assert_allclose(exported, scores, rtol=1e-4, atol=1e-5)
        assert fill == (0.0 if spec.probabilities else float("-inf"))


def test_the_registry_holds_every_module_of_the_package():
    import pkgutil

    import pipeline.heads.classifiers as package
    modules = {m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}
    assert set(CLASSIFIERS) == modules and next(iter(CLASSIFIERS)) == "logreg"
    assert all(CLASSIFIERS[name].name == name for name in CLASSIFIERS)
