"""Synthetic sagittal spine MRI phantoms (moving into a package; see :mod:`.scene`)."""
from .scene import *  # noqa: F401,F403
from .scene import __all__, __doc__  # noqa: F401
# private names that tests import
from .scene import _DISC, _Scene, _draw_age, _draw_grades, _protocol_draws, _thresholds  # noqa: F401
