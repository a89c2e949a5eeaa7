"""The unlabelled pool and `pipeline select`: a cold start, each round of labelling (move the files, extract
again: nothing is computed), picks that are never labelled or repeated, and bad input as one line."""
from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.data.folders import POOL, scan
from pipeline.features.extract import extract_folder
from pipeline.features.settings import ExtractSettings
from pipeline.runtime.errors import InputError
from pipeline.selection.run import select
from pipeline.selection.settings import STRATEGIES, SelectSettings
from pipeline.storage.cache import open_cache
from tests.conftest import COLOURS, ROOT, cli_in_process, make_image_folder, synthetic_cache, tiny_image


def unlabelled(root: Path, per_class: int, seed: int = 500) -> list[Path]:
    """Images of every colour under ROOT/unlabeled/, at some depth."""
    out = []
    for n, colour in enumerate(COLOURS.values()):
        folder = root / "unlabeled" / f"batch{n}" / "inner"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            out.append(folder / f"{n}_{i}.png")
            tiny_image(colour, seed + 100 * n + i).save(out[-1])
    return out


def test_cold_start_classes_are_the_union_of_the_labelled_splits(tmp_path, capsys):
    root = tmp_path / "images"
    (root / "train" / "red").mkdir(parents=True)                         # empty class folders: no label yet
    (root / "train" / "green").mkdir(parents=True)
    make_image_folder(root, {"test": 2}, classes=("green", "blue"))
    unlabelled(root, 2)
    dataset = scan(root)
    assert dataset.classes == ["blue", "green", "red"]
    assert len(dataset.split(POOL)) == 6 and not dataset.split("train") and dataset.groups() == ["test", POOL]
    assert capsys.readouterr().err.splitlines() == ["warning: class 'red' has no labelled image yet"]
    shutil.rmtree(root / "unlabeled")                                   # without a pool, the rules as before
    with pytest.raises(InputError, match="class folder .*blue has no counterpart in .*train"):
        scan(root)
    shutil.rmtree(root / "train")
    unlabelled(root, 1)
    assert scan(root).classes == ["blue", "green"]                       # no train folder at all


def test_a_pool_alone_is_a_cold_start_without_classes(tmp_path):
    unlabelled(tmp_path, 2)
    dataset = scan(tmp_path)
    assert dataset.classes == [] and len(dataset.samples) == 6 and {s.label for s in dataset.samples} == {-1}


