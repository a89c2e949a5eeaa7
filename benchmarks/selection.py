"""What `pipeline select` buys, and what it costs:

    python benchmarks/selection.py curves [--work build/select_bench] [--image-size 160] [--pool 5000] [--rounds 8]
                                          [--strategies auto,typical,...] [--seeds 3] [--components 128]
                                          [--auto-switch 5]
    python benchmarks/selection.py scale  [--work build/select_bench]

`curves` writes WORK/images: the demo's 300 test images (data/fashion_mnist_demo.npz) as test/CLASS/ and
the first --pool images of Debian's Fashion-MNIST test set (dataset-fashion-mnist,
/usr/share/datasets/fashion-mnist) that the demo's test set did not take, as the pool in unlabeled/; no
train folder: a cold start. It extracts them with `pipeline extract` (EfficientNet-Lite0 at --image-size
px, by default the demo's 160; a cache already in WORK lends its vectors), then for each strategy labels
rounds of 10 pool images from no label at all (the labels come from the IDX file, as a person would give
them), each round picked by the strategy's code (`pipeline.selection.strategies.choose`) on the labels so
far; random draws 10 seeds, the others --seeds (of their PCA and k-means; --components sets theirs).
After each round one fixed classifier, the same for every strategy, is fitted on the picks and scored on
the test images: scikit-learn's LogisticRegression (lbfgs, C=10 as margin's, max_iter=2000) on
L2-normalised vectors. Prints one JSON line per strategy (the mean accuracy of each round), a Markdown
table (mean ± standard deviation over the seeds), and writes the figure WORK/select_curves.png.

`scale` times `pipeline.selection.run.select` (cache read included) on a cache of 100,000 pool vectors of
1,280 dimensions and 80 labelled ones: the curves' cache's vectors repeated with Gaussian noise of a tenth
of their spread (the class structure kept), one JSON line per strategy.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fashion_folder import CLASSES  # noqa: E402
from benchmarks.stage_two import FASHION, read_idx  # noqa: E402
from pipeline.data.folders import POOL  # noqa: E402
from pipeline.selection.settings import SelectSettings  # noqa: E402
from pipeline.storage.cache import open_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "fashion_mnist_demo.npz"
STRATEGIES = ("auto", "typical", "margin", "coverage")
RANDOM_SEEDS = 10
ROUND = 10


def write_folder(images: Path, pool_size: int | None) -> dict[str, int]:
    """The cold-start folder; returns {pool path: true label}."""
    with np.load(DEMO) as demo:
        test = [(image, int(label)) for image, label, split in zip(demo["images"], demo["labels"], demo["splits"])
                if split == "test"]
    taken = {hashlib.sha256(image.tobytes()).hexdigest() for image, _ in test}
    for n, (image, label) in enumerate(test):
        folder = images / "test" / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"demo-{n:03d}.png")
    truth = {}
    pool = zip(read_idx(FASHION / "t10k-images-idx3-ubyte.gz"), read_idx(FASHION / "t10k-labels-idx1-ubyte.gz"))
    (images / "unlabeled").mkdir(parents=True, exist_ok=True)
    for n, (image, label) in enumerate(pool):
        if hashlib.sha256(image.tobytes()).hexdigest() in taken:
            continue
        path = f"unlabeled/t10k-{n:05d}.png"
        Image.fromarray(image).save(images / path)
        truth[path] = int(label)
        if pool_size and len(truth) == pool_size:
            break
    return truth


def vectors(work: Path, image_size: int, pool_size: int | None):
    """Test vectors and labels, pool vectors and true labels, from the cold-start cache."""
    from pipeline.features.extract import extract_folder
    from pipeline.features.settings import ExtractSettings
    images, cache_path = work / "images", work / f"fashion_{image_size}.h5"
    truth_file = work / "truth.json"
    if not truth_file.exists():
        truth_file.write_text(json.dumps(write_folder(images, pool_size)))
    truth = json.loads(truth_file.read_text())
    if pool_size and len(truth) != pool_size:
        sys.exit(f"error: {work} holds a pool of {len(truth)} images, not {pool_size}: give another --work")
    start = time.perf_counter()
    summary = extract_folder(images, cache_path, ExtractSettings(image_size=image_size, workers=2), quiet=True)
    print(json.dumps({"extract": str(cache_path), "images": summary.extracted, "computed": summary.computed,
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    with open_cache(cache_path) as cache:   # its classes are sorted by name, the IDX file's are not
        test, pool, classes = cache.read("test"), cache.read(POOL), cache.classes
    return test.features, test.labels, pool.features, np.array([classes.index(CLASSES[truth[p]]) for p in pool.paths])


def accuracy(X, y, X_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize
    if len(np.unique(y)) < 2:
        return float(np.mean(y_test == y[0]))
    model = LogisticRegression(C=10.0, max_iter=2000).fit(normalize(X), y)
    return float(np.mean(model.predict(normalize(X_test)) == y_test))


def curve(strategy: str, pool, truth, test, rounds: int, seed: int = 0, components: int = 128,
          auto_switch: float = 5.0) -> list[float]:
    """Accuracy after each round of ROUND labels, from none."""
    from pipeline.selection.strategies import choose
    rng, labelled, out = np.random.default_rng(seed), np.empty(0, int), []
    for _ in range(rounds):
        rest = np.setdiff1d(np.arange(len(pool)), labelled)
        if strategy == "random":
            picked = rng.choice(rest, ROUND, replace=False)
        else:
            s = SelectSettings(budget=ROUND, strategy=strategy, seed=seed, components=components,
                               auto_switch=auto_switch)
            picked = rest[[p.row for p in choose(pool[labelled], truth[labelled], pool[rest], len(CLASSES), s)]]
        labelled = np.concatenate([labelled, picked])
        out.append(accuracy(pool[labelled], truth[labelled], *test))
    return out


def plot(results: dict[str, np.ndarray], title: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in results.items():
        labels = ROUND * np.arange(1, runs.shape[1] + 1)
        ax.plot(labels, runs.mean(axis=0), marker="o", label=name if len(runs) == 1 else
                f"{name} (mean of {len(runs)} seeds, band: min-max)")
        if len(runs) > 1:
            ax.fill_between(labels, runs.min(axis=0), runs.max(axis=0), alpha=0.2)
    ax.set(xlabel="labelled images", ylabel="test accuracy (logistic regression)",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def curves(args) -> None:
    X_test, y_test, pool, truth = vectors(args.work, args.image_size, args.pool)
    results = {}
    for strategy in args.strategies.split(","):
        seeds = range(RANDOM_SEEDS) if strategy == "random" else range(args.seeds)
        start = time.perf_counter()
        results[strategy] = np.array([curve(strategy, pool, truth, (X_test, y_test), args.rounds, seed,
                                            args.components, args.auto_switch)
                                      for seed in seeds])
        print(json.dumps({"strategy": strategy, "pool": len(pool), "seconds": round(time.perf_counter() - start, 1),
                          "accuracy": results[strategy].mean(axis=0).round(3).tolist()}), flush=True)
    marks = [n for n in (10, 20, 40, 80, 160) if n <= ROUND * args.rounds]
    print("\n| strategy | " + " | ".join(f"{n} labels" for n in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for name, runs in results.items():
        cells = [f"{runs[:, n // ROUND - 1].mean():.3f}" + (f" ± {runs[:, n // ROUND - 1].std():.3f}" if len(runs) > 1 else "")
                 for n in marks]
        print(f"| {name} | " + " | ".join(cells) + " |")
    plot(results, f"Fashion-MNIST pool of {len(pool):,}, EfficientNet-Lite0 at {args.image_size} px",
         args.work / "select_curves.png")


def scale(args) -> None:
    from pipeline.features.spec import BackboneSpec, Preprocessing
    from pipeline.selection.run import select
    from pipeline.storage.cache import FeatureWriter, cache_attrs
    with open_cache(args.work / f"fashion_{args.image_size}.h5") as cache:
        base, test = cache.read(POOL).features, cache.read("test")
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(base), 100_000)
    noisy = base[rows] + rng.normal(0, 0.1 * base.std(), (len(rows), base.shape[1])).astype(np.float32)
    spec = BackboneSpec("efficientnet_lite0", "imagenet", "none", ("pool",),
                        Preprocessing(96, 96, "bilinear", (0, 0, 0), (1, 1, 1)))
    path = args.work / "scale.h5"
    writer = FeatureWriter(path, cache_attrs(spec, list(CLASSES), "float16"), {"pool": base.shape[1]}, "float16")
    writer.append("train", {"pool": test.features[:80]}, test.labels[:80], [f"t/{i}" for i in range(80)],
                  [hashlib.sha256(f"t{i}".encode()).hexdigest() for i in range(80)])
    for a in range(0, len(rows), 10_000):
        writer.append(POOL, {"pool": noisy[a:a + 10_000]}, [], [f"p/{i}" for i in range(a, a + 10_000)],
                      [hashlib.sha256(f"p{i}".encode()).hexdigest() for i in range(a, a + 10_000)])
    writer.commit()
    for strategy in ("typical", "margin", "coverage", "random"):
        start = time.perf_counter()
        picks = select(path, SelectSettings(budget=10, strategy=strategy))
        print(json.dumps({"strategy": strategy, "pool": len(rows), "dims": base.shape[1], "budget": len(picks),
                          "seconds": round(time.perf_counter() - start, 1), "threads": os.environ.get("OMP_NUM_THREADS"),
                          "load_average": [round(v, 2) for v in os.getloadavg()]}), flush=True)
    path.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("curves", "scale"))
    p.add_argument("--work", type=Path, default=ROOT / "build" / "select_bench")
    p.add_argument("--image-size", type=int, default=160, help="px of the extraction (the demo's: 160)")
    p.add_argument("--pool", type=int, default=5000, help="pool images at most (0: all 9,700)")
    p.add_argument("--rounds", type=int, default=8, help="rounds of 10 labels")
    p.add_argument("--strategies", default=",".join((*STRATEGIES, "random")), help="comma-separated, in order")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each strategy but random (which runs 10)")
    p.add_argument("--components", type=int, default=SelectSettings.components,
                   help="PCA components of the strategies (1280: no reduction)")
    p.add_argument("--auto-switch", type=float, default=SelectSettings.auto_switch,
                   help="labelled images per class from which auto picks by margin")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    curves(args) if args.part == "curves" else scale(args)


if __name__ == "__main__":
    main()
