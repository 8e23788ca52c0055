"""A static scan of a submission's editable cells for code that has no place in an answer.

Flags are for a human to review (they go into the grade export and the batch summary);
they change no score. The sandbox and the verifier are what make cheating pointless.
"""

from __future__ import annotations

import ast

from IPython.core.inputtransformer2 import TransformerManager

# Calls and attributes that an answer about attention never needs, with what each suggests.
CALLS = {
    "get_ipython": "IPython machinery (input transformers, custom exceptions, events)",
    "exec": "exec/eval/compile", "eval": "exec/eval/compile", "compile": "exec/eval/compile",
    "__import__": "dynamic import", "open": "file access", "setattr": "setattr (monkeypatching?)",
    "delattr": "delattr (monkeypatching?)", "globals": "globals() manipulation",
    "breakpoint": "debugger",
}
ATTRIBUTES = {
    "settrace": "trace function", "setprofile": "profile function", "_getframe": "frame access",
    "currentframe": "frame access", "stack": None, "f_back": "frame access", "f_globals": "frame access",
    "f_locals": "frame access", "tb_frame": "frame access", "set_custom_exc": "IPython custom exceptions",
    "input_transformers_cleanup": "IPython input transformer", "input_transformers_post": "IPython input transformer",
    "system": "shell command", "popen": "shell command", "_exit": "process exit", "exit": "process exit",
    "kill": "signals", "remove": "file access", "unlink": "file access", "rename": "file access",
    "replace": None, "write_text": "file access", "write_bytes": "file access", "read_text": "file access",
    "read_bytes": "file access", "listdir": "file access", "scandir": "file access", "walk": "file access",
    "chdir": "file access", "rmtree": "file access", "copy": None, "urlopen": "network",
    "_C": "PyTorch internals (torch._C)", "_python_dispatch": "PyTorch dispatch internals",
    "_disable_current_modes": "switches off PyTorch dispatch modes", "addaudithook": "audit hooks",
    "__torch_function__": "a tensor subclass that answers PyTorch calls itself",
    "__torch_dispatch__": "a tensor subclass that answers PyTorch calls itself",
    # Raw memory: an array built over an address (id() gives one) can rewrite any object of the
    # process, the one route around an in-process judge that no hook sees.
    "__array_interface__": "raw memory (an array over an address)", "__array_struct__": "raw memory",
    "ctypeslib": "raw memory (numpy.ctypeslib)", "from_file": "raw memory (a tensor over a file or /proc)",
    # The grader's live record (utils.replay.ACTIVE, utils.transcript.HANDLES): what the judge replays.
    "ACTIVE": "the grader's recorder", "HANDLES": "the grader's recorder",
}
# Names whose mere definition (a method or class attribute) deserves a look.
DEFINED = ("a tensor subclass", "raw memory")
# Private machinery whose import alone deserves a look (module paths, at any depth).
PRIVATE_MODULES = {"_C": "PyTorch internals (torch._C)", "_python_dispatch": "PyTorch dispatch internals",
                   "_dynamo": None}
# The course's grading machinery: no answer needs it.
GRADING_MODULES = {f"utils.{name}" for name in ("replay", "transcript", "handles", "traffic")}
MODULES = {
    "sys": None, "os": None, "gc": "garbage collector", "ctypes": "ctypes", "importlib": "importlib",
    "inspect": "frame access", "subprocess": "subprocess", "socket": "network", "urllib": "network",
    "requests": "network", "http": "network", "signal": "signals", "shutil": "file access",
    "pathlib": None, "builtins": "builtins", "threading": "threads", "multiprocessing": "processes",
    "pickle": "pickle", "marshal": "marshal", "types": None, "glob": "file access", "io": None,
    "mmap": "raw memory (mmap)",
}
HARMLESS_MAGICS = ("time", "timeit", "matplotlib", "prun", "debug", "who", "whos", "pdb")
WORDS = ("solutions", "gradebook", "autograde", ".ipynb", "/etc/", "../")