def test_early_rounds_keep_small_classes_whole_in_train(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images", {"train": 3}, classes=("red",))
    make_image_folder(root, {"train": 12}, classes=("green", "blue"))
    unlabelled(root, 1)
    dataset = scan(root)
    assert len([s for s in dataset.split("train") if s.label == dataset.classes.index("red")]) == 3
    assert {dataset.classes[s.label] for s in dataset.split("val")} == {"green", "blue"}
    warnings = [line for line in capsys.readouterr().err.splitlines() if "fewer than" in line]
    assert warnings == ["warning: fewer than 5 labelled images, all kept in train (none cut for val or test): red"]


def test_labels_file_rows_without_a_label_are_the_pool_with_pool(tmp_path):
    root = make_image_folder(tmp_path / "images", {"all": 4}, split_folders=False)
    rows = [(p.relative_to(root).as_posix(), p.parent.name if p.stem != "all_3" else "")
            for p in sorted(root.rglob("*.png"))]
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n" + "".join(f"{i},{y}\n" for i, y in rows))
    without = scan(root, labels=labels)
    assert not without.split(POOL) and sum("has no label" in r for _, r in without.skipped) == 3
    pooled = scan(root, labels=labels, pool=True)
    assert sorted(s.path for s in pooled.split(POOL)) == [f"{c}/all_3.png" for c in sorted(COLOURS)]
    assert not any("has no label" in r for _, r in pooled.skipped)


def test_labelling_by_moving_files_reuses_every_vector(tmp_path):
    root = tmp_path / "images"
    for name in COLOURS:
        (root / "train" / name).mkdir(parents=True)
    pool = unlabelled(root, 4)
    out, settings = tmp_path / "features.h5", ExtractSettings(image_size=64, workers=0, dtype="float32")
    first = extract_folder(root, out, settings, quiet=True)
    assert (first.computed, first.reused) == (12, 0)
    with open_cache(out) as cache:
        assert cache.splits == [] and cache.classes == sorted(COLOURS)
        before = dict(zip(cache.read(POOL).paths, cache.read(POOL).features))
    for n, name in enumerate(COLOURS):                                   # label two of each class
        for image in [p for p in pool if p.name.startswith(f"{n}_")][:2]:
            image.rename(root / "train" / name / image.name)
    second = extract_folder(root, out, settings, quiet=True)
    assert (second.extracted, second.computed, second.reused) == (12, 0, 12)
    with open_cache(out) as cache:
        train, left = cache.read("train"), cache.read(POOL)
        assert len(train.paths) == 6 and len(left.paths) == 6 and cache.splits == ["train"]
        for path, vector in zip(train.paths, train.features):
            name = Path(path).name
            np.testing.assert_array_equal(vector, next(v for p, v in before.items() if p.endswith("/" + name)))


def test_train_works_from_what_is_labelled_in_early_rounds(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images", {"train": 2, "test": 2})
    unlabelled(root, 2)
    cache, settings = tmp_path / "f.h5", ExtractSettings(image_size=64, workers=0, dtype="float32")
    extract_folder(root, cache, settings, quiet=True)
    capsys.readouterr()
    model = pipeline.train(cache, "logreg", tmp_path / "m")                # no val split: 2-fold cv on train
    m = model.metrics
    assert (m["eval_split"], m["n_val"], m["n_test"], m["selection"]) == ("test", 0, 6, "2-fold cv on train")
    assert 0 <= m["val_score"] <= 1 and len(model.details["search"]["scores"]) > 1
    assert "warning: logreg: no val split: C chosen by 2-fold cv on train, evaluated on test" in \
        capsys.readouterr().err.splitlines()
    (root / "train" / "red" / "train_0.png").rename(root / "unlabeled" / "back.png")   # red: one image left
    assert extract_folder(root, cache, settings, quiet=True).computed == 0
    capsys.readouterr()
    model = pipeline.train(cache, "logreg")
    m = model.metrics
    assert m["val_score"] is None and m["selection"] == "none (a class has a single training image)"
    assert model.details["hyperparameters"]["C"] == 1.0 and model.details["search"]["scores"] == {}
    assert "calibration" not in model.info and m["ece"] == m["ece_uncalibrated"]
    assert capsys.readouterr().err.splitlines() == [
        "warning: logreg: no val split, and a class has a single training image, which no fold can score: C=1 kept "
        "unscored, no calibration"]
    with pytest.raises(InputError, match="kept its hyperparameters unscored .*label more images"):
        pipeline.compare([tmp_path / "m", model.save(tmp_path / "one")])


def test_train_refuses_a_cache_it_cannot_learn_from_or_evaluate_on_in_one_line(tmp_path):
    X = np.eye(4, dtype=np.float32)
    only_train = synthetic_cache(tmp_path / "a.h5", {"train": (X, np.array([0, 1, 0, 1]))}, ["a", "b"])
    with pytest.raises(InputError, match="has no val or test split; stage two needs train, and val or test"):
        pipeline.train(only_train)
    one_class = synthetic_cache(tmp_path / "b.h5", {"train": (X, np.zeros(4, int)), "test": (X, np.zeros(4, int))},
                                ["a", "b"])
    with pytest.raises(InputError, match="has training images of one class only; stage two needs two at least"):
        pipeline.train(one_class)


def test_a_scikit_learn_classifier_keeps_its_grids_middle_unscored_when_a_class_has_one_image(tmp_path, capsys):
    from sklearn.linear_model import RidgeClassifier
    X = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    cache = synthetic_cache(tmp_path / "f.h5", {"train": (X[:7], y[:7]), "test": (X, y)}, ["a", "b", "c"])
    model = pipeline.train(cache, RidgeClassifier(), grid={"alpha": [0.1, 1.0, 10.0]})
    assert model.metrics["val_score"] is None and model.details["hyperparameters"]["alpha"] == 1.0
    assert capsys.readouterr().err.splitlines() == [
        "warning: RidgeClassifier: no val split, and a class has a single training image, which no fold can "
        "score: alpha=1 kept unscored, no calibration"]


def pooled_cache(path: Path, labelled: int = 12, pool: int = 60, classes: int = 3, seed: int = 0) -> tuple[Path, dict]:
    """A real cache of clustered vectors: `labelled` train rows and a pool of `pool` rows, of which the first
    three repeat labelled images byte for byte and each of the next three is there twice. Returns the path
    and {pool path: sha256}."""
    from pipeline.features.spec import BackboneSpec, Preprocessing
    from pipeline.storage.cache import FeatureWriter, cache_attrs
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, 16))
    y = np.arange(labelled + pool) % classes
    X = (centres[y] + rng.normal(0, 0.6, (len(y), 16))).astype(np.float32)
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(len(y))]
    pool_digests = digests[:3] + [digests[labelled + 3 + i % 3] for i in range(6)] + digests[labelled + 9:]
    pool_rows = list(range(3)) + [labelled + 3 + i % 3 for i in range(6)] + list(range(labelled + 9, len(y)))
    spec = BackboneSpec("synthetic", "none", "none", ("none",), Preprocessing(1, 1, "bilinear", (0, 0, 0), (1, 1, 1)))
    writer = FeatureWriter(path, cache_attrs(spec, [f"c{i}" for i in range(classes)], "float32"), {"none": 16}, "float32")
    if labelled:
        writer.append("train", {"none": X[:labelled]}, y[:labelled], [f"train/{i}.png" for i in range(labelled)],
                      digests[:labelled])
    paths = [f"unlabeled/{i}.png" for i in range(len(pool_rows))]
    writer.append(POOL, {"none": X[pool_rows]}, [], paths, pool_digests)
    writer.commit()
    return path, dict(zip(paths, pool_digests))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_picks_are_never_labelled_or_repeated(tmp_path, strategy):
    cache, digest_of = pooled_cache(tmp_path / "f.h5")
    with open_cache(cache) as opened:
        labelled = set(opened.read("train").sha256)
    budget = len(set(digest_of.values()) - labelled)                      # every distinct unlabelled image
    rows = select(cache, SelectSettings(budget=budget, strategy=strategy))
    picked = [digest_of[r["path"]] for r in rows]
    assert len(rows) == budget and len(set(picked)) == budget and not set(picked) & labelled
    assert {r["strategy"] for r in rows} == {"typical" if strategy == "auto" else strategy}   # 4 per class
    with pytest.raises(InputError, match=f"--budget {budget + 1} is more than the {budget} distinct unlabelled"):
        select(cache, SelectSettings(budget=budget + 1, strategy=strategy))


