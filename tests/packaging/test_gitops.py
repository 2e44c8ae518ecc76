"""gitops/: the Argo CD health check run by a real Lua 5.1 runtime (Argo CD's gopher-lua
implements Lua 5.1) against ImageUnlock statuses the operator writes (the controller's summary,
marked by kube/conditions.py), the argocd-cm snippet carrying the same script, the Flux
Kustomization's healthCheckExprs, and the Argo CD Applications that never prune or delete the CRD.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from imageunlock.engine.models import Phase
from imageunlock.kube import conditions as st
from imageunlock.kube.models import ImageUnlockStatus, SummaryProgress

from .conftest import CRD_FILE, GITOPS, REPO, find, rendered_objects, require

SCRIPT = (GITOPS / "imageunlock-health.lua").read_text()
ARGOCD_KEY = "resource.customizations.health.loader.azaion.com_ImageUnlock"
NONE = ImageUnlockStatus()


def ready(generation: int, message: str = "2 image(s) ready and verified on 1/1 node(s)") -> ImageUnlockStatus:
    return st.mark_ready(NONE, "Unlocked", message, generation)


def stalled(reason: str, message: str, generation: int) -> dict[str, Any]:
    return st.mark_stalled(NONE, reason, message, generation).dump()


def _lua_value(lua: Any, value: Any) -> Any:
    """Python JSON-like data as Lua values, the way Argo CD hands `obj` to the script."""
    if isinstance(value, dict):
        return lua.table_from({k: _lua_value(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_lua_value(lua, v) for v in value])
    return value


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lupa = require("lupa.lua51")
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"
    lua.globals().obj = _lua_value(lua, obj)
    result = lua.execute(SCRIPT)
    assert set(result.keys()) <= {"status", "message"}
    return result["status"], result["message"]


def unlock(generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "loader.azaion.com/v1alpha1",
        "kind": "ImageUnlock",
        "metadata": {"name": "azaion-images", "namespace": "edge", "generation": generation},
        "spec": {"archivePath": "/var/lib/imageunlock/images.enc", "version": "1.4.2"},
    }
    if status is not None:
        obj["status"] = status
    return obj


def test_no_status_yet_is_progressing():
    state, message = health(unlock())
    assert state == "Progressing"
    assert "operator" in message


def test_ready_is_healthy():
    state, message = health(unlock(3, ready(3).dump()))
    assert (state, message) == ("Healthy", "2 image(s) ready and verified on 1/1 node(s)")


def test_working_is_progressing_with_phase_and_progress():
    text = "streaming the archive into the runtime"
    status = st.mark_reconciling(ready(1), Phase.LOADING, "Loading", text, 2)
    status = status.model_copy(update={"progress": SummaryProgress(percent=42, text="42%")})
    state, message = health(unlock(2, status.dump()))
    assert state == "Progressing"
    assert message == "Loading 42%: streaming the archive into the runtime"


def test_first_unlock_in_progress_is_progressing():
    status = st.mark_reconciling(NONE, Phase.AUTHENTICATING, "Authenticating", "signing in to the resource API", 1)
    state, message = health(unlock(1, status.dump()))
    assert state == "Progressing"
    assert message.startswith("Authenticating")


def test_transient_retry_is_progressing():
    text = "0/1 node(s) ready; waiting for edge-1 (Pending: attempt 2 failed: HTTP 503; retrying in 20s)"
    status = st.mark_reconciling(NONE, Phase.PENDING, "ResourceApiUnavailable", text, 1)
    state, message = health(unlock(1, status.dump()))
    assert state == "Progressing"
    assert "retrying in 20s" in message


def test_stale_observed_generation_is_progressing():
    """Ready, but for an older spec the operator has not picked up yet."""
    state, message = health(unlock(5, ready(4).dump()))
    assert state == "Progressing"
    assert message == "Waiting for the operator to observe generation 5 (status is for generation 4)"


def test_stalled_is_degraded():
    status = stalled("ArchiveNotFound", "archive '/var/lib/imageunlock/images.enc' does not exist", 2)
    state, message = health(unlock(2, status))
    assert state == "Degraded"
    assert message == "ArchiveNotFound: archive '/var/lib/imageunlock/images.enc' does not exist"


def test_stalled_for_an_older_generation_is_progressing():
    """The user fixed the spec: no longer Degraded while the operator catches up."""
    status = stalled("CredentialsRejected", "the resource API rejected the account", 1)
    state, _ = health(unlock(2, status))
    assert state == "Progressing"


def test_status_without_conditions_is_progressing():
    state, message = health(unlock(1, {"phase": "Pending", "message": "queued", "observedGeneration": 1}))
    assert (state, message) == ("Progressing", "queued")


def test_argocd_cm_carries_the_script_verbatim():
    cm = yaml.safe_load((GITOPS / "argocd-cm.yaml").read_text())
    assert (cm["kind"], cm["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    assert list(cm["data"]) == [ARGOCD_KEY]
    assert cm["data"][ARGOCD_KEY] == SCRIPT


def test_readme_documents_the_argocd_key():
    assert ARGOCD_KEY in (GITOPS / "README.md").read_text()


def test_flux_kustomizations():
    docs = [d for d in yaml.safe_load_all((GITOPS / "flux-kustomization.yaml").read_text()) if d]
    kustomizations = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Kustomization"}
    assert set(kustomizations) == {"imageunlock-crds", "imageunlock-operator", "imageunlock-images"}
    for k in kustomizations.values():
        assert k["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1"
    # The paths exist in this repository and are kustomize-buildable (./crds holds plain YAML).
    assert (REPO / kustomizations["imageunlock-crds"]["spec"]["path"]).is_dir()
    assert (REPO / kustomizations["imageunlock-operator"]["spec"]["path"] / "kustomization.yaml").is_file()
    assert kustomizations["imageunlock-operator"]["spec"]["dependsOn"] == [{"name": "imageunlock-crds"}]
    assert kustomizations["imageunlock-images"]["spec"]["dependsOn"] == [{"name": "imageunlock-operator"}]
    (expr,) = kustomizations["imageunlock-images"]["spec"]["healthCheckExprs"]
    assert (expr["apiVersion"], expr["kind"]) == ("loader.azaion.com/v1alpha1", "ImageUnlock")
    assert set(expr) == {"apiVersion", "kind", "inProgress", "failed", "current"}
    assert "'Reconciling'" in expr["inProgress"]
    assert "'Stalled'" in expr["failed"]
    assert "'Ready'" in expr["current"] and "observedGeneration" in expr["current"]


@pytest.mark.parametrize(
    "name, status, generation, expected",
    [
        ("ready", ready(1).dump(), 1, "current"),
        ("working", st.mark_reconciling(NONE, Phase.LOADING, "Loading", "loading", 1).dump(), 1, "inProgress"),
        ("stalled", stalled("ArchiveNotFound", "missing", 1), 1, "failed"),
    ],
)
def test_flux_expressions_agree_with_the_lua_check(name, status, generation, expected):
    """Evaluated as Flux does (first matching of inProgress, failed, current), the CEL
    expressions classify the operator's statuses like the Argo CD script does."""
    celpy = require("celpy")  # cel-python: a CEL evaluator (Flux uses cel-go)
    docs = [d for d in yaml.safe_load_all((GITOPS / "flux-kustomization.yaml").read_text()) if d]
    (expr,) = next(d for d in docs if d["metadata"]["name"] == "imageunlock-images")["spec"]["healthCheckExprs"]
    obj = unlock(generation, {**status, "observedGeneration": generation})
    env = celpy.Environment()
    activation = {k: celpy.json_to_cel(v) for k, v in obj.items()}
    verdict = next(
        (
            key
            for key in ("inProgress", "failed", "current")
            if bool(env.program(env.compile(expr[key])).evaluate(activation))
        ),
        "inProgress",
    )
    assert verdict == expected
    lua_state = health(obj)[0]
    assert {"current": "Healthy", "inProgress": "Progressing", "failed": "Degraded"}[verdict] == lua_state


