"""Runs inside the verifier's sandboxed Python process (as ``python -I -c <this file's text>``).

Reads the job (cells, nonce, timeout) from stdin, then runs the set-up cell, snapshots
everything a verdict relies on, and runs the student's cells and the hidden tests in
notebook order in one namespace, as nbgrader does. A test passes only if it raises
nothing and nothing it relies on was replaced, traced or reached through frames.
Verdicts go to a private copy of stdout, each line prefixed with a nonce the student's
code never sees through ordinary means (stdout itself goes to /dev/null).
"""


def _main():
    # Everything the verdicts use is bound here, before any student code runs.
    import builtins
    import json
    import os
    import signal
    import sys
    import threading
    import types

    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    nonce, timeout = job.pop("nonce"), job["timeout"]
    out = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    _exec, _compile, _isinstance = exec, compile, isinstance
    _gettrace, _getprofile, _getframe = sys.gettrace, sys.getprofile, sys._getframe
    _alarm, _signal, _sigalrm = signal.alarm, signal.signal, signal.SIGALRM
    _BaseException, _Module = BaseException, types.ModuleType
    _dumps, _write = json.dumps, out.write

    def say(*parts):
        _write(nonce + " " + _dumps(parts) + "\n")

    # Student code reaching for frames, the garbage collector, raw memory or threads can
    # rewrite the harness's state; any of these from a student cell voids later verdicts.
    suspicious = []
    stdlib = os.path.dirname(os.__file__) + os.sep
    hooked = [False]
    watched_events = ("sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile",
                      "gc.get_referrers", "gc.get_referents", "gc.get_objects", "ctypes.",
                      "_thread.start_new_thread", "object.__getattr__", "code.__new__",
                      "function.__new__", "cpython.")

    def audit(event, args):
        if hooked[0] or not event.startswith(watched_events):
            return
        # Reading a function's __code__ is harmless; reaching frames through tracebacks or generators is not.
        if event == "object.__getattr__" and not (len(args) > 1 and str(args[1]).endswith("_frame")):
            return
        # A cell asking for its own frame (sys._getframe()) reaches nothing of the harness.
        if event == "sys._getframe" and args and args[0].f_code.co_filename.startswith(("<student", "<test")):
            return
        hooked[0] = True
        try:
            frame = _getframe(1)
            # The first caller outside the standard library (inspect, ctypes, threading wrap these
            # calls): a student cell calling them directly is suspicious, torch calling them is not.
            while frame is not None and frame.f_code.co_filename.startswith(stdlib):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith("<student"):
                suspicious.append(event)
        finally:
            hooked[0] = False

    class CellTimeout(_BaseException):
        pass

    def on_alarm(signum, frame):
        raise CellTimeout(f"cell ran longer than {timeout} s")

    ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        from IPython.display import display
        ns["display"] = display
    except ImportError:
        pass
    try:
        _exec(_compile(job["setup"], "<setup>", "exec"), ns)
    except _BaseException as error:  # the instructor's cell: nothing can pass without it
        say("setup-failed", f"{type(error).__name__}: {error}")
        return

    # Importing torch's compiler later rebinds torch functions (it wraps torch.manual_seed):
    # let that happen before the snapshot, not during a student's cell.
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:
        pass

    # What the verdicts rely on: modules' dictionaries, builtins, core classes, the names
    # the set-up cell bound to modules.
    # Public modules only, and their public functions, classes and submodules: private
    # module state (caches, registries) changes as torch works.
    modules = {name: mod for name, mod in sys.modules.items()
               if mod is not None and name.split(".")[0] in ("torch", "numpy", "utils", "math",
                                                              "builtins", "functools", "operator")
               and name.count(".") <= 2 and "._" not in name}
    modules["sys"] = sys
    watched = {name: mod.__dict__ for name, mod in modules.items()}
    import torch
    for cls in (torch.Tensor, torch._C.TensorBase, object, type, int, float, bool, str, list, dict,
                tuple, BaseException, Exception, AssertionError, types.FunctionType):
        watched[f"class {cls.__qualname__}"] = cls.__dict__
    # Keys that change without anyone cheating.
    volatile = {"__warningregistry__", "last_type", "last_value", "last_traceback", "last_exc",
                "_", "__loader__", "__spec__"}
    def relied_on(module, key, value):
        return module.startswith("class ") or module == "builtins" or (
            not key.startswith("_") and (callable(value) or _isinstance(value, _Module)))

    snapshot = {name: {k: v for k, v in d.items() if relied_on(name, k, v)} for name, d in watched.items()}
    bound = {name: value for name, value in ns.items() if _isinstance(value, _Module)}
    missing = object()

    def tampering():
        if suspicious:
            return f"the submission reached into the interpreter ({suspicious[0]})"
        if _gettrace() is not None or _getprofile() is not None or threading._trace_hook \
                or threading._profile_hook:
            return "a trace or profile function is installed"
        for name, value in bound.items():
            if ns.get(name, missing) is not value:
                return f"the name `{name}` was rebound"
        for name, before in snapshot.items():
            now = watched[name]
            for key, value in before.items():
                if key not in volatile and now.get(key, missing) is not value:
                    return f"{name}.{key} was replaced"
        return None

    sys.addaudithook(audit)
    _signal(_sigalrm, on_alarm)
    voided = None
    for index, cell in enumerate(job["cells"]):
        say("cell", index)
        is_test = cell["kind"] == "test"
        name = f"<test {cell['id']}>" if is_test else f"<student cell {index}>"
        error = None
        try:
            code = _compile(cell["source"], name, "exec")
            _alarm(timeout)
            try:
                _exec(code, ns)
            finally:
                _alarm(0)
        except _BaseException as caught:  # student errors continue, like nbgrader's cells
            error = f"{type(caught).__name__}"
        if is_test:
            voided = voided or tampering()
            if voided:
                say("test", cell["id"], "fail", voided)
            elif error:
                say("test", cell["id"], "fail", error)
            else:
                say("test", cell["id"], "pass", "")
    say("done")


_main()