def flags(sources: list[str], setup: str = "") -> list[str]:
    """What in ``sources`` (the student's cells) deserves a human look, deduplicated, in order.
    ``setup`` is the notebook's set-up cell: the modules it imports must not be patched either."""
    found: list[str] = []
    transform = TransformerManager().transform_cell
    given = {a.asname or a.name.split(".")[0] for node in ast.walk(ast.parse(setup))
             if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    for source in sources:
        try:
            tree = ast.parse(transform(source))
        except SyntaxError:
            continue
        found += _scan(tree, given | set(MODULES) | {"torch", "np", "numpy", "F", "nn", "math"})
    return list(dict.fromkeys(found))


def _scan(tree: ast.AST, modules: set[str]) -> list[str]:
    found = []
    imported = set(modules)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom):
                names += [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in GRADING_MODULES]
            for name in names:
                if name in GRADING_MODULES:
                    found.append(f"imports {name} (the grader's recording machinery)")
                top = name.split(".")[0]
                imported.add(top)
                if MODULES.get(top):
                    found.append(f"imports {top} ({MODULES[top]})")
                private = next((PRIVATE_MODULES[p] for p in name.split(".")[1:] if PRIVATE_MODULES.get(p)), None)
                if private:
                    found.append(f"imports {name} ({private})")
            if isinstance(node, ast.ImportFrom):
                imported.update(a.asname or a.name for a in node.names)
    # `%time` and friends become get_ipython().run_line_magic(...): harmless ones are not flagged.
    magics = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("run_line_magic", "run_cell_magic") and node.args \
                and isinstance(node.args[0], ast.Constant):
            magics.add(id(node.func.value))
            if node.args[0].value not in HARMLESS_MAGICS:
                found.append(f"uses the %{node.args[0].value} magic")
    for node in ast.walk(tree):
        if id(node) in magics:
            continue
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and _root_name(target) in imported:
                    found.append(f"assigns {ast.unparse(target)} (monkeypatching a module or class?)")
                if isinstance(target, ast.Subscript) and "__dict__" in ast.unparse(target.value):
                    found.append(f"writes {ast.unparse(target)} (monkeypatching)")
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            # setattr on the student's own objects (a module tree being rebuilt) is ordinary; on an
            # imported module or class it is monkeypatching
            owner = _owner(node.args[0]) if name in ("setattr", "delattr") and node.args else None
            own = owner is not None and owner not in imported and owner not in CALLS
            if name in CALLS and not own:
                found.append(f"calls {name}() ({CALLS[name]})")
            if name == "getattr" and len(node.args) > 1 and not isinstance(node.args[1], ast.Constant):
                found.append("getattr with a computed name")
        elif isinstance(node, ast.Attribute) and ATTRIBUTES.get(node.attr):
            found.append(f"uses .{node.attr} ({ATTRIBUTES[node.attr]})")
        elif isinstance(node, ast.FunctionDef) and (ATTRIBUTES.get(node.name) or "").startswith(DEFINED):
            found.append(f"defines {node.name} ({ATTRIBUTES[node.name]})")
        elif isinstance(node, ast.Name) and node.id in ("__builtins__", "__loader__", "__spec__"):
            found.append(f"uses {node.id}")
        elif isinstance(node, ast.Name) and (ATTRIBUTES.get(node.id) or "").startswith(DEFINED):
            found.append(f"defines {node.id} ({ATTRIBUTES[node.id]})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            word = next((w for w in WORDS if w in node.value), None)
            if word and len(node.value) < 300:
                found.append(f"mentions {word!r} in a string (a path outside the notebook?)")
    return found


def _owner(node: ast.expr) -> str | None:
    """The plain name an object expression starts from (``model.get_submodule(p)[0]`` -> ``model``,
    ``getattr(torch, "nn")`` -> ``torch``), or None when there is none."""
    while True:
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        elif isinstance(node, ast.Call):
            is_getattr = isinstance(node.func, ast.Name) and node.func.id == "getattr" and node.args
            node = node.args[0] if is_getattr else node.func
        else:
            return node.id if isinstance(node, ast.Name) else None


def _root_name(node: ast.expr) -> str | None:
    """The name at the left of ``a.b.c``, or None when it is not a plain name."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None
