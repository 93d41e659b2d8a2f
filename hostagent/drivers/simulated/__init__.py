"""The simulated driver: guests with real memory contents, moved by the agent's own page-copying data plane.

Modules, by what a newcomer looks for:
- ``driver``: ``SimulatedDriver``, the guests of one host (define, start, stop, room).
- ``guest``: one simulated guest and its workload; ``memory``: its pages, dirty tracking, digests.
- ``wire``: the data plane's frame format; ``source`` and ``target``: its two sides.
- ``convergence``: rates and the pre-copy convergence judgement; ``timing``: phase limits, causes.
"""

from hostagent.drivers.simulated.driver import SimulatedDriver

__all__ = ["SimulatedDriver"]
