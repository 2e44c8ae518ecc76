"""Product data: what an Azaion installation works with unless told otherwise (pure constants).

The one place these values are written in Python; the engine and the models carry none of
them. Read by the spec parser (``spec.images`` of an ImageUnlock whose CRD predates the
default) and by the CLI (``--image``). The CRD's own ``spec.images`` default is the same list,
held equal by tests/unit/test_spec.py.
"""

from __future__ import annotations

# The seeds' API_SERVICES: what an archive holds unless an ImageUnlock or a CLI run names others.
DEFAULT_IMAGES: tuple[str, ...] = (
    "azaion/annotations",
    "azaion/flights",
    "azaion/detections",
    "azaion/gps-denied-onboard",
    "azaion/gps-denied-desktop",
    "azaion/autopilot",
    "azaion/ai-training",
)
