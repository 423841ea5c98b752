"""Every example in the README, in docs/*.md and in the docstrings runs.

Markdown: each ```python block runs in a fresh namespace, in a temporary
directory. An HTML comment on the line just above the block (invisible on
GitHub and on the documentation site) changes that; directives are separated
by ";":

    <!-- example: setup keras-model -->   run the named setup (SETUPS below) first
    <!-- example: continue -->            run in the namespace of the block above
    <!-- example: requires accelerate --> skip when the module is not installed
    <!-- example: skip (reason) -->       do not run (use sparingly)
    <!-- example: subprocess -->          run in a fresh Python process (a block
                                          that makes its own tf.distribute strategy:
                                          two collective strategies in one process
                                          can abort each other's ops)

Docstrings: the ```python blocks and `>>>` examples of every docstring in the
package run, in order, in one namespace prepared by the setup of its side
(`DOCSTRING_SETUPS`: torch for `keras_accum.torch`, Keras otherwise), so an
`Example:` may use `model`, `x`, `y`, `opt`, ... as a reader would expect.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import re
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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

#: Named setups for `<!-- example: setup NAME -->`.
SETUPS = {
    "keras-data": _KERAS_DATA,
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
_DIRECTIVE = re.compile(r"^\s*<!--\s*example:(.*?)-->\s*$")


def _python_blocks(text: str):
    """Yields (first line number of the code, code, directives) per ```python block."""
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
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            d = _DIRECTIVE.match(lines[k]) if k >= 0 else None
            directives = [s.strip() for s in d.group(1).split(";")] if d else []
            yield start + 1, textwrap.dedent("\n".join(lines[start:j])), directives
        i = j + 1


def _markdown_files():
    files = [os.path.join(ROOT, "README.md")]
    docs = os.path.join(ROOT, "docs")
    files += sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
    return files


def _markdown_chains():
    """One test per chain of blocks (a block and the `continue` blocks after it)."""
    chains = []
    for path in _markdown_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rel = os.path.relpath(path, ROOT)
        for line, code, directives in _python_blocks(text):
            if "continue" in directives and chains and chains[-1]["file"] == rel:
                chains[-1]["blocks"].append((line, code, directives))
            else:
                chains.append({"file": rel, "blocks": [(line, code, directives)]})
    return chains


def _run(code: str, filename: str, first_line: int, namespace: dict) -> None:
    # Leading newlines make tracebacks point at the line in the file.
    exec(compile("\n" * (first_line - 1) + code, filename, "exec"), namespace)


def _setup(name: str) -> dict:
    namespace = {"__name__": "__example__"}
    exec(compile(SETUPS[name], f"<setup {name}>", "exec"), namespace)
    return namespace


def _is_slow(code: str) -> bool:
    # The house rule: a test that trains with `model.fit` is marked slow.
    return any(s in code for s in (".fit(", ".evaluate(", ".predict("))


def _chain_param(chain):
    line = chain["blocks"][0][0]
    code = "\n".join(b[1] for b in chain["blocks"])
    marks = [pytest.mark.slow] if _is_slow(code) else []
    return pytest.param(chain, id=f"{chain['file']}:{line}", marks=marks)


@pytest.mark.parametrize("chain", [_chain_param(c) for c in _markdown_chains()])
def test_markdown_example(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__example__"}
    for line, code, directives in chain["blocks"]:
        for d in directives:
            if d.startswith("skip"):
                pytest.skip(f"marked not runnable: {d}")
            if d.startswith("requires "):
                pytest.importorskip(d.split(None, 1)[1])
        for d in directives:
            if d.startswith("setup "):
                name = d.split(None, 1)[1]
                assert name in SETUPS, f"unknown example setup {name!r} at {chain['file']}:{line}"
                namespace.update(_setup(name))
        if "subprocess" in directives:
            _run_in_subprocess(code, tmp_path)
            continue
        _run(code, os.path.join(ROOT, chain["file"]), line, namespace)


def _run_in_subprocess(code: str, cwd) -> None:
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


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
            blocks = [code for _, code, _ in _python_blocks(doc)]
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


@pytest.mark.parametrize("item", [_docstring_param(i) for i in _docstring_examples()])
def test_docstring_example(item, tmp_path, monkeypatch):
    module_name, qualname, doc, blocks = item
    monkeypatch.chdir(tmp_path)
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
