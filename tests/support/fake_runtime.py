"""A test-only container runtime, registered with no product edit: the runtime recipe of
docs/architecture.md, run by tests/unit/test_registries.py.

A runtime is a :class:`~imageunlock.engine.runtimes.RuntimeKind` (name, the scheme kubelet
reports for it, its settings, its adapter module, its error classifier) passed to
:func:`~imageunlock.engine.runtimes.register`, and an adapter module with a ``build``
function; here both are this module. A product runtime's kind goes in
``engine/runtimes/__init__.py`` and its name into the CRD's two runtime enums and the chart's
``agent.runtime`` enum.
"""

from __future__ import annotations

from collections.abc import Mapping

from imageunlock.engine.runtimes import Classifier, RuntimeKind, Setting

from .fakes import FakeRuntime

KIND = RuntimeKind(
    name="fake",
    cri_scheme="fake",
    adapter=__name__,
    classifier=Classifier(unreachable=("fake socket gone",), node_trouble=("fake disk full",)),
    settings=(
        Setting(
            "fake_store",
            env=("IMAGEUNLOCK_FAKE_STORE",),
            flag="--fake-store",
            default="memory",
            help="where the fake runtime keeps images (default: %(default)s)",
        ),
    ),
)


class ConfiguredFakeRuntime(FakeRuntime):
    def __init__(self, store: str, timeout: float | None) -> None:
        super().__init__()
        self.store, self.timeout = store, timeout


def build(settings: Mapping[str, str | None], timeout: float | None) -> ConfiguredFakeRuntime:
    return ConfiguredFakeRuntime(str(settings["fake_store"]), timeout)
