"""E2B conformance of the code interpreter: the UNMODIFIED `e2b-code-interpreter` SDK (pinned, in its own
venv) drives a real `tartarus serve --e2b-port` with real sandboxes of its default template
(`code-interpreter-v1`), sync and asyncio. interpreter_driver.py runs the scenario in the SDK's venv and
reports what the SDK returned or raised; the tests here assert on that. As in test_sdk.py, the newest
release runs the whole scenario in both flavours, the oldest supported its core, sync (`full_only`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tartarus.bench.e2b_sdk import sdk_python
from tests.e2b_compat.test_sdk import (  # noqa: F401  (endpoint: the module's daemon)
    RUNS,
    Endpoint,
    endpoint,
    full_only,
    sdk_env,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]  # the first test runs the scenario

DRIVER = Path(__file__).with_name("interpreter_driver.py")


@pytest.fixture(scope="module", params=RUNS, ids=[f"{r}-{f}" for r, f in RUNS])
def observed(request: pytest.FixtureRequest, endpoint: Endpoint) -> dict[str, Any]:  # noqa: F811
    release, flavour = request.param
    mode = "sync" if flavour == "blocking" else "async"
    core = ["core"] if release == "oldest" else []
    run = subprocess.run(
        [str(sdk_python(release)), str(DRIVER), mode, *core],
        capture_output=True,
        text=True,
        env=sdk_env(endpoint, release),
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out: dict[str, Any] = json.loads(run.stdout)
    out["release"] = release
    return out


def test_the_scenario_ran_to_its_end(observed: dict[str, Any]) -> None:
    assert "crashed" not in observed, observed.get("crashed")


def test_one_plus_one_is_the_text_2_and_state_persists(observed: dict[str, Any]) -> None:
    assert observed["one_plus_one"]["text"] == "2"
    assert observed["one_plus_one"]["results"] == [{"formats": ["text"], "main": True}]
    assert isinstance(observed["one_plus_one"]["count"], int) and observed["one_plus_one"]["count"] >= 1
    assert observed["state"] == "42"


def test_prints_are_logs_and_reach_the_callbacks(observed: dict[str, Any]) -> None:
    assert observed["logs"]["stdout"] == ["hello\n"]
    assert observed["logs"]["stderr"] == ["oops\n"]
    assert observed["logs"]["callbacks"] == [["stdout", "hello\n", True], ["stderr", "oops\n", True]]


def test_an_exception_is_the_sdks_execution_error(observed: dict[str, Any]) -> None:
    assert observed["error"] == {
        "name": "ValueError",
        "value": "bad value",
        "traceback_names_the_line": True,
        "results": [],
    }
    assert observed["after_error"] == "41"


def test_a_matplotlib_figure_is_a_png(observed: dict[str, Any]) -> None:
    plot = observed["plot"]
    assert plot["error"] is None
    assert plot["results"] == [{"formats": ["png", "text"], "main": False}]
    assert plot["png_signatures"] == [True]
    assert plot["png_sizes"][0] > 1000


def test_a_dataframe_is_html_and_text(observed: dict[str, Any]) -> None:
    assert observed["dataframe"] == {"formats": ["html", "text"], "table": True, "text_has_oslo": True}
    if observed["release"] == "newest":
        assert observed["on_result"] == ["{'a': 1}"]


def test_env_vars_hold_for_one_execution(observed: dict[str, Any]) -> None:
    full_only(observed)
    assert observed["envs"] == "'hi'"
    assert observed["envs_after"] is None  # None is no result: no text


def test_contexts_are_separate_and_restart_and_remove(observed: dict[str, Any]) -> None:
    full_only(observed)
    assert observed["context"] == {"language": "python", "cwd": "/tmp", "has_id": True}
    assert observed["context_state"] == "'in the context'"
    assert observed["context_cwd"] == "'/tmp'"
    assert observed["default_lacks_y"] == "NameError" and observed["context_lacks_x"] == "NameError"
    assert observed["listed"] is True
    assert observed["after_restart"] == "NameError"  # the context forgot its globals
    assert observed["default_after_restart"] == "41"  # the default one did not
    assert observed["listed_after_remove"] is False
    assert observed["run_in_removed"]["raised"] == "NotFoundException"


def test_bash_is_refused_as_unsupported(observed: dict[str, Any]) -> None:
    full_only(observed)
    assert observed["bash"]["raised"] == "SandboxException"
    assert "Python" in observed["bash"]["message"]


def test_pause_and_resume_keep_the_interpreters_state(observed: dict[str, Any]) -> None:
    full_only(observed)
    assert observed["pause"] is True
    assert observed["after_resume"] == "41"


def test_after_kill_the_sdk_says_the_sandbox_is_gone(observed: dict[str, Any]) -> None:
    assert observed["kill"] is True
    assert observed["run_after_kill"]["raised"] == "TimeoutException"  # E2B's 502: "sandbox timeout"
