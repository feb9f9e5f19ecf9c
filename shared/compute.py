"""The one thread per process that does torch work; the asyncio loop only does I/O.

Loading belongs on it too: torch work spread over several threads runs much slower on CPU
(measured: a 30-layer SmolLM2 decode step took 52 ms instead of 34 ms once a second thread had
run torch), as each thread keeps its own pool of busy-waiting OpenMP workers."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch


class ComputeThread:
    def __init__(self, name: str, num_threads: int | None = None):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_init,
                                            initargs=(num_threads,))

    async def run(self, fn, *args):
        """Run fn(*args) on the compute thread, in submission order."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


def _init(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
