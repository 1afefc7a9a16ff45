"""python-ds as built: the python:3.11-slim equivalent plus pinned pip wheels, on a guest CPU they run on."""

from __future__ import annotations

import ast
import shlex
import subprocess

import pytest

from tartarus.runtime.qemu import TCG_CPU, qemu_binary
from tartarus.sdk import Sandbox
from tartarus.templates.spec import builtin_spec
from tartarus.templates.steps import GUEST_CA

pytestmark = pytest.mark.vm


def _pins() -> dict[str, str]:
    words = [w for step in builtin_spec("python-ds").steps for w in shlex.split(step) if "==" in w]
    return dict(w.split("==", 1) for w in words)


def test_pinned_wheels_are_installed_by_pip(sandbox: Sandbox) -> None:
    pins = _pins()
    out = sandbox.run_code(
        "import importlib.metadata as md, numpy\n"
        f"({{name: md.version(name) for name in {sorted(pins)!r}}}, numpy.__file__)"
    )
    assert out.error is None, out.error
    assert out.result is not None
    versions, numpy_file = ast.literal_eval(out.result)
    assert versions == pins
    # From PyPI into the image's /usr/local, not Debian's python3-numpy.
    assert numpy_file.startswith("/usr/local/lib/python3.11/dist-packages/numpy/")


def test_base_is_the_python_slim_equivalent(sandbox: Sandbox) -> None:
    """pip works as in the official image (no Debian EXTERNALLY-MANAGED marker), the template's apt step
    added procps, and nothing of the build host (its resolver, its hostname, the CA bundle lent to the
    build steps) is left in the image."""
    paths = [
        "/usr/bin/pip",
        "/usr/bin/pgrep",
        "/usr/lib/python3.11/EXTERNALLY-MANAGED",
        "/etc/resolv.conf",
        "/etc/hostname",
        GUEST_CA,
    ]
    out = sandbox.run_code(f"import os; [os.path.exists(p) for p in {paths!r}]")
    assert out.result == "[True, True, False, False, False, False]"


def test_numpy_pandas_sklearn_compute(sandbox: Sandbox) -> None:
    code = """
from numpy._core._multiarray_umath import __cpu_baseline__
from sklearn.linear_model import LinearRegression
x = np.linalg.solve(np.array([[3.0, 1.0], [1.0, 2.0]]), np.array([9.0, 8.0]))
sums = pd.DataFrame({"g": ["a", "b", "a", "b"], "v": [1, 2, 3, 4]}).groupby("g").v.sum().to_dict()
X = np.arange(20, dtype=float).reshape(-1, 1)
model = LinearRegression().fit(X, 3 * X.ravel() + 2)
(x.round(9).tolist(), sums, round(float(model.coef_[0]), 9), round(float(model.intercept_), 9),
 __cpu_baseline__)
"""
    out = sandbox.run_code(code)
    assert out.error is None, out.error
    assert out.result is not None
    solved, sums, coef, intercept, baseline = ast.literal_eval(out.result)
    assert (solved, sums, coef, intercept) == ([2.0, 3.0], {"a": 4, "b": 6}, 3.0, 2.0)
    # The wheel is built for x86-64-v2 and runs: the guest CPU (TCG here) provides it.
    assert "X86_V2" in baseline


def test_tcg_implements_every_feature_of_the_guest_cpu() -> None:
    """QEMU only warns about a CPU feature TCG lacks (and the guest then misses it): demand silence."""

    def warnings(cpu: str) -> str:
        argv = ["-accel", "tcg", "-cpu", cpu, "-M", "microvm", "-nodefaults", "-display", "none", "-S"]
        proc = subprocess.run(
            [qemu_binary(), *argv, "-qmp", "stdio"],
            input=b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
            capture_output=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stderr.decode()

    assert "doesn't support" in warnings("qemu64,+avx512f")  # the check sees a missing feature
    assert warnings(TCG_CPU) == ""
