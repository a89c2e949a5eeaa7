"""Calibrated scores and the familiarity of new images (pipeline.heads.calibration, .familiarity)."""
from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from pipeline.heads import calibration, familiarity


def sampled(temperature: float, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits, and labels drawn from softmax(logits / temperature): the temperature that calibrates them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, classes))
    p = calibration.softmax(z, temperature)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, y


def test_the_fitted_temperature_is_the_one_that_made_the_labels_and_keeps_top1():
    z, y = sampled(2.5)
    t = calibration.fit_temperature(z, y)
    assert abs(t - 2.5) < 0.15
    assert (calibration.softmax(z, t).argmax(1) == z.argmax(1)).all()


def test_calibration_error_is_small_for_calibrated_scores_and_large_for_overconfident_ones():
    z, y = sampled(1.0)
    table = calibration.reliability(calibration.softmax(z), y)
    assert len(table) == calibration.BINS and sum(row["count"] for row in table) == len(y)
    assert calibration.expected_calibration_error(table) < 0.02
    overconfident = calibration.reliability(calibration.softmax(z, 0.3), y)
    assert calibration.expected_calibration_error(overconfident) > 0.1


def test_logits_keep_unseen_classes_impossible():
    probabilities = np.array([[0.7, 0.3, 0.0]])
    decisions = np.array([[1.5, -0.5, -np.inf]])
    for scores, kind in ((probabilities, True), (decisions, False)):
        p = calibration.softmax(calibration.logits(scores, kind), 2.0)
        assert np.isfinite(p).all() and p[0, 2] < 1e-2 and p.argmax() == 0


def test_nearest_similarities_in_blocks_match_an_exhaustive_search(monkeypatch):
    rng = np.random.default_rng(1)
    reference = familiarity.unit_rows(rng.normal(size=(300, 16)))
    queries = familiarity.unit_rows(rng.normal(size=(70, 16)))
    monkeypatch.setattr(familiarity, "BLOCK", 32)   # several blocks
    sims = familiarity.nearest_similarities(queries, reference, 5)
    distances, _ = NearestNeighbors(n_neighbors=5, metric="cosine").fit(reference).kneighbors(queries)
    np.testing.assert_allclose(sims, 1 - distances, atol=1e-5)


def test_images_of_another_domain_are_unfamiliar_and_the_threshold_keeps_the_quantile():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 32)) * 3
    near = lambda n: centres[rng.integers(0, 4, n)] + rng.normal(size=(n, 32))   # noqa: E731
    model = familiarity.Familiarity.fit(near(400), near(200), quantile=0.9)
    assert abs(np.mean(model.familiar(model.novelty(near(2000)))) - 0.9) < 0.05
    far = rng.normal(size=(200, 32)) * 3
    assert not model.familiar(model.novelty(far)).any()
