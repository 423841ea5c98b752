"""Every example in the README, on the documentation site and in the docstrings runs.

Markdown (README.md, docs/**/*.md, notebooks/README.md): every ```python
block is a complete program and runs as written, in a fresh `python` process,
in an empty temporary directory, with nothing prepared: no hidden setup. Two
conventions, both visible on the page:

    # continuing from the block above    (its first line) the block runs after
                                          the blocks above it on the page, in
                                          the same process (their code first)
    # needs: lightning                   (its first line, or the first line of
                                          the chain it continues) the chain is
                                          skipped when a module named there is
                                          not installed (libraries that cannot
                                          be installed beside Keras 3)

The process gets the test run's environment (TF_CPP_MIN_LOG_LEVEL=2 against
TensorFlow's start-up lines, PYTHONPATH with this checkout) and nothing else.

Docstrings: the ```python blocks and `>>>` examples of every docstring in the
package run, in order, in one namespace prepared by the setup of its side
(`DOCSTRING_SETUPS`: torch for `keras_accum.torch`, Keras otherwise), so an
API snippet's `Example:` may use `model`, `x`, `y`, `opt`, `loss_fn`, ... as a
reader of that method expects; the setups are `_KERAS_MODEL` and
`_TORCH_MODEL` below.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTINUE = "# continuing from the block above"
_NEEDS = re.compile(r"^#\s*needs:\s*([\w.]+(?:\s*,\s*[\w.]+)*)")

_KERAS_DATA = """
import numpy as np
import keras
import tensorflow as tf
import keras_accum
from keras_accum import AccumOptimizer
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 10)).astype("float32")
y = (x @ rng.normal(size=(10, 1))).astype("float32")
x_val, y_val = x[:16], y[:16]
"""

_KERAS_MODEL = _KERAS_DATA + """
keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((10,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
)
loss_fn = keras.losses.MeanSquaredError()
micro_batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
opt = AccumOptimizer(keras.optimizers.Adam(1e-3), merge_grad=2, use_ema=True)
opt.build(model.trainable_variables)
model.compile(optimizer=opt, loss="mse")
"""

_TORCH_MODEL = """
import torch
import keras_accum.torch
from keras_accum.torch import AccumOptimizer
torch.manual_seed(0)
x = torch.randn(64, 10)
y = x @ torch.randn(10, 1)
model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
loss_fn = torch.nn.MSELoss()
loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
micro_batches = loader
n_updates = len(loader) // 4
ddp_model = model  # a stand-in: the examples run in one process


def evaluate(model):
    with torch.no_grad():
        return float(loss_fn(model(x), y))


opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=2, use_ema=True)
"""

#: The setups of docstring examples (API snippets), by name.
SETUPS = {
    "keras-model": _KERAS_MODEL,
    "torch-model": _TORCH_MODEL,
}

#: Docstring examples of a module under the prefix run after this setup
#: (the longest matching prefix wins).
DOCSTRING_SETUPS = {
    "keras_accum": "keras-model",
    "keras_accum.torch": "torch-model",
}

_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


def _python_blocks(text: str):
    """Yields (first line number of the code, code) per ```python block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group(2):
            i += 1
            continue
        lang, start = m.group(2), i + 1
        j = start
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        if lang == "python":
            yield start + 1, textwrap.dedent("\n".join(lines[start:j]))
        i = j + 1


def _markdown_files():
    files = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "notebooks", "README.md")]
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "docs")):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("_"))
        files += sorted(os.path.join(dirpath, f) for f in filenames if f.endswith(".md"))
    return [f for f in files if not os.path.islink(os.path.dirname(f))]


def _first_line(code: str) -> str:
    return next((line.strip() for line in code.splitlines() if line.strip()), "")


def _markdown_chains():
    """One test per chain of blocks (a block and the continuing blocks after it)."""
    chains = []
    for path in _markdown_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rel = os.path.relpath(path, ROOT)
        for line, code in _python_blocks(text):
            if _first_line(code) == CONTINUE:
                assert chains and chains[-1]["file"] == rel, (
                    f"{rel}:{line}: '{CONTINUE}' with no block above it on the page"
                )
                chains[-1]["blocks"].append((line, code))
            else:
                chains.append({"file": rel, "blocks": [(line, code)]})
    return chains


def _is_slow(code: str) -> bool:
    # The house rule: a test that trains with `model.fit` or spawns processes is slow.
    return any(s in code for s in (".fit(", ".evaluate(", ".predict(", "mp.spawn(", "Strategy("))


def _chain_param(chain):
    line = chain["blocks"][0][0]
    code = "\n".join(b[1] for b in chain["blocks"])
    marks = [pytest.mark.slow] if _is_slow(code) else []
    return pytest.param(chain, id=f"{chain['file']}:{line}", marks=marks)


@pytest.mark.parametrize("chain", [_chain_param(c) for c in _markdown_chains()])
def test_markdown_example(chain, tmp_path):
    needs = _NEEDS.match(_first_line(chain["blocks"][0][1]))
    for name in needs.group(1).split(",") if needs else []:
        if importlib.util.find_spec(name.strip()) is None:
            pytest.skip(f"needs {name.strip()}, which is not installed")
    # The blocks joined as they stand on the page, each at its own line number
    # (tracebacks point at the Markdown file's lines).
    lines = []
    for line, code in chain["blocks"]:
        lines += [""] * (line - 1 - len(lines))
        lines += code.splitlines()
    script = tmp_path / "example.py"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
    )
    where = f"{chain['file']}:{chain['blocks'][0][0]}"
    assert done.returncode == 0, f"{where}\n" + done.stdout[-3000:] + done.stderr[-3000:]


def test_markdown_has_no_hidden_setup():
    """No block depends on code the reader cannot see (the old HTML-comment directives)."""
    found = []
    for path in _markdown_files():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if re.search(r"<!--\s*example", line):
                    found.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def _run(code: str, filename: str, first_line: int, namespace: dict) -> None:
    # Leading newlines make tracebacks point at the line in the file.
    exec(compile("\n" * (first_line - 1) + code, filename, "exec"), namespace)


def _setup(name: str) -> dict:
    namespace = {"__name__": "__example__"}
    exec(compile(SETUPS[name], f"<setup {name}>", "exec"), namespace)
    return namespace


# ------------------------------------------------------------------ docstrings
def _own_docstrings(module):
    """(qualname, docstring) of the module and everything defined in it."""
    yield module.__name__, module.__doc__
    for name, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj.__doc__
        elif inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj.__doc__
            for attr, member in vars(obj).items():
                if isinstance(member, property):
                    doc = member.fget.__doc__ if member.fget else None
                elif isinstance(member, (classmethod, staticmethod)):
                    doc = member.__func__.__doc__
                elif inspect.isfunction(member):
                    doc = member.__doc__
                else:
                    continue
                yield f"{module.__name__}.{name}.{attr}", doc


def _package_modules():
    import keras_accum

    names = ["keras_accum"] + [
        m.name for m in pkgutil.walk_packages(keras_accum.__path__, "keras_accum.")
    ]
    return sorted(names)


def _docstring_examples():
    found = []
    for module_name in _package_modules():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # torch (an extra) not installed: nothing to run there
            continue
        for qualname, doc in _own_docstrings(module):
            if not doc:
                continue
            doc = inspect.cleandoc(doc)
            blocks = [code for _, code in _python_blocks(doc)]
            has_doctest = ">>>" in doc
            if blocks or has_doctest:
                found.append((module_name, qualname, doc, blocks))
    return found


def _docstring_param(item):
    module_name, qualname, doc, blocks = item
    marks = [pytest.mark.slow] if _is_slow("\n".join(blocks) + doc) else []
    return pytest.param(item, id=qualname, marks=marks)


def _setup_for(module_name: str) -> str:
    prefixes = [p for p in DOCSTRING_SETUPS if module_name == p or module_name.startswith(p + ".")]
    return DOCSTRING_SETUPS[max(prefixes, key=len)]


_BACKEND_LINE = re.compile(r"^#\s*backend:\s*(\w+)")


@pytest.mark.parametrize("item", [_docstring_param(i) for i in _docstring_examples()])
def test_docstring_example(item, tmp_path, monkeypatch):
    """Each example runs after its module's setup, in this process; an example whose
    first line is `# backend: NAME` is a whole program of that Keras backend, run
    as written in a fresh process with `KERAS_BACKEND=NAME`."""
    module_name, qualname, doc, blocks = item
    monkeypatch.chdir(tmp_path)
    own = [code for code in blocks if _BACKEND_LINE.match(code)]
    for code in own:
        backend = _BACKEND_LINE.match(code).group(1)
        if importlib.util.find_spec(backend) is None:
            pytest.skip(f"the example needs {backend}")
        script = tmp_path / "example.py"
        script.write_text(code)
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
        assert out.returncode == 0, f"<docstring of {qualname}>:\n{out.stderr[-3000:]}"
    blocks = [code for code in blocks if not _BACKEND_LINE.match(code)]
    if not blocks and ">>>" not in doc:
        return
    namespace = _setup(_setup_for(module_name))
    for code in blocks:
        _run(code, f"<docstring of {qualname}>", 1, namespace)
    examples = doctest.DocTestParser().get_doctest(doc, namespace, qualname, None, 0)
    if examples.examples:
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(examples, clear_globs=False)
        assert runner.failures == 0, f"{runner.failures} doctest failure(s) in {qualname}"


def test_examples_are_found():
    """The collectors see the examples this file exists for (guards the parser)."""
    chains = _markdown_chains()
    assert any(c["file"] == "README.md" for c in chains)
    assert any(c["file"] == os.path.join("docs", "migration.md") for c in chains)
    qualnames = {q for _, q, _, _ in _docstring_examples()}
    assert "keras_accum.keras.optimizer.AccumOptimizer" in qualnames
    assert "keras_accum.torch.optimizer.AccumOptimizer" in qualnames
    files = {c["file"] for c in chains}
    assert os.path.join("docs", "guides", "accumulation.md") in files
    assert any(len(c["blocks"]) > 1 for c in chains), "no continuing block found"