def _sync_options(obj: dict[str, Any]) -> set[str]:
    """An object's argocd.argoproj.io/sync-options annotation, as Argo CD splits it."""
    value = obj["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-options", "")
    return {option.strip() for option in value.split(",") if option.strip()}


def test_argocd_never_prunes_or_deletes_the_crd():
    """The CRD (crds/, which every route installs, the chart's template too) tells Argo CD
    never to prune it nor delete it with its Application; the CRD Application of gitops/
    applies crds/ with Prune=false; the operator Application leaves the CRD to it (the
    chart with crds.enabled=false renders none) and its values pass the chart's schema."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    assert {"Prune=false", "Delete=false"} <= _sync_options(crd)
    (rendered,) = find(rendered_objects(), "CustomResourceDefinition")
    assert {"Prune=false", "Delete=false"} <= _sync_options(rendered)
    docs = [d for d in yaml.safe_load_all((GITOPS / "argocd-applications.yaml").read_text()) if d]
    apps = {d["metadata"]["name"]: d for d in docs}
    assert set(apps) == {"imageunlock-crds", "imageunlock-operator"}
    assert all(a["apiVersion"] == "argoproj.io/v1alpha1" and a["kind"] == "Application" for a in apps.values())
    crds = apps["imageunlock-crds"]["spec"]
    assert (REPO / crds["source"]["path"]).resolve() == CRD_FILE.parent.resolve()
    assert "Prune=false" in crds["syncPolicy"]["syncOptions"]
    assert crds["syncPolicy"]["automated"].get("prune", False) is False
    operator = apps["imageunlock-operator"]["spec"]["source"]
    assert (REPO / operator["path"] / "Chart.yaml").is_file()
    values = operator["helm"]["valuesObject"]
    assert values["crds"]["enabled"] is False
    assert not find(rendered_objects(values), "CustomResourceDefinition")
    assert "argocd-applications.yaml" in (GITOPS / "README.md").read_text()
