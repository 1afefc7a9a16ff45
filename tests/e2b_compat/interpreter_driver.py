"""Runs under the E2B SDK's own venv (tartarus/bench/e2b_sdk.py), never under Tartarus's: drives the
UNMODIFIED `e2b-code-interpreter` SDK against the E2B endpoint that E2B_API_URL / E2B_SANDBOX_URL name,
and prints what it observed as one JSON object for tests/e2b_compat/test_interpreter_sdk.py.

    python interpreter_driver.py sync|async [core]

`core` stops after the core of the scenario (results, logs, errors, a plot, a DataFrame): what the oldest
supported SDK is held to in CI.

One scenario for both flavours: each SDK call goes through `v()`, which awaits what the async SDK
returns and passes the sync SDK's values through.
"""

import asyncio
import base64
import inspect
import json
import os
import sys

from e2b_code_interpreter import AsyncSandbox, Sandbox

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def failure(e):
    return {"raised": type(e).__name__, "message": str(e)[:300]}


async def v(value):
    return await value if inspect.isawaitable(value) else value


async def attempt(fn):
    try:
        return await v(fn())
    except Exception as e:
        return failure(e)


def results(execution):
    return [{"formats": sorted(r.formats()), "main": r.is_main_result} for r in execution.results]


async def scenario(cls, out, core):
    sb = await v(cls.create(timeout=600))  # the SDK's default template: code-interpreter-v1
    sid = sb.sandbox_id
    try:
        ex = await v(sb.run_code("1+1"))
        out["one_plus_one"] = {"text": ex.text, "results": results(ex), "count": ex.execution_count}
        await v(sb.run_code("x = 41"))
        out["state"] = (await v(sb.run_code("x + 1"))).text

        seen = []
        ex = await v(
            sb.run_code(
                "print('hello')\nimport sys; print('oops', file=sys.stderr)",
                on_stdout=lambda m: seen.append(["stdout", m.line, isinstance(m.timestamp, int)]),
                on_stderr=lambda m: seen.append(["stderr", m.line, m.error]),
            )
        )
        out["logs"] = {"stdout": ex.logs.stdout, "stderr": ex.logs.stderr, "callbacks": seen}

        ex = await v(sb.run_code("def f():\n    raise ValueError('bad value')\nf()"))
        e = ex.error
        out["error"] = {
            "name": e.name,
            "value": e.value,
            "traceback_names_the_line": "line 2, in f" in e.traceback,
            "results": results(ex),
        }
        out["after_error"] = (await v(sb.run_code("x"))).text  # the interpreter lives on

        ex = await v(sb.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"))
        pngs = [base64.b64decode(r.png) for r in ex.results if r.png]
        out["plot"] = {
            "results": results(ex),
            "png_signatures": [p[:8] == PNG_SIGNATURE for p in pngs],
            "png_sizes": [len(p) for p in pngs],
            "error": None if ex.error is None else ex.error.name,
        }

        ex = await v(
            sb.run_code("import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'n': [3, 5]})")
        )
        main = next(r for r in ex.results if r.is_main_result)
        out["dataframe"] = {
            "formats": sorted(main.formats()),
            "table": "<table" in (main.html or "") and "<td>Lima</td>" in (main.html or ""),
            "text_has_oslo": "Oslo" in (ex.text or ""),
        }

        if not core:
            await rest_of_scenario(cls, sb, sid, out)
    finally:
        out["kill"] = await v(sb.kill())
    out["run_after_kill"] = await attempt(lambda: sb.run_code("1"))


async def rest_of_scenario(cls, sb, sid, out):
    got = []
    await v(sb.run_code("{'a': 1}", on_result=lambda r: got.append(r.text)))
    out["on_result"] = got
    out["envs"] = (await v(sb.run_code("import os; os.environ['GREETING']", envs={"GREETING": "hi"}))).text
    out["envs_after"] = (await v(sb.run_code("os.environ.get('GREETING')"))).text

    ctx = await v(sb.create_code_context(cwd="/tmp"))
    out["context"] = {"language": ctx.language, "cwd": ctx.cwd, "has_id": bool(ctx.id)}
    await v(sb.run_code("y = 'in the context'", context=ctx))
    out["context_state"] = (await v(sb.run_code("y", context=ctx))).text
    out["context_cwd"] = (await v(sb.run_code("import os; os.getcwd()", context=ctx))).text
    out["default_lacks_y"] = (await v(sb.run_code("y"))).error.name
    out["context_lacks_x"] = (await v(sb.run_code("x", context=ctx))).error.name
    out["listed"] = ctx.id in [c.id for c in await v(sb.list_code_contexts())]
    await v(sb.restart_code_context(ctx))
    out["after_restart"] = (await v(sb.run_code("y", context=ctx))).error.name
    out["default_after_restart"] = (await v(sb.run_code("x"))).text
    await v(sb.remove_code_context(ctx.id))
    out["listed_after_remove"] = ctx.id in [c.id for c in await v(sb.list_code_contexts())]
    out["run_in_removed"] = await attempt(lambda: sb.run_code("1", context=ctx))
    out["bash"] = await attempt(lambda: sb.run_code("echo hi", language="bash"))

    out["pause"] = await v(sb.pause())
    resumed = await v(cls.connect(sid))
    out["after_resume"] = (await v(resumed.run_code("x"))).text


def main():
    mode, core = sys.argv[1], sys.argv[2:] == ["core"]
    out = {}
    try:
        asyncio.run(scenario(Sandbox if mode == "sync" else AsyncSandbox, out, core))
    except Exception as e:  # what was observed until then still goes out, with what stopped it
        out["crashed"] = failure(e)
    print(json.dumps(out), flush=True)
    # Skip the interpreter's teardown: the SDK's HTTP client (pyqwest, Rust) sometimes aborts (SIGABRT)
    # while Python finalises it after an asyncio run, once everything observed is already out.
    os._exit(0)


if __name__ == "__main__":
    main()
