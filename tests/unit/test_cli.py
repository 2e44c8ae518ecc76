"""The CLI's surface without a daemon: argument parsing, ``--version``, the ``--output json``
outcome on stdout, and which progress renderer a terminal or a pipe gets (issue 12, item 5)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from imageunlock import __version__, cli
from imageunlock.engine.models import Phase

from ..support.fakes import FakeRuntime

VERSION = "1.4.2"
REFS = [f"azaion/one:{VERSION}", f"azaion/two:{VERSION}"]
IDS = {ref: "sha256:" + f"{n}" * 64 for n, ref in enumerate(REFS, 1)}


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    runtime = FakeRuntime()
    monkeypatch.setattr("imageunlock.engine.runtimes.docker.DockerRuntime", lambda base_url=None, **_: runtime)
    monkeypatch.delenv("IMAGEUNLOCK_EMAIL", raising=False)
    monkeypatch.delenv("IMAGEUNLOCK_PASSWORD", raising=False)
    return runtime


def unlock_args(tmp_path: Path, *extra: str) -> list[str]:
    archive = tmp_path / "images.enc"
    archive.write_bytes(b"\0" * 4096)
    images = [arg for ref in REFS for arg in ("--image", ref.split(":")[0])]
    return [
        "unlock",
        "--archive",
        str(archive),
        "--version",
        VERSION,
        "--api-url",
        "https://api.test",
        "--state-file",
        str(tmp_path / "state.json"),
        *images,
        *extra,
    ]


def test_program_version_is_printed_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"imageunlock {__version__}\n"


def test_unlock_version_stays_the_image_tag() -> None:
    args = cli._parser().parse_args(["unlock", "--version", "9.9.9"])
    assert args.version == "9.9.9" and args.format == "text"
    with pytest.raises(SystemExit) as exit_:  # without a tag it is a usage error, not the program's version
        cli._parser().parse_args(["unlock", "--version"])
    assert exit_.value.code == 2


def test_output_option_is_checked_and_encrypt_keeps_its_own_output() -> None:
    assert cli._parser().parse_args(["unlock", "--output", "json"]).format == "json"
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["unlock", "--output", "yaml"])
    assert exit_.value.code == 2
    args = cli._parser().parse_args(["encrypt", "--input", "a", "--output", "b", "--fragment-file", "f"])
    assert args.output == "b"


def test_missing_credentials_as_json(engine: FakeRuntime, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(unlock_args(tmp_path, "--output", "json")) == 1
    out, err = capsys.readouterr()
    outcome = json.loads(out)  # exactly one JSON document, nothing else on stdout
    assert outcome == {
        "ready": False,
        "error": {"reason": "InvalidConfiguration", "message": outcome["error"]["message"], "transient": False},
    }
    assert "IMAGEUNLOCK_EMAIL" in outcome["error"]["message"]
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"imageunlock: error: {outcome['error']['message']}"
    ]


def test_without_the_flag_stdout_stays_empty(
    engine: FakeRuntime, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(unlock_args(tmp_path)) == 1
    out, err = capsys.readouterr()
    assert out == "" and "imageunlock: error: set IMAGEUNLOCK_EMAIL" in err


def test_unreachable_engine_as_json_is_transient(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"images": IDS}))  # so the engine is asked first
    args = unlock_args(tmp_path, "--output", "json", "--docker-host", f"unix://{tmp_path}/no.sock")
    assert cli.main(args) == 75
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["reason"] == "RuntimeUnavailable" and error["transient"] is True


def test_fast_path_success_as_json(engine: FakeRuntime, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine.add(IDS)
    (tmp_path / "state.json").write_text(json.dumps({"images": IDS}))
    assert cli.main(unlock_args(tmp_path, "--output", "json")) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {
        "ready": True,
        "fastPath": True,
        "version": VERSION,
        "images": [{"name": ref, "id": IDS[ref]} for ref in REFS],
        "archiveBytes": 0,
    }
    assert err.splitlines() == [
        "imageunlock: Pending: checking for images already loaded",
        f"imageunlock: Ready: 2 image(s) already present at {VERSION}",
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_plain_lines_a_terminal_gets_bars() -> None:
    assert isinstance(cli._renderer(io.StringIO()), cli._Lines)
    assert isinstance(cli._renderer(Terminal()), cli._Bars)


def feed(report: cli._Lines | cli._Bars, size: int = 1000) -> None:
    with report:
        report(Phase.PENDING, "checking for images already loaded", 0, 0)
        for done in range(0, size + 1, 250):
            report(Phase.PENDING, "checking the archive's SHA-256", done, size)
        report(Phase.AUTHENTICATING, "logging in to the resource API", 0, size)
        report(Phase.FETCHING_KEY, "fetching the key fragment", 0, size)
        for done in range(0, size + 1, 50):
            report(Phase.LOADING, "decrypting into the container runtime", done, size)
        report(Phase.VERIFYING, "verifying loaded images", size, size)


def test_plain_lines_keep_their_parseable_form(capsys: pytest.CaptureFixture[str]) -> None:
    feed(cli._Lines())
    assert capsys.readouterr().err.splitlines() == [
        "imageunlock: Pending: checking for images already loaded",
        *(f"imageunlock: Pending: {pct}% of 1000 bytes" for pct in (25, 50, 75, 100)),
        "imageunlock: Authenticating: logging in to the resource API",
        "imageunlock: FetchingKey: fetching the key fragment",
        "imageunlock: Loading: decrypting into the container runtime",
        *(f"imageunlock: Loading: {pct}% of 1000 bytes" for pct in (5, *range(10, 101, 10))),
        "imageunlock: Verifying: verifying loaded images",
    ]


def test_bars_on_a_terminal_show_each_phase_and_a_bar_with_rate_and_eta() -> None:
    screen = io.StringIO()
    feed(cli._Bars(Console(file=screen, force_terminal=True, width=120, color_system=None)))
    drawn = screen.getvalue()
    for phase in ("Pending", "Authenticating", "FetchingKey", "Loading", "Verifying"):
        assert f"imageunlock: {phase}: " in drawn
    assert drawn.count("imageunlock: Loading:") == 1  # one line per phase, not per chunk
    assert "\x1b[" in drawn  # drawn in place with cursor movement, not appended lines
    final = drawn.rsplit("\x1b[2K", 1)[-1]  # what stays on screen after the last redraw
    for task in ("checking the archive's SHA-256", "decrypting into the container runtime"):
        assert task in final
    assert "100%" in final and "1.0/1.0 kB" in final and "B/s" in final and "0:00:00" in final


def test_state_is_never_written_through_a_planted_symlink(tmp_path):
    """Review: the state file's temporary name was predictable and opened without O_EXCL, so a
    symlink planted there made the CLI (often root) overwrite any file."""
    from imageunlock.cli import _read_state, _write_state

    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = state_dir / "verified-images.json"
    for pid in range(os.getpid() - 5, os.getpid() + 5):  # the old temporary names
        os.symlink(victim, f"{path}.{pid}.tmp")
    _write_state(str(path), {"azaion/a:1.0": "sha256:abc"})
    assert victim.read_text() == "precious"
    assert _read_state(str(path)) == {"azaion/a:1.0": "sha256:abc"}


def test_state_in_a_directory_others_may_write_is_refused(tmp_path):
    from imageunlock.cli import _write_state

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OSError, match="writable by others"):
        _write_state(str(shared / "verified-images.json"), {"azaion/a:1.0": "sha256:abc"})


# -- --reclaim-policy (issue 20, item 5) ------------------------------------------------------

OLD_REFS = ["azaion/one:1.4.1", "azaion/two:1.4.1"]
OLD_IDS = {ref: "sha256:" + f"{n}" * 64 for n, ref in enumerate(OLD_REFS, 7)}


def _upgrade_state(tmp_path: Path) -> None:
    """The state a 1.4.1 run left behind, and 1.4.2 already verified once (fast path)."""
    state = {"images": {**OLD_IDS, **IDS}, "current": {"docker": {"version": "1.4.1", "refs": OLD_REFS}}}
    (tmp_path / "state.json").write_text(json.dumps(state))


def test_reclaim_policy_flag_defaults_to_unpin() -> None:
    assert cli._parser().parse_args(["unlock"]).reclaim_policy == "Unpin"
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["unlock", "--reclaim-policy", "Shred"])


def test_delete_removes_the_previous_version_after_this_one_is_verified(
    engine: FakeRuntime, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine.add({**IDS, **OLD_IDS})
    engine.in_use.add(OLD_IDS[OLD_REFS[1]])  # a container still runs the old two
    _upgrade_state(tmp_path)
    assert cli.main(unlock_args(tmp_path, "--output", "json", "--reclaim-policy", "Delete")) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["reclaimed"] == {"policy": "Delete", "refs": [OLD_REFS[0]], "kept": [OLD_REFS[1]]}
    assert "imageunlock: Reclaimed: removed 1 image(s) of 1.4.1" in err
    assert engine.image_ids([*REFS, *OLD_REFS]) == {**IDS, OLD_REFS[0]: None, OLD_REFS[1]: OLD_IDS[OLD_REFS[1]]}
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["current"]["docker"] == {"version": VERSION, "refs": REFS}
    assert OLD_REFS[0] not in state["images"]


def test_unpin_touches_no_image_the_previous_run_did_not_verify(
    engine: FakeRuntime, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine.add({**IDS, **OLD_IDS, OLD_REFS[0]: "sha256:" + "f" * 64})  # re-tagged by someone since
    engine.pinned |= {"docker.io/" + ref for ref in OLD_REFS}
    _upgrade_state(tmp_path)
    assert cli.main(unlock_args(tmp_path)) == 0
    # the re-tagged one stays pinned; this run's, found already there, are pinned (again)
    assert engine.pinned == {"docker.io/" + ref for ref in [OLD_REFS[0], *REFS]}
    assert "imageunlock: Reclaimed: unpinned 1 image(s) of 1.4.1" in capsys.readouterr().err


def test_retain_and_a_failed_unlock_reclaim_nothing(engine: FakeRuntime, tmp_path: Path) -> None:
    engine.add({**OLD_IDS})  # 1.4.2 is not there and there are no credentials: the unlock fails
    _upgrade_state(tmp_path)
    assert cli.main(unlock_args(tmp_path, "--reclaim-policy", "Delete")) == 1
    assert engine.image_ids(OLD_REFS) == OLD_IDS
    engine.add(IDS)
    assert cli.main(unlock_args(tmp_path, "--reclaim-policy", "Retain")) == 0
    assert engine.image_ids(OLD_REFS) == OLD_IDS
