"""Fleet wire models: operations, job events, heartbeats and the status views built from them.

Every program imports these; none defines its own copy of a payload.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rbee_fleet.contracts.vocabulary import BackendChoice, PlacementPolicy

# ---------------------------------------------------------------------------------------------
# Devices


class GpuInfo(BaseModel):
    index: int
    name: str
    uuid: str = ""
    vram_total_mb: int
    vram_free_mb: int
    compute_capability: str = ""
    driver: str = ""


class CpuInfo(BaseModel):
    model: str = ""
    cores: int
    threads: int
    ram_total_mb: int
    ram_available_mb: int


class EngineDevice(BaseModel):
    """A device llama-server can run a model on, in its own view (``--list-devices``)."""

    id: str  # the fleet's name: cuda:0, vulkan:1, rocm:0, metal
    name: str  # llama-server's: CUDA0, Vulkan1, ROCm0, MTL0
    description: str = ""
    memory_total_mb: int
    memory_free_mb: int
    unified: bool = False  # shares the machine's RAM (Apple Silicon): counted as GPU memory all the same


class DeviceInfo(BaseModel):
    cpu: CpuInfo
    gpus: list[GpuInfo] = []  # NVIDIA GPUs from NVML (the exllamav2 backend, free-memory figures)
    gpu_error: str | None = None  # why GPU detection found nothing, when a driver is half there
    engine_devices: list[EngineDevice] = []  # what llama-server can use here (every vendor)
    # For each GPU backend of llama.cpp: "ok", or why it serves nothing here ("not installed", no driver …).
    engine_backends: dict[str, str] = {}
    cpu_variant: str = ""  # the CPU backends llama-server has here (x64, haswell, …)


# ---------------------------------------------------------------------------------------------
# Workers and hives


class WorkerState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class WorkerHeartbeat(BaseModel):
    """Sent by each worker straight to the queen, and on every state change."""

    worker_id: str
    hive_id: str
    model: str
    backend: str
    device: str
    url: str
    state: WorkerState
    slots_busy: int = 0
    slots_total: int = 1
    queue_depth: int = 0
    queue_capacity: int = 0
    tokens_per_second: float = 0.0
    tokens_generated_total: int = 0  # tokens streamed to clients
    tokens_decoded_total: int = 0  # tokens the backend decoded, including those of cancelled requests
    requests_total: int = 0
    context_length: int = 0
    pid: int = 0
    version: str = ""
    started_at: float = 0.0
    # What the worker's engine can serve (see contracts.capabilities); empty from older workers.
    capabilities: list[str] = []
    # With "infill": the model's fill-in-the-middle markers (prefix, suffix, middle) the queen writes into prompts.
    fim_tokens: list[str] = []
    # GPU backends fill these in.
    cache_tokens_total: int | None = None
    cache_tokens_free: int | None = None
    vram_used_mb: int | None = None  # GPU memory the worker holds (llama-server: its buffers on GPUs)
    gpu_layers: int | None = None  # llama-server: layers on GPUs, of ``model_layers``
    model_layers: int | None = None


class HeartbeatAck(BaseModel):
    ok: bool = True
    heartbeat_interval_s: float
    # How often the queen wants a pulse (see WorkerPulse); None from a queen that takes no pulses.
    pulse_interval_s: float | None = None


class WorkerPulse(BaseModel):
    """A worker's cheap, frequent proof of life, sent between its full heartbeats.

    It names the worker process and nothing else, so it never waits on the engine: a worker busy with a
    long prompt keeps pulsing, while a frozen host or a paused process falls silent within seconds.
    """

    worker_id: str
    pid: int
    started_at: float


class PulseAck(BaseModel):
    # False when the queen does not know this process (it restarted, or forgot the worker): send a heartbeat.
    known: bool


class _Word(str, Enum):
    """A state that reads as its word wherever it is shown (``f"{state}"`` is ``running``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class ProcessState(_Word):
    """A worker process as its hive sees it (the worker's own state is ``WorkerState``)."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def gone(self) -> bool:
        """Not running and not coming back by itself."""
        return self in (ProcessState.STOPPED, ProcessState.FAILED)

    @property
    def active(self) -> bool:
        """Running, or on its way (starting, restarting)."""
        return self in (ProcessState.STARTING, ProcessState.RUNNING, ProcessState.RESTARTING)


class SupervisedWorker(BaseModel):
    """The hive's view of a worker process it runs."""

    worker_id: str
    model: str
    backend: str
    device: str
    port: int
    url: str
    pid: int | None
    state: ProcessState
    restarts: int = 0
    last_exit: str | None = None
    log_path: str = ""
    # The inventory worker this process serves (a deploy's replacement runs under another id), and the
    # settings it was spawned with (``WorkerSpawnOp.settings()``): what a deploy compares with the inventory.
    declared_as: str | None = None
    settings: dict[str, Any] = {}


class ModelEntry(BaseModel):
    """One model in a hive's catalog."""

    id: str
    format: Literal["gguf", "exl2", "safetensors", "unknown"]
    path: str
    size_bytes: int
    source: str
    builtin: bool = False


class HiveHeartbeat(BaseModel):
    hive_id: str
    url: str
    version: str
    embedded: bool = False
    devices: DeviceInfo
    workers: list[SupervisedWorker] = []
    started_at: float = 0.0
    models: list[ModelEntry] = []  # the hive's catalog: what the queen may load on demand


# ---------------------------------------------------------------------------------------------
# Operations (the payload of POST /v1/jobs)

# Worker ids name files (logs) and processes: letters, digits, '.', '_' and '-' only, never a path.
WORKER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hive: str = "localhost"


class WorkerSpawnOp(_Op):
    kind: Literal["worker_spawn"] = "worker_spawn"
    model: str
    backend: BackendChoice = "auto"
    device: str = "cpu"  # cpu, cuda:N[,M], vulkan:N, rocm:N, metal, or auto: the hive picks by free memory
    gpu_layers: int | None = Field(default=None, ge=0)  # llamacpp on a GPU; None: every layer that fits
    placement: PlacementPolicy = "binpack"  # how device="auto" chooses among GPUs
    worker_id: str | None = Field(default=None, pattern=WORKER_ID_PATTERN)
    ctx_size: int | None = Field(default=None, ge=128)
    threads: int | None = Field(default=None, ge=1)
    max_queue: int | None = Field(default=None, ge=0)
    slots: int | None = Field(default=None, ge=1, le=256)  # parallel sequences (llamacpp)
    embeddings: bool = False  # serve /v1/embeddings (llamacpp)
    options: dict[str, Any] = {}
    # Set by deploys: the inventory's id for this worker, kept when a replacement runs under another id.
    declared_as: str | None = Field(default=None, pattern=WORKER_ID_PATTERN)

    def settings(self) -> dict[str, Any]:
        """What the worker runs with, as declared: everything but where it goes and what it is called."""
        return self.model_dump(mode="json", exclude={"kind", "hive", "worker_id", "declared_as"})


class WorkerStopOp(_Op):
    kind: Literal["worker_stop"] = "worker_stop"
    worker_id: str = Field(pattern=WORKER_ID_PATTERN)


class ModelDownloadOp(_Op):
    kind: Literal["model_download"] = "model_download"
    source: str  # an alias, a local path, an http(s) URL or hf:owner/repo[:file][@revision]
    name: str | None = None


class ModelDeleteOp(_Op):
    kind: Literal["model_delete"] = "model_delete"
    model: str


Operation = Annotated[
    WorkerSpawnOp | WorkerStopOp | ModelDownloadOp | ModelDeleteOp,
    Field(discriminator="kind"),
]


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    operation: Operation


class JobCreated(BaseModel):
    job_id: str


class JobState(_Word):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Progress(BaseModel):
    current: float
    total: float | None = None
    unit: str = ""


class JobEvent(BaseModel):
    """One line of a job's SSE stream."""

    job_id: str
    seq: int
    type: Literal["started", "progress", "log", "result", "error", "cancelled"]
    message: str = ""
    progress: Progress | None = None
    data: dict[str, Any] | None = None
    ts: float


class JobInfo(BaseModel):
    job_id: str
    operation: dict[str, Any]
    state: JobState
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# What the queen reports


class WorkerView(BaseModel):
    """A worker as the queen sees it: its last heartbeat plus the queen's own counters."""

    heartbeat: WorkerHeartbeat
    in_flight: int
    live: bool
    last_seen_s: float  # seconds since the last heartbeat


class HiveView(BaseModel):
    hive_id: str
    url: str
    version: str
    embedded: bool
    live: bool
    last_seen_s: float
    devices: DeviceInfo
    workers: list[SupervisedWorker]
    models: list[ModelEntry] = []


class ModelView(BaseModel):
    """A model of the fleet: in some hive's catalog, or served by some worker, and its state now."""

    id: str
    state: Literal["loaded", "loading", "available"]
    workers: int = 0  # workers in rotation for it
    hives: list[str] = []  # hives whose catalog holds its files
    format: str = ""
    size_bytes: int = 0
    need_mb: int = 0  # the queen's estimate of the memory a worker of it takes
    capabilities: list[str] = []
    devices: list[str] = []  # where its workers in rotation run: HIVE/DEVICE (localhost/vulkan:0, gpu1/cuda:0)


class QueenView(BaseModel):
    version: str
    url: str
    started_at: float
    uptime_s: float
    requests_total: int
    in_flight: int
    waiting: int = 0  # requests waiting for a worker slot


class FleetStatus(BaseModel):
    queen: QueenView
    hives: list[HiveView]
    workers: list[WorkerView]
    models: list[str]
    catalog: list[ModelView] = []  # every model of the fleet with its state (what /v1/models lists)

    def worker_ready(self, worker_id: str) -> bool:
        """Whether the queen has ``worker_id`` live and ready (in rotation)."""
        return any(w.heartbeat.worker_id == worker_id and w.live and w.heartbeat.state is WorkerState.READY
                   for w in self.workers)