def test_auto_starts_typical_and_switches_to_margin(tmp_path):
    cold, _ = pooled_cache(tmp_path / "cold.h5", labelled=0)
    assert {r["strategy"] for r in select(cold, SelectSettings(budget=5))} == {"typical"}
    few, _ = pooled_cache(tmp_path / "few.h5", labelled=12)
    assert {r["strategy"] for r in select(few, SelectSettings(budget=5, auto_switch=5))} == {"typical"}
    assert {r["strategy"] for r in select(few, SelectSettings(budget=5, auto_switch=4))} == {"margin"}


def test_typical_picks_one_image_per_cluster_first(tmp_path):
    cache, _ = pooled_cache(tmp_path / "f.h5", labelled=0, pool=300, classes=6)
    rows = select(cache, SelectSettings(budget=6, strategy="typical"))
    assert len({r["cluster"] for r in rows}) == 6 and all(float(r["score"]) > 0 for r in rows)


def test_the_command_writes_the_picks_in_labelling_order(tmp_path):
    cache, digest_of = pooled_cache(tmp_path / "f.h5")
    proc = cli_in_process("select", cache, "--budget", 4, "--strategy", "coverage", "--out", tmp_path / "picks.csv")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"4 images to label, picked by coverage -> {tmp_path / 'picks.csv'}\n"
    with open(tmp_path / "picks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [list(r) for r in rows] == [["path", "strategy", "score", "cluster"]] * 4
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)


def test_the_api_gives_the_commands_rows_and_refuses_bad_settings_before_writing(tmp_path):
    cache, _ = pooled_cache(tmp_path / "f.h5")
    rows = pipeline.select(cache, budget=4, strategy="coverage")
    cli_in_process("select", cache, "--budget", 4, "--strategy", "coverage", "--out", tmp_path / "picks.csv",
                   check=True)
    with open(tmp_path / "picks.csv", newline="") as f:
        assert [{k: str(v) for k, v in r.items()} for r in rows] == list(csv.DictReader(f))
    with pytest.raises(pipeline.InputError, match="budget must be at least 1, got 0"):
        pipeline.select(cache, tmp_path / "other.csv", budget=0)
    assert not (tmp_path / "other.csv").exists()


