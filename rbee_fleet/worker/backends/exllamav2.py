"""exllamav2 on NVIDIA GPUs: EXL2, GPTQ and safetensors models, continuous batching when paged.

Loading is in ``exllamav2_load``; the generator thread in ``generator_driver``. This module maps the
worker's interface onto them: chat templates, tokens, OpenAI sampling, stops, the cache's page budget.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import re
from collections.abc import AsyncIterator
from typing import Any

from rbee_fleet.common.errors import ApiError, ContextOverflow
from rbee_fleet.common.vram import ExlOptions
from rbee_fleet.worker.backends.base import Backend, BackendError, Finish, Piece, SamplingParams, WorkerSpec
from rbee_fleet.worker.backends.exllamav2_load import LoadedModel, load_model
from rbee_fleet.worker.backends.generator_driver import GeneratorDriver
from rbee_fleet.worker.chat_template import ChatTemplate
from rbee_fleet.worker.stops import StopMatcher

log = logging.getLogger(__name__)

GPU_DEVICE = re.compile(r"^cuda:(\d+(?:,\d+)*)$")


def pin_devices(device: str) -> None:
    """Show this process only its GPUs, unless whoever started it (the hive) already did."""
    match = GPU_DEVICE.match(device)
    if match is None:
        raise BackendError(f"exllamav2 runs on NVIDIA GPUs only: device must be cuda:N[,M], not {device!r}")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", match.group(1))


def sampler_settings(settings_class: Any, params: SamplingParams, options: ExlOptions) -> Any:
    """OpenAI sampling mapped onto ``ExLlamaV2Sampler.Settings`` (temperature 0 is greedy)."""
    penalties = {
        "token_presence_penalty": params.presence_penalty,
        "token_frequency_penalty": params.frequency_penalty,
    }
    if params.temperature <= 0.0:
        return settings_class.greedy(**penalties)
    return settings_class(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=options.top_k,
        min_p=options.min_p,
        token_repetition_penalty=1.0,  # OpenAI has only presence and frequency penalties
        **penalties,
    )


class ExLlamaV2Backend(Backend):
    name = "exllamav2"

    def __init__(self, spec: WorkerSpec, loaded: LoadedModel | None = None) -> None:
        super().__init__(spec)
        if loaded is None:
            pin_devices(spec.device)
            loaded = load_model(spec)
        self._m = loaded
        self._gen = loaded.generator
        chat = loaded.chat
        self._template = ChatTemplate(chat.template, bos_token=chat.bos_token, eos_token=chat.eos_token)
        self._ids = itertools.count(1)
        self._driver = GeneratorDriver(self._gen, on_tokens=self._decoded)

    def _decoded(self, n: int) -> None:
        self.decoded_total += n

    @property
    def context_length(self) -> int:
        # One sequence can never outgrow the shared cache, so a smaller cache shortens the context.
        return min(self._m.context, self._gen.max_pages * self._gen.page_size)

    @property
    def slots(self) -> int:
        return self._m.batch_size

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self._template.render(messages)

    def tokenize(self, text: str, *, templated: bool) -> list[int]:
        # A chat template writes its own special tokens; plain text gets BOS when the model wants one.
        ids = self._m.tokenizer.encode(
            text, add_bos=self._m.chat.add_bos and not templated, encode_special_tokens=templated
        )
        return [int(t) for t in ids[0].tolist()]

    def check_budget(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse, before any stream, what the shared cache could never hold (exllamav2 would assert)."""
        page, pages = self._gen.page_size, self._gen.max_pages
        need = math.ceil((prompt_tokens + max_tokens) / page)
        if need > pages:
            fits = pages * page - prompt_tokens
            raise ContextOverflow(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs {need} cache pages of "
                f"{page} tokens, but this worker's cache has {pages} ({pages * page} tokens)"
                + (f"; ask for at most {fits} tokens" if fits > 0 else ""),
                param="max_tokens",
            )

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Piece | Finish]:
        import torch  # exllamav2 takes prompts as CPU tensors

        m = self._m
        stops = [s for s in params.stop if s]
        identifier = next(self._ids)
        job = m.api.Job(
            input_ids=torch.tensor([prompt], dtype=torch.long),
            max_new_tokens=params.max_tokens,
            stop_conditions=[*stops, *sorted(m.stop_token_ids)],
            gen_settings=sampler_settings(m.api.Settings, params, m.options),
            seed=params.seed,
            identifier=identifier,
        )
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()

        def sink(item: dict[str, Any] | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self._driver.submit(identifier, job, sink)
        # exllamav2 ends the job on its stop conditions; the matcher is the guard that no stop text leaks.
        matcher = StopMatcher(stops)
        done = False
        streamed = 0
        try:
            while True:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    done = True
                    raise _request_error(item)
                if item.get("stage") != "streaming":
                    continue
                ids = item.get("token_ids")
                n = int(ids.shape[-1]) if ids is not None else 0
                if item.get("eos"):
                    done = True
                    reason = item.get("eos_reason")
                    produced = int(item.get("new_tokens", streamed + n))
                    text = item.get("text", "")
                    if reason == "stop_token":
                        produced = max(0, produced - 1)  # the EOS token is not part of the answer
                        text += item.get("held", {}).get("text", "")  # what was held back belongs to it
                    out, hit = matcher.feed(text)
                    out = out if hit else out + matcher.flush()
                    if out:
                        yield Piece(out, max(0, produced - streamed))
                    yield Finish("length" if reason == "max_new_tokens" and not hit else "stop", produced)
                    return
                out, hit = matcher.feed(item.get("text", ""))
                streamed += n
                if hit:
                    done = True
                    self._driver.cancel(identifier)
                    if out:
                        yield Piece(out, n)
                    yield Finish("stop", streamed)
                    return
                yield Piece(out, n)
        finally:
            if not done:  # the client went away or the request was closed early
                self._driver.cancel(identifier)

    def stats(self) -> dict[str, Any]:
        snap = self._driver.snapshot
        return {
            "cache_tokens_total": self._gen.max_pages * self._gen.page_size,
            "cache_tokens_free": snap.free_pages * self._gen.page_size,
            "vram_used_mb": self._m.vram_used_mb(),
        }

    def close(self) -> None:
        self._driver.close()
        try:
            self._m.model.unload()
        except Exception:  # noqa: BLE001 - the process is ending anyway
            log.debug("model unload failed", exc_info=True)


def _request_error(exc: BaseException) -> Exception:
    """What the client is told when the generator refused or failed its job."""
    if isinstance(exc, AssertionError) and "pages" in str(exc):
        return ContextOverflow(f"the request does not fit this worker's cache: {exc}", param="max_tokens")
    if isinstance(exc, ApiError):
        return exc
    return ApiError(f"exllamav2 generation failed: {type(exc).__name__}: {exc}", code="generation_failed")
