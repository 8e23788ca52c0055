"""The judge: runs as ``python -I -c <this file's text>`` and never runs a line of student code.

For each test cell the verifier passed and recorded (``utils/replay.py``), it runs the test
again: the set-up cell and the test are the instructor's, the names the test reads from the
student's cells are the recorded values, each student function is a replay of the calls the
test made to it in the verifier's process, and each object of a student's class is a stand-in
whose methods replay the same way (``utils/handles.py``). The references the test computes and the comparisons it
makes are the judge's own, on exact tensors and built-in values, so a wrong value passes here only
if the test itself would accept it. A test whose calls differ from the record (other arguments, a
missing or extra call) fails.

Protocol: one JSON line with the set-up cell and the time limit (sent when grading starts, so that
importing torch and running the set-up overlap with the verifier), then one JSON line per cell
(``{"id", "visible", "hidden", "record"}``), then ``{"done": true}``. It writes JSON lines:
``["ready"]``, ``["test", id, "pass" | "fail" | "undecided", reason]`` with reasons from a fixed vocabulary,
``["done"]``.
"""


def _main():
    import builtins
    import json
    import os
    import signal
    import sys

    out = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    def say(*parts):
        out.write(json.dumps(parts) + "\n")

    class CellTimeout(BaseException):
        pass

    def alarm(signum, frame):
        raise CellTimeout

    signal.signal(signal.SIGALRM, alarm)
    first = json.loads(sys.stdin.readline())
    timeout = int(first["timeout"])
    # Only `python -m autograde.judge --survey` (on the reference solutions) asks why a test failed:
    # while grading, the reasons are fixed words, never a string taken from a record.
    explain = first.get("explain") is True
    ns = {"__name__": "__main__", "__builtins__": builtins, "display": lambda *args, **kwargs: None}
    try:
        exec(compile(first["setup"], "<setup>", "exec"), ns)
        from utils import replay, transcript
    except BaseException as error:  # the instructor's cell: nothing can pass without it
        say("setup-failed", type(error).__name__)
        return
    setup = dict(ns)
    say("ready")

    class Unavailable:
        """A name the test reads whose value could not be recorded (the student made the exercise's
        function a callable object, say): any use of it leaves the test to a person."""

        def __init__(self, name):
            self.name = name

        def __getattr__(self, attribute):
            raise replay.Undecidable(self.name)

        def __call__(self, *args, **kwargs):
            raise replay.Undecidable(self.name)

        def __iter__(self):
            raise replay.Undecidable(self.name)

    def prepare(text):
        """The test's namespace and the replay of its calls, from the recorded text."""
        record = transcript.from_bytes(text)
        if type(record) is not dict or type(record.get("names")) is not dict or type(record.get("calls")) is not list:
            raise ValueError("not a record")
        namespace = dict(setup)
        calls = [call for call in record["calls"] if type(call) is dict]
        replayed = replay.Replay(calls)
        for name, item in record["names"].items():
            if type(name) is not str or type(item) is not tuple or not item:
                raise ValueError("not a record")
            if item[0] == "function":
                namespace[name] = replayed.stub(name)
            elif item[0] == "class" and len(item) == 4:
                namespace[name] = replayed.handles.stand_in_class(*item[1:])
            elif item[0] == "data" and len(item) == 2:
                try:
                    namespace[name] = transcript.decode(item[1])
                except ValueError:  # a value that can be compared but not rebuilt (a module)
                    namespace[name] = Unavailable(name)
            else:
                namespace[name] = Unavailable(name)
        transcript.set_global_state(record["state"])
        replayed.handles.namespace = namespace  # the test's own classes, by name
        transcript.HANDLES = replayed.handles  # the student's objects: stand-ins (utils/handles.py)
        replay.ACTIVE = replayed  # ranks a test launches replay their own calls (utils/distributed.py)
        return namespace, replayed

    def judge(cell):
        """(outcome, reason) for one test cell."""
        outcome, reason, error = decide(cell)
        if explain and error is not None:
            import traceback
            reason += " | " + "".join(traceback.format_exception(error)[-2:]).replace("\n", " ")
        return outcome, reason

    def decide(cell):
        signal.alarm(timeout)  # reading a (forged) record is bounded too
        try:
            namespace, replayed = prepare(cell["record"])
        except BaseException as error:
            signal.alarm(0)
            return "fail", "the judge: the record of the calls could not be read", error
        try:
            exec(compile(cell["visible"], f"<test {cell['id']}>", "exec"), namespace)
            if cell.get("hidden"):
                exec(compile(cell["hidden"], f"<test {cell['id']} hidden>", "exec"), namespace)
            if not replayed.finished():
                raise replay.Mismatch("calls left over")
        except BaseException as error:
            # A rank that could not replay (utils/distributed.py) reports its error by type name.
            if isinstance(error, replay.Undecidable) or getattr(error, "exception_type", None) == "Undecidable":
                return "undecided", "the judge could not replay this test: the student's code gave it a value that is not plain data", error
            if isinstance(error, replay.Mismatch) or getattr(error, "exception_type", None) == "Mismatch":
                return "fail", "the judge: the test's calls differ from the recorded run", error
            if isinstance(error, CellTimeout):
                return "fail", f"the judge: the replayed test ran longer than {timeout} s", error
            if isinstance(error, AssertionError):
                return "fail", "the judge: a check failed on the recorded values", error
            known = type(error).__name__ if type(error) in replay.ERRORS.values() else "an error"
            return "fail", f"the judge: the replayed test raised {known}", error
        finally:
            signal.alarm(0)
            transcript.HANDLES = replay.ACTIVE = None
        return "pass", "", None

    for line in sys.stdin:
        cell = json.loads(line)
        if cell.get("done"):
            break
        outcome, reason = judge(cell)
        say("test", cell["id"], outcome, reason)
    say("done")


_main()
