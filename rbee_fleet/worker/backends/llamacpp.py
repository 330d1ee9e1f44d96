"""llama.cpp through llama-cpp-python: GGUF models on CPUs, one sequence at a time."""

from __future__ import annotations

import asyncio
import codecs
import os
import random
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rbee_fleet.worker.backends.base import Backend, BackendError, Finish, Piece, SamplingParams, WorkerSpec
from rbee_fleet.worker.chat_template import ChatTemplate
from rbee_fleet.worker.stops import StopMatcher

# llama.cpp's own sampler defaults, kept so that results match plain llama-cpp-python.
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        try:
            from llama_cpp import Llama, llama_vocab_is_eog
        except ImportError as exc:
            raise BackendError(
                "llama-cpp-python is not installed: pip install 'rbee-fleet[cpu]'"
            ) from exc
        if not os.path.isfile(spec.model_path):
            raise BackendError(f"model file not found: {spec.model_path}")
        threads = spec.threads or max(1, len(os.sched_getaffinity(0)))
        try:
            self._llm = Llama(
                spec.model_path,
                n_ctx=spec.ctx_size,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"llama.cpp could not load {spec.model_path}: {exc}") from exc
        self._is_eog: Callable[[int], bool] = lambda tok: bool(llama_vocab_is_eog(self._llm._model.vocab, tok))
        model = self._llm._model
        eos, bos = self._llm.token_eos(), self._llm.token_bos()
        self._template = ChatTemplate(
            self._llm.metadata.get("tokenizer.chat_template"),
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            eos_token=model.token_get_text(eos) if eos != -1 else "",
        )
        self._add_bos = self._llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true"
        self._top_k = int(spec.options.get("top_k", DEFAULT_TOP_K))
        self._min_p = float(spec.options.get("min_p", DEFAULT_MIN_P))
        # One thread owns the llama context: requests are serialised through it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self._warm_up()

    def _warm_up(self) -> None:
        """Decode one token now, so that the first request does not pay llama.cpp's first-call setup."""
        bos = self._llm.token_bos()
        first = [bos] if bos != -1 else self._llm.tokenize(b" ", add_bos=False)
        for _ in self._llm.generate(first, temp=0.0):
            break

    @property
    def context_length(self) -> int:
        return self._llm.n_ctx()

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self._template.render(messages)

    def tokenize(self, text: str, *, templated: bool) -> list[int]:
        # A chat template writes its own special tokens (BOS included, when the model wants one).
        add_bos = self._add_bos and not templated
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=templated)

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Piece | Finish]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Piece | Finish | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Piece | Finish | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        future = loop.run_in_executor(self._executor, self._generate, prompt, params, cancel, emit)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finish):
                    break
        finally:
            cancel.set()
            # The generation thread stops at its next token; the executor serialises what comes next.
            future.add_done_callback(lambda f: f.exception())

    def _generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        cancel: threading.Event,
        emit: Callable[[Piece | Finish | BaseException], None],
    ) -> None:
        llm = self._llm
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        produced = 0
        ending = "length"  # length | eos | stop | cancelled
        try:
            tokens = llm.generate(
                prompt,
                top_k=self._top_k,
                top_p=params.top_p,
                min_p=self._min_p,
                temp=params.temperature,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
            )
            for token in tokens:
                if cancel.is_set():
                    ending = "cancelled"
                    break
                self.decoded_total += 1
                if self._is_eog(token):
                    ending = "eos"
                    break
                produced += 1
                text, hit = stops.feed(decoder.decode(llm.detokenize([token])))
                emit(Piece(text, 1))
                if hit:
                    ending = "stop"
                    break
                if produced >= params.max_tokens:
                    break
            if ending in ("length", "eos"):
                # Whatever was held back (a partial character, a would-be stop) belongs to the answer.
                text, hit = stops.feed(decoder.decode(b"", final=True))
                text = text if hit else text + stops.flush()
                if text:
                    emit(Piece(text, 0))
            reason = "stop" if ending == "eos" else ending
            emit(Finish(reason, produced))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, never lost
            emit(exc)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._llm.close()

