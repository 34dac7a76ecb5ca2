"""Test back-ends: a fast and a slow one for the same functions, and a crashing one."""

from __future__ import annotations

import codecs

import trio

from dmoverfs.backends import Backend, FunctionSpec, Job

FUNCTIONS = {"copy": FunctionSpec(ninputs=1), "rot13": FunctionSpec(ninputs=1)}


def rot13(data: bytes) -> bytes:
    return codecs.encode(data.decode("latin-1"), "rot13").encode("latin-1")


class _Timed(Backend):
    functions = FUNCTIONS

    async def run(self, job: Job) -> tuple[int, bytes]:
        # Hold the request as long as a device of this speed would: the
        # scheduler sees the back-end busy meanwhile.
        await trio.sleep(job.size / self.speed)
        data = await trio.to_thread.run_sync(job.read_input, 0)
        if job.function == "rot13":
            data = rot13(data)
        # In two pieces, to exercise offsets.
        half = len(data) // 2
        job.write_output(data[:half])
        job.write_output(data[half:], offset=half)
        return 0, self.name.encode()


class FastBackend(_Timed):
    name = "fast"
    speed = 64e6


def make_slow() -> Backend:
    """A factory, as an entry point may name one."""
    backend = _Timed()
    backend.name = "slow"
    backend.speed = 16e6
    return backend


class CrashyBackend(Backend):
    name = "crashy"
    speed = 1e6
    functions = {"explode": FunctionSpec(ninputs=0)}

    async def run(self, job: Job) -> tuple[int, bytes]:
        raise ZeroDivisionError("the plug-in has a bug")
