"""Runs under the E2B SDKs' own venv (e2b_sdk.py), never under Tartarus's, and imports nothing of
Tartarus: times what `bench e2b` measures through the UNMODIFIED `e2b` SDK, against the E2B endpoint that
E2B_API_URL / E2B_SANDBOX_URL name, and prints one JSON object: {"seconds": [...], "errors": [...]}.

    python -P e2b_driver.py commands|code TEMPLATE N

`commands`: `e2b.Sandbox.create(template)` → `commands.run("echo hi")` answered; `code`:
`e2b_code_interpreter.Sandbox.create(template)` → `run_code("1+1")` answered. The kill that follows each
sample is not timed.
"""

import json
import sys
import time

from e2b import Sandbox


def commands(template, n):
    seconds, errors = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        sb = Sandbox.create(template=template, timeout=120)
        try:
            r = sb.commands.run("echo hi")
            elapsed = time.perf_counter() - t0
            if r.stdout != "hi\n" or r.exit_code != 0:
                errors.append(f"echo answered {r.stdout!r}, exit {r.exit_code}")
            else:
                seconds.append(elapsed)
        finally:
            sb.kill()
    return seconds, errors


def code(template, n):
    from e2b_code_interpreter import Sandbox as CodeSandbox

    seconds, errors = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        sb = CodeSandbox.create(template=template, timeout=120)
        try:
            execution = sb.run_code("1+1")
            elapsed = time.perf_counter() - t0
            if execution.text != "2" or execution.error:
                errors.append(f"run_code answered {execution.text!r}, error {execution.error}")
            else:
                seconds.append(elapsed)
        finally:
            sb.kill()
    return seconds, errors


WORKLOADS = {"commands": commands, "code": code}

if __name__ == "__main__":
    workload, template, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seconds, errors = WORKLOADS[workload](template, n)
    print(json.dumps({"seconds": seconds, "errors": errors}))