@pytest.mark.parametrize("args, words", [
    (("--budget", 0), "error: --budget must be at least 1, got 0"),
    (("--budget", 1000), "error: --budget 1000 is more than the 54 distinct unlabelled images of the pool of"),
    (("--strategy", "entropy"), "'entropy' is not one of 'auto', 'typical', 'margin', 'coverage', 'random'"),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    cache, _ = pooled_cache(tmp_path / "f.h5")
    proc = cli_in_process("select", cache, *args, "--out", tmp_path / "picks.csv")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and words in proc.stderr, proc.stderr
    assert not (tmp_path / "picks.csv").exists()


def test_a_cache_without_a_pool_is_one_line(tmp_path):
    X = np.eye(4, dtype=np.float32)
    cache = synthetic_cache(tmp_path / "f.h5", {"train": (X, np.array([0, 1, 0, 1]))}, ["a", "b"])
    proc = cli_in_process("select", cache, "--out", tmp_path / "picks.csv")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: feature cache {cache} has no unlabelled pool; "
                                                           f"put the images to choose from in unlabeled/"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "picks.csv").exists()


def test_margin_with_one_labelled_class_falls_back_to_typical(tmp_path):
    cache, _ = pooled_cache(tmp_path / "f.h5", labelled=1)
    proc = cli_in_process("select", cache, "--strategy", "margin", "--budget", 3, "--out", tmp_path / "picks.csv")
    assert proc.returncode == 0 and proc.stderr.splitlines()[0] == (
        "warning: margin needs labelled images of two classes at least, there are of 1; picking by typical instead")
    with open(tmp_path / "picks.csv", newline="") as f:
        assert [r["strategy"] for r in csv.DictReader(f)] == ["typical"] * 3



def accuracy(vectors: dict[str, np.ndarray], paths: list[str], truth: dict[str, int], test) -> float:
    """Test accuracy of a logistic regression (C=10, L2-normalised vectors) trained on the images `paths`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize
    model = LogisticRegression(C=10.0, max_iter=2000)
    model.fit(normalize(np.array([vectors[p] for p in paths])), [truth[p] for p in paths])
    return float(np.mean(model.predict(normalize(test.features)) == test.labels))


@pytest.mark.slow   # 1,300 images extracted, then read again twice (9-40 s on 2 shared cores)
def test_the_loop_on_the_demo_images_typical_beats_random_at_20_labels(tmp_path):
    """The documented loop on real images of clothing: extract a cold start (the demo's test images labelled,
    its training images unlabelled), select 10, label them by moving the files, extract again (nothing
    computed), select 10 more; the 20 picks train a better classifier than 20 random images, on average."""
    from pipeline.data.demo import write_image_folder
    root = tmp_path / "demo"
    write_image_folder(ROOT / "data" / "fashion_mnist_demo.npz", root)
    shutil.rmtree(root / "val")
    (root / "train").rename(root / "unlabeled")
    classes = sorted(p.name for p in (root / "test").iterdir())
    truth = {p.relative_to(root).as_posix(): classes.index(p.parent.name) for p in (root / "unlabeled").rglob("*.png")}
    out, settings = tmp_path / "features.h5", ExtractSettings(image_size=64, workers=0)
    extract_folder(root, out, settings, quiet=True)
    with open_cache(out) as cache:
        test, pool = cache.read("test"), cache.read(POOL)
    vectors = dict(zip(pool.paths, pool.features))
    picked: list[str] = []
    for _ in range(2):
        rows = select(out, SelectSettings(budget=10))                   # auto: typical, so few are labelled
        assert {r["strategy"] for r in rows} == {"typical"} and not set(picked) & {r["path"] for r in rows}
        for row in rows:                                                 # a person labels them
            folder = root / "train" / classes[truth[row["path"]]]
            folder.mkdir(parents=True, exist_ok=True)
            (root / row["path"]).rename(folder / Path(row["path"]).name)
        picked += [row["path"] for row in rows]
        assert extract_folder(root, out, settings, quiet=True).computed == 0
    drawn = [accuracy(vectors, list(np.random.default_rng(seed).choice(sorted(truth), 20, replace=False)), truth, test)
             for seed in range(10)]
    assert accuracy(vectors, picked, truth, test) > np.mean(drawn), (accuracy(vectors, picked, truth, test), drawn)


def test_shards_carry_the_pool(tmp_path):
    """`extract --nproc`: the shards' pools join into the pool one process writes."""
    from pipeline.features.backbones.loading import build_backbone
    from pipeline.features.extract import extract
    from pipeline.features.sharded import concatenate, shard, shard_path
    root = tmp_path / "images"
    make_image_folder(root, {"train": 1}, classes=("red", "green"))
    unlabelled(root, 1)
    dataset = scan(root, 0, 0)
    backbone = build_backbone("efficientnet_lite0", "none", None, 64)
    settings = ExtractSettings(device="cpu", dtype="float32", workers=0)
    single, out = tmp_path / "single.h5", tmp_path / "joined.h5"
    extract(dataset, backbone, single, settings, quiet=True)
    shards = [shard_path(out, r, 2) for r in range(2)]
    for r, path in enumerate(shards):
        extract(shard(dataset, r, 2), backbone, path, settings, quiet=True, shard_of=out)
    concatenate(dataset, shards, out)
    with open_cache(single) as a, open_cache(out) as b:
        assert a.read(POOL).paths == b.read(POOL).paths and len(b.read(POOL).paths) == 3
        np.testing.assert_allclose(a.read(POOL).features, b.read(POOL).features, rtol=1e-4, atol=1e-4)
        assert a.read("train").paths == b.read("train").paths
