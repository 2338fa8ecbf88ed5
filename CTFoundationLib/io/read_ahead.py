"""Reading the CTs of a batch ahead of the model: the next cases are read and decoded in worker processes while
the current one is encoded, so that a fast device does not wait for gzip and DICOM decoding.

    with CaseReader(cases, workers=4) as reader:
        for case in cases:
            volume = reader.read(case)   # the error of a case that cannot be read is raised here, for that case

`workers=0` reads each case when its turn comes, in this process (CPU machines, Slicer). Worker processes are
spawned (not forked: the parent holds torch and its threads) and read at most `workers` cases ahead, so memory
stays bounded by that many volumes.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor

from CTFoundationLib.io.cases import Case
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.volume import CTVolume


def read_case(case: Case) -> CTVolume:
    """One case's CT (module level: the worker processes import it by name)."""
    return read_ct(case.path)


class CaseReader:
    """Reads `cases` in their order, up to `workers` of them ahead in worker processes (0: none, read on demand)."""

    def __init__(self, cases: Sequence[Case], workers: int = 0) -> None:
        if workers < 0:
            raise ValueError(f"read-ahead workers must be 0 or more, got {workers}")
        self.workers, self.waiting = workers, list(cases)
        self.reading: dict[str, Future] = {}
        self.pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                     if workers and len(cases) > 1 else None)
        self._submit()

    def _submit(self) -> None:
        while self.pool is not None and self.waiting and len(self.reading) < self.workers:
            case = self.waiting.pop(0)
            self.reading[case.case_id] = self.pool.submit(read_case, case)

    def read(self, case: Case) -> CTVolume:
        """The case's CT; its reading error (a CTFoundationError or other) is raised here."""
        future = self.reading.pop(case.case_id, None)
        if future is None:
            self.waiting = [other for other in self.waiting if other.case_id != case.case_id]
            volume = read_case(case)
        self._submit()
        return volume if future is None else future.result()

    def close(self) -> None:
        """Stop the workers; cases not read yet are dropped (nothing is written by them)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> CaseReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
