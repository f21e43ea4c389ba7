"""A bounded queue in front of one model worker thread.

MONAI Label runs inference synchronously inside an async handler, which freezes the event loop
(and so ``/info/`` and the datastore) for the whole run. Here the model runs in a dedicated
thread; requests beyond ``capacity`` (running + waiting) are refused at once with a
``Retry-After`` estimate instead of hanging. The estimate is the median of recent run times
(robust to the one slow first run that loads the model) times the runs ahead of the caller.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor


class QueueFull(Exception):
    def __init__(self, retry_after: int, capacity: int):
        super().__init__(f"the server is busy: {capacity} requests are already running or waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class ModelQueue:
    def __init__(self, capacity: int = 16, workers: int = 1):
        if capacity < 1:
            raise ValueError("queue capacity must be >= 1")
        self.capacity = capacity
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model")
        self._in_system = 0  # touched only on the event loop thread
        self._recent_s = deque(maxlen=20)  # run times of the last requests

    @property
    def depth(self) -> int:
        return self._in_system

    def retry_after(self) -> int:
        waves = math.ceil((self._in_system + 1) / self.workers)
        typical = statistics.median(self._recent_s) if self._recent_s else 1.0
        return int(min(600, max(1, math.ceil(typical * waves))))

    async def run(self, fn, *args, **kwargs):
        if self._in_system >= self.capacity:
            raise QueueFull(self.retry_after(), self.capacity)
        self._in_system += 1
        loop = asyncio.get_running_loop()

        def timed():
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._recent_s.append(time.perf_counter() - start)

        try:
            return await loop.run_in_executor(self._executor, timed)
        finally:
            self._in_system -= 1

    def shutdown(self):
        self._executor.shutdown(wait=False, cancel_futures=True)
