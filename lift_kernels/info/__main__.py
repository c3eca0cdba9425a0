"""``python -m lift_kernels.info``: lk.info() as JSON."""
import json

from . import info

print(json.dumps(info(), indent=2))
