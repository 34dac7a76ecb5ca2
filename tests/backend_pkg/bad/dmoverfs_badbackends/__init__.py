"""Back-ends dmoverfs must refuse."""

from dmoverfs.backends import Backend, FunctionSpec


class ConflictBackend(Backend):
    """Offers copy with two inputs: the built-in back-end says one."""

    name = "conflict"
    speed = 1e6
    functions = {"copy": FunctionSpec(ninputs=2)}

    async def run(self, job):
        return 0, job.immediate
