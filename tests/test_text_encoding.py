"""Text files are read and written as UTF-8 whatever the machine's locale says.

A machine whose locale encoding is ASCII (a bare container, a CI runner) fails on the
first non-ASCII character otherwise: the plots page embeds plotly.js, which has some.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "ffviz").rglob("*.py"), *(ROOT / "tools").glob("*.py"), *(ROOT / "tests").glob("*.py"),
                  ROOT / "app.py"])
TEXT_CALLS = {"write_text", "read_text", "open", "fdopen"}


def _is_binary(call: ast.Call) -> bool:
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and "b" in mode.value


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def text_io_without_encoding(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or _callee(node) not in TEXT_CALLS or _is_binary(node):
            continue
        if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                and node.func.value.id in {"Image", "webbrowser", "tarfile", "zipfile", "safetensors"}:
            continue
        if _callee(node) == "open" and isinstance(node.func, ast.Attribute) \
                and node.func.value.__class__ is ast.Name and node.func.value.id == "os":
            continue  # os.open returns a descriptor; its fdopen is what gets checked
        if not any(k.arg == "encoding" for k in node.keywords):
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
            found.append(f"{where}:{node.lineno} {_callee(node)}")
    return found


def test_every_text_read_and_write_names_utf8():
    missing = [hit for path in SOURCES for hit in text_io_without_encoding(path)]
    assert not missing, "text I/O without encoding=\"utf-8\":\n" + "\n".join(missing)


def test_the_checker_sees_a_call_without_encoding(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("from pathlib import Path\nPath('x').write_text('é')\nopen('y', 'rb')\n", encoding="utf-8")
    assert text_io_without_encoding(bad) == ["probe.py:2 write_text"]


def test_plots_page_writes_under_an_ascii_locale(tmp_path):
    """The page that failed on an ASCII runner, written in a child whose locale encoding is ASCII."""
    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0"}
    code = ("import locale; assert locale.getpreferredencoding(False).lower() in ('ascii', 'ansi_x3.4-1968'), "
            "locale.getpreferredencoding(False)\n"
            "from pathlib import Path\n"
            "import plotly.graph_objects as go\n"
            "import ffviz.app.views as V\n"
            "V.plot_views = lambda session, log=None: {n: go.Figure() for n in V.PLOT_NAMES}\n"
            f"V.write_plots_html(None, Path({str(tmp_path / 'p.html')!r}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.html").stat().st_size > 1000


def test_the_cli_prints_tables_on_an_ascii_terminal(tmp_path):
    """A table with "±" printed to an ASCII stdout comes out escaped, not as a crash."""
    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "ascii"}
    code = ("import sys, ffviz.__main__ as M\n"
            "sys.argv = ['ffviz']\n"
            "try:\n    M.main(['generate', '--frames', '0'])\nexcept SystemExit:\n    pass\n"
            "print('mean \\u00b1 half')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode("ascii", "replace")
    assert b"mean \\xb1 half" in done.stdout
