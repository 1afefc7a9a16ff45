"""run_code's rich results on python-ds, through Tartarus's own SDK: what a notebook would display comes
back typed, a matplotlib figure as a PNG (Agg: no display in a sandbox), a DataFrame as HTML."""

from __future__ import annotations

import base64

import pytest

from tartarus.sdk import Result, Sandbox

pytestmark = pytest.mark.vm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(result: Result) -> bytes:
    assert result.png is not None
    data = base64.b64decode(result.png, validate=True)
    assert data.startswith(PNG_SIGNATURE)
    return data


def test_matplotlib_is_preloaded_headless(sandbox: Sandbox) -> None:
    out = sandbox.run_code(
        "import sys, matplotlib\n('matplotlib.pyplot' in sys.modules, matplotlib.get_backend())"
    )
    assert out.result == "(True, 'agg')"


def test_a_figure_left_open_comes_back_as_png_after_the_main_result(sandbox: Sandbox) -> None:
    out = sandbox.run_code("plt.plot([1, 3, 2])")
    assert out.error is None, out.error
    main, figure = out.results
    assert main.is_main_result and main.text is not None and "Line2D" in main.text
    assert not figure.is_main_result and figure.text is not None and figure.text.startswith("<Figure size")
    assert len(_png(figure)) > 1000  # a real rendering, not an empty image
    assert out.execution_count is not None and out.execution_count > 0
    # shown once: the figure was closed, the next cell shows nothing of it
    assert sandbox.run_code("len(plt.get_fignums())").results[0].text == "0"


def test_plt_show_and_a_figure_value_each_give_one_png(sandbox: Sandbox) -> None:
    shown = sandbox.run_code("fig, ax = plt.subplots()\nax.bar(['a', 'b'], [1, 2])\nplt.show()")
    assert shown.error is None and shown.stderr == ""  # no Agg "cannot be shown" warning
    assert [r.is_main_result for r in shown.results] == [False]
    _png(shown.results[0])
    value = sandbox.run_code("fig")  # the figure object itself is the cell's value
    assert [r.is_main_result for r in value.results] == [True]
    _png(value.results[0])


def test_a_dataframe_comes_back_as_html_and_text(sandbox: Sandbox) -> None:
    out = sandbox.run_code("pd.DataFrame({'city': ['Oslo', 'Lima'], 'n': [3, 5]})")
    (main,) = out.results
    assert main.is_main_result and main.text == out.result
    assert main.html is not None and "<table" in main.html and "<td>Lima</td>" in main.html
    assert main.text is not None and "Oslo" in main.text
    assert out.text == main.text
    shown = sandbox.run_code("display(pd.Series([1, 2]).to_frame())\nNone")
    assert len(shown.results) == 1 and not shown.results[0].is_main_result
    assert shown.results[0].html is not None and "<table" in shown.results[0].html
