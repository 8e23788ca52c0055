"""Phase 7's helpers, under their old single name: every name lives in one of four modules and is
re-exported here, so that ``from utils import parallelism`` keeps working.

* ``utils.memory_accounting`` -- what one rank holds: ``memory_report``, ``PeakMemory``,
  ``saved_activation_bytes``, ``activation_bytes_per_layer``, ``model_state_categories``...
* ``utils.communication`` -- ``CommLog``, the alpha-beta model (``collective_time``,
  ``INTERCONNECTS``), ``time_collective`` and ``fit_alpha_beta``, the ring and overlap figures;
* ``utils.pipeline`` -- pipeline schedules (GPipe, interleaved 1F1B, ZB-H1), the simulator, the
  Gantt chart and the real runner;
* ``utils.plan3d`` -- the 3D-parallelism planner.

New code should import those modules; nothing is defined here.
"""

from .communication import *  # noqa: F401,F403
from .communication import __all__ as _communication
from .memory_accounting import *  # noqa: F401,F403
from .memory_accounting import __all__ as _memory
from .pipeline import *  # noqa: F401,F403
from .pipeline import __all__ as _pipeline
from .plan3d import *  # noqa: F401,F403
from .plan3d import __all__ as _plan3d

__all__ = [*_memory, *_communication, *_pipeline, *_plan3d]
