"""The guest interpreter's cells, results and contexts (runtime/interpreter_main.py, run here on the host:
it is stdlib only), and the host's reading of what it sends (wire.py), which must never
trust the guest's messages to be well formed."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from tartarus.runtime import interpreter_main as guest
from tartarus.wire import Result, context_of, execution_of

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


class Rich:
    def __repr__(self) -> str:
        return "Rich()"

    def _repr_html_(self) -> str:
        return "<b>rich</b>"

    def _repr_png_(self) -> bytes:
        return PNG

    def _repr_json_(self) -> dict[str, int]:
        return {"a": 1}

    def _repr_markdown_(self) -> None:  # declines: no markdown format
        return None

    def _repr_latex_(self) -> str:
        raise RuntimeError("broken formatter")


@pytest.fixture
def interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> guest.Interpreter:
    monkeypatch.chdir(tmp_path)
    return guest.Interpreter({"Rich": Rich})


def run(interpreter: guest.Interpreter, code: str, **request: Any) -> dict[str, Any]:
    return interpreter.handle({"id": 1, "code": code, **request})


def test_the_last_expression_is_the_main_result_with_its_text(interpreter: guest.Interpreter) -> None:
    answer = run(interpreter, "x = 1\nx + 1")
    assert answer["result"] == "2"
    assert answer["results"] == [{"text": "2", "is_main_result": True}]
    assert answer["execution_count"] == 1
    assert run(interpreter, "x")["execution_count"] == 2  # state and count kept across calls
    assert run(interpreter, "y = 3")["results"] == []  # a statement has no value to show


def test_a_value_renders_in_every_format_it_offers(interpreter: guest.Interpreter) -> None:
    (main,) = run(interpreter, "Rich()")["results"]
    assert main == {
        "text": "Rich()",
        "html": "<b>rich</b>",
        "png": base64.b64encode(PNG).decode(),
        "json": {"a": 1},
        "is_main_result": True,
    }  # no markdown (declined), no latex (its formatter raised)
    assert run(interpreter, "Rich")["results"] == [{"text": repr(Rich), "is_main_result": True}]


def test_display_calls_are_results_before_the_main_one(interpreter: guest.Interpreter) -> None:
    answer = run(interpreter, "display(Rich(), 'two')\n3")
    assert [(r["text"], r["is_main_result"]) for r in answer["results"]] == [
        ("Rich()", False),
        ("'two'", False),
        ("3", True),
    ]
    assert run(interpreter, "4")["results"] == [{"text": "4", "is_main_result": True}]  # none carried over


def test_an_exception_gives_name_value_and_traceback_and_output_so_far(
    interpreter: guest.Interpreter,
) -> None:
    answer = run(interpreter, "print('before')\nimport sys; print('err', file=sys.stderr)\n1/0")
    assert answer["stdout"] == "before\n"
    assert answer["stderr"] == "err\n"
    assert answer["error"]["name"] == "ZeroDivisionError"
    assert answer["error"]["value"] == "division by zero"
    assert 'File "<cell>", line 3' in answer["error"]["traceback"]
    assert answer["results"] == []


def test_oversized_results_shrink_to_a_note(
    interpreter: guest.Interpreter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest, "MAX_RESULTS", 1000)
    answer = run(interpreter, "display('a' * 600, 'b' * 600)\n'c'")
    texts = [r["text"] for r in answer["results"]]
    assert texts[0] == repr("a" * 600)
    assert texts[1].startswith("[a result of") and "dropped" in texts[1]
    assert texts[2] == "'c'"


def test_env_is_set_for_the_cell_then_restored(interpreter: guest.Interpreter) -> None:
    os.environ.pop("TARTARUS_T_VAR", None)
    answer = run(interpreter, "import os; os.environ['TARTARUS_T_VAR']", env={"TARTARUS_T_VAR": "v"})
    assert answer["result"] == "'v'"
    assert "TARTARUS_T_VAR" not in os.environ


def test_contexts_have_separate_globals_and_working_directories(
    interpreter: guest.Interpreter, tmp_path: Path
) -> None:
    (tmp_path / "sub").mkdir()
    run(interpreter, "x = 'default'")
    made = interpreter.handle({"id": 2, "op": "create_context", "cwd": str(tmp_path / "sub")})["context"]
    assert made["language"] == "python" and made["cwd"] == str(tmp_path / "sub")
    cid = made["id"]
    assert run(interpreter, "x", context=cid)["error"]["name"] == "NameError"
    run(interpreter, "x = 'other'", context=cid)
    assert run(interpreter, "import os; os.getcwd()", context=cid)["result"] == repr(str(tmp_path / "sub"))
    assert run(interpreter, "x")["result"] == "'default'"
    assert run(interpreter, "import os; os.getcwd()")["result"] == repr(str(tmp_path))
    listed = interpreter.handle({"id": 3, "op": "list_contexts"})["contexts"]
    assert [c["id"] for c in listed] == ["default", cid]

    interpreter.handle({"id": 4, "op": "restart_context", "context": cid})
    assert run(interpreter, "x", context=cid)["error"]["name"] == "NameError"  # forgotten
    assert run(interpreter, "Rich", context=cid)["error"] is None  # preloads come back
    assert run(interpreter, "x")["result"] == "'default'"  # the others untouched

    interpreter.handle({"id": 5, "op": "delete_context", "context": cid})
    with pytest.raises(guest.Fault) as gone:
        run(interpreter, "1", context=cid)
    assert gone.value.code == "not_found"
    with pytest.raises(guest.Fault) as kept:
        interpreter.handle({"id": 6, "op": "delete_context", "context": "default"})
    assert kept.value.code == "invalid_argument"
    with pytest.raises(guest.Fault) as bad_cwd:
        interpreter.handle({"id": 7, "op": "create_context", "cwd": str(tmp_path / "missing")})
    assert bad_cwd.value.code == "invalid_argument"


def test_the_host_reads_rich_results_typed() -> None:
    execution = execution_of(
        {
            "stdout": "",
            "stderr": "",
            "result": "2",
            "results": [
                {"png": "aGk=", "is_main_result": False},
                {"text": "2", "html": "<p>2</p>", "json": [1], "is_main_result": True},
            ],
            "execution_count": 4,
            "error": None,
        }
    )
    assert execution.results == (
        Result(png="aGk="),
        Result(text="2", html="<p>2</p>", json=[1], is_main_result=True),
    )
    assert execution.text == "2" and execution.execution_count == 4
    assert execution.results[1].formats() == ["text", "html", "json"]


def test_the_host_drops_what_a_tampered_guest_mistyped() -> None:
    execution = execution_of(
        {
            "stdout": "",
            "stderr": "",
            "results": [{"text": 5, "html": ["x"], "json": "s", "is_main_result": "yes"}, 7],
            "execution_count": "3",
        }
    )
    assert execution.results == (Result(), Result(text="7"))
    assert execution.execution_count is None and execution.text is None
    assert execution_of({"stdout": "", "stderr": "", "results": "nope"}).results == ()
    with pytest.raises(ValueError):
        context_of({"id": 1, "language": "python", "cwd": "/"})
