#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run, from the shipped code path; about 7 minutes
# on one H200 (each step has its own time limit, so one stuck step cannot eat the rest).
#
#   ../shared/tools/gpu-bundle                        # here: Ray, MLflow, boto3 for Python 3.12
#   bash benchmarks/gpu.sh                            # there, from the project root (carry
#                                                     # .gpu-bundle); results in $OUT or
#                                                     # benchmarks/results/
set -uo pipefail
out=${OUT:-benchmarks/results}; mkdir -p "$out"
if [ -f .gpu-bundle/site-py312.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .gpu-bundle/site-py312.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
python3 -c "import ray, ray.train, ray.data, mlflow, boto3, torch; print('imports ok', torch.__version__)" || exit 1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv | tee "$out/gpu.txt"
step() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@" 2>&1 | tail -40; }
step 90  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_transforms.py
step 150 python3 benchmarks/train_throughput.py --archs D --size 224 --batch 256 --compile \
           --decode-workers 14 --out "$out/train_throughput_cuda_compile.json"
step 60  python3 benchmarks/data_pipeline.py --device cuda --out "$out/data_pipeline_cuda.json"
step 200 python3 benchmarks/train_pipeline.py --arch D --images 40000 --batch 256 \
           --out "$out/train_pipeline_cuda.json"
step 90  python3 benchmarks/features_throughput.py --images 512 \
           --out "$out/features_throughput_cuda.json"
