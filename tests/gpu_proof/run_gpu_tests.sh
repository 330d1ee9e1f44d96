# On a GPU machine with no network: `just test -m gpu` on the kit's tiny model (tests/worker/test_gpu_worker.py).
# Needs, beside the checkout, .gpu-kit/ (`just gpu-kit`) and .whl/ with the CPython 3.12 wheels of the test
# tools the machine lacks (2026-11-30: openai, httpx2, httpcore2, truststore, jiter, distro, sniffio, anyio,
# idna, h11, asyncssh, cryptography, cffi, pycparser, pytest, pluggy, iniconfig, pytest-asyncio,
# pytest-timeout; fetched with `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`).
# Run from the checkout: bash tests/gpu_proof/run_gpu_tests.sh  (OUT=folder for the log)
set -o pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    $(ls .gpu-kit/wheels/*.whl | grep -v rbee_fleet) .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 CUDA_HOME=/usr/local/cuda TORCH_EXTENSIONS_DIR=/tmp/torch_ext
export CPLUS_INCLUDE_PATH=$(ls -d /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/include 2>/dev/null | paste -sd:)
export RBEE_GPU_TEST_MODEL=$PWD/.gpu-kit/model
python3 -c "import exllamav2, openai, asyncssh, pytest_asyncio, rbee_fleet; print('imports ok', rbee_fleet.__file__)" || exit 1
timeout 400 python3 -m pytest -m gpu -s -v -p no:cacheprovider tests/worker/test_gpu_worker.py 2>&1 | tee "${OUT:-.}/gpu-tests.log"
echo "pytest exit: $?"
