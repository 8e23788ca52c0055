"""Objects of the student's classes, across the verifier and the judge, by handle.

A test that builds ``LayerNorm(6)`` and calls it holds an object whose code is the student's. In
the verifier (``autograde/verify_harness.py``) such an object gets a number, a *handle*, the first
time it crosses a recorded call, and is written down by its data: its plain attributes, its
parameters and buffers by name (a parameter shared by two submodules once, as a reference), and its
submodules (torch's by class and data, the student's as handles again). Its class is swapped for a
subclass whose methods are recorded like the student's functions (``utils/replay.py``), so that the
test's ``model(x)`` is a recorded call whose first argument is the object's state.

In the judge (``autograde/judge_harness.py``), which runs no student code, the same record builds a
*stand-in*: an ``nn.Module`` (or plain object) of a class with the student's class name and methods,
holding the same parameters, buffers, submodules and attributes, whose methods answer from the
record. The test's own manipulations (``load_state_dict``, ``weight.copy_``, ``.double()``) act on
the stand-in, and each recorded call checks that the object it is given holds what the student's
object held at that call. ``Handles`` is the numbering both sides share; ``transcript.encode``
and ``transcript.decode`` use the active one (``transcript.HANDLES``).
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch
from torch import nn

from utils import transcript

# What nn.Module keeps in its __dict__ for its own machinery (hooks, registries, the tensors and
# submodules listed apart): not the student's data.
_MODULE_INTERNALS = transcript.MODULE_INTERNALS - {"training"}
# Besides public methods, the special methods a test may call on an object (recorded like methods).
_SPECIAL = ("__call__", "__len__", "__getitem__", "__contains__", "__bool__", "__iter__")
# Special methods that change how attributes are read or objects compared: the judge's stand-in
# could not behave alike, so an object whose class defines one is not recorded (left to a person).
_UNRECORDABLE = ("__getattr__", "__getattribute__", "__setattr__", "__delattr__", "__slots__", "__eq__",
                 "__hash__", "__get__", "__set__")


def describe(cls, own) -> tuple:
    """``(name, base, members)``: what the judge needs to build a stand-in class for the student's
    ``cls``. ``base`` is the first class of its hierarchy that is not the student's (``nn.Module``,
    ``object``, ``torch.optim.Optimizer``), as (module, qualified name); ``members`` what the
    student's classes define that a test may use: ``("method", name)``, ``("property", name)``,
    ``("static", name)`` (recorded calls) and ``("constant", name, value)``. ``Opaque`` for a class
    whose objects a stand-in cannot mimic (a ``__getattr__``, a class method, a base from elsewhere)."""
    members, taken = [], set()
    base = None
    for klass in cls.__mro__:
        if not own(klass):
            base = base or klass
            continue
        for key, value in vars(klass).items():
            if key in taken:
                continue
            taken.add(key)
            if key in _UNRECORDABLE:
                raise transcript.Opaque(f"{cls.__name__} (it defines {key})")
            if key.startswith("_") and key not in _SPECIAL:
                continue
            if isinstance(value, types.FunctionType):
                members.append(("method", key))
            elif isinstance(value, property) and isinstance(value.fget, types.FunctionType):
                members.append(("property", key))
            elif isinstance(value, staticmethod) and isinstance(value.__func__, types.FunctionType):
                members.append(("static", key))
            elif value is None or type(value) in (bool, int, float, str):
                members.append(("constant", key, ("value", value)))
            else:
                raise transcript.Opaque(f"{cls.__name__} (its {key})")
    if base is None or base.__module__.split(".")[0] not in ("torch", "utils", "builtins"):
        raise transcript.Opaque(f"{cls.__name__} (its base class)")
    return cls.__name__, (base.__module__, base.__qualname__), sorted(members)


class Handles:
    """The objects of the student's classes a test cell's recorded calls involved, numbered in the
    order they were first written down (the verifier and the judge meet them in the same order)."""

    def __init__(self):
        self.objects, self.numbers = [], {}
        # The arguments of the call whose results are being written down or rebuilt: an object
        # that keeps one of them (``LoRALinear(base)`` keeps ``base``) keeps a reference to it.
        self.arguments, self._paths = None, None
        # >0 while an object's parts are written down: only there is an argument a reference.
        self.inside = 0
        # Where each module inside the call's module arguments was when the call started (see
        # ``module_places``): a layer the call moved (wrapped in an adapter) is written down as
        # ``("was", path, name, parts)``, so that the judge moves its own layer, not a copy.
        self.places, self.root = None, None

    def argument_slot(self, item):
        """``("argument", path)`` when ``item`` is an argument of that call or held in one (a
        tensor in a list passed to it): ``path`` starts with ``"arg", index`` or ``"kw", name``
        and goes on through list indices and dict keys."""
        if self.arguments is None or not self.inside or not isinstance(item, (torch.Tensor, nn.Module, list, dict)):
            return None
        if self._paths is None:
            self._paths = argument_paths(*self.arguments)
        found = self._paths.get(id(item))
        return ("argument", list(found[1])) if found is not None and found[0] is item else None

    def argument(self, tree):
        """The judge's own argument (or the part of one) a recorded ``("argument", path)`` names."""
        if self.arguments is None or len(tree) != 2:
            raise ValueError("a recorded reference to no argument")
        return at(*self.arguments, tree[1])

    def owns(self, value) -> bool:
        raise NotImplementedError

    def describe(self, cls) -> tuple:
        raise NotImplementedError

    @staticmethod
    def test_class(cls) -> bool:
        """A class the test (or the set-up cell) defined, written down by its name and its parts: its
        own methods were compiled from a test cell (the harnesses name them ``<test ...>``)."""
        return cls.__module__ == "__main__" and any(
            isinstance(member, types.FunctionType) and member.__code__.co_filename.startswith(("<test", "<setup>"))
            for member in vars(cls).values())

    def moved(self, item, here: str):
        """``(argument path, name)`` where the module ``item`` was when the call started, if it was
        somewhere else than ``here`` (its name under the module being written down)."""
        if self.places is None:
            return None
        found = self.places.get(id(item))
        if found is None or found[0] is not item or (self.root is not None and found[1] == (self.root, here)):
            return None
        return found[1]

    def number(self, value) -> int:
        if id(value) not in self.numbers:
            self.numbers[id(value)] = len(self.objects)
            self.objects.append(value)
        return self.numbers[id(value)]

    def encode(self, value, brief: bool, versions, seen: dict | None = None, path: str = ""):
        """``("handle", number, class name, base, members, attributes, parameters, buffers,
        submodules)`` (see ``describe`` and ``_parts``)."""
        known = len(self.objects)
        number = self.number(value)
        with self._writing(value, known):
            return ("handle", number, *self.describe(type(value)),
                    *_parts(self, value, brief, versions, {} if seen is None else seen, path))

    def encode_module(self, value, brief: bool, versions):
        """``("torchmodule", module, qualname, attributes, parameters, buffers, submodules)``: a
        module of torch's, the course's or the test's, by its parts (a tied weight once, then as
        ``("same", path)``), so that the judge can write back a submodule or weight the call
        replaced; ``Opaque`` when a part cannot cross (a submodule of another library's)."""
        if not (transcript._trusted(type(value)) or self.test_class(type(value))):
            raise transcript.Opaque(type(value).__name__)
        with self._writing(value, len(self.objects)):
            parts = ("torchmodule", type(value).__module__, type(value).__qualname__,
                     *_parts(self, value, brief, versions, {}, ""))
            place = self.moved(value, "")  # a layer of an argument handed to a callback, say
            return parts if place is None else ("was", place[0], place[1], parts)

    @contextlib.contextmanager
    def _writing(self, value, known: int):
        """Around writing down ``value``'s parts. At the top, it notes which argument ``value`` is
        (``moved`` compares a layer's place with where it is now); if a part cannot cross, the
        numbers taken since ``known`` are given back, so that both sides keep numbering alike."""
        saved = self.root
        if not self.inside:
            self.root = None
            if self.places is not None and self.arguments is not None:
                if self._paths is None:
                    self._paths = argument_paths(*self.arguments)
                found = self._paths.get(id(value))
                self.root = found[1] if found is not None and found[0] is value else None
        self.inside += 1
        try:
            yield
        except transcript.Opaque:
            for dropped in self.objects[known:]:
                del self.numbers[id(dropped)]
            del self.objects[known:]
            raise
        finally:
            self.inside -= 1
            self.root = saved


def argument_paths(args, kwargs) -> dict:
    """``{id(value): (value, path)}`` for the tensors, modules, lists and dicts in a call's arguments
    (``path`` as ``at`` reads it), the first path found for each."""
    paths = {}
    pending = [(value, ["arg", i]) for i, value in enumerate(args)] + \
        [(value, ["kw", key]) for key, value in kwargs.items()]
    while pending and len(paths) < 10000:
        value, path = pending.pop(0)
        if id(value) in paths or not isinstance(value, (torch.Tensor, nn.Module, list, tuple, dict)):
            continue
        paths[id(value)] = (value, path)
        if isinstance(value, (list, tuple)):  # an iterator read into a list too
            pending += [(x, path + [i]) for i, x in enumerate(value)]
        elif type(value) is dict:
            pending += [(x, path + [k]) for k, x in value.items() if type(k) in (str, int)]
    return paths


def module_places(args, kwargs) -> dict:
    """``{id(module): (module, (argument path, name))}`` for every module inside a call's module
    arguments (an argument itself named ``""``), the first place found for each."""
    places = {}
    for value, path in argument_paths(args, kwargs).values():
        if isinstance(value, nn.Module):
            for name, module in value.named_modules():
                places.setdefault(id(module), (module, (path, name)))
    return places


def at(args, kwargs, path):
    """The argument (or the part of one) that ``path`` names in a call's ``args`` and ``kwargs``:
    ``["arg", index, ...]`` or ``["kw", name, ...]``, then list indices and dict keys. A path comes
    from a record (untrusted): ``ValueError`` when it names nothing."""
    if type(path) not in (list, tuple) or len(path) < 2:
        raise ValueError("a recorded reference to no argument")
    kind, key, *rest = path
    if kind == "arg" and type(key) is int and 0 <= key < len(args):
        value = args[key]
    elif kind == "kw" and type(key) is str and key in kwargs:
        value = kwargs[key]
    else:
        raise ValueError("a recorded reference to no argument")
    for step in rest:
        if isinstance(value, (list, tuple)) and type(step) is int and 0 <= step < len(value):
            value = value[step]
        elif type(value) is dict and type(step) in (str, int) and step in value:
            value = value[step]
        else:
            raise ValueError("a recorded reference to no argument")
    return value


class given:
    """``handles.arguments`` set to a call's arguments (and ``handles.places`` to where the modules
    in them were when it started: ``module_places``) for the duration of a ``with`` block."""

    def __init__(self, handles, args, kwargs, places=None):
        self.handles, self.arguments, self.places = handles, (list(args), dict(kwargs)), places

    def __enter__(self):
        if self.handles is not None:
            self.saved = self.handles.arguments, self.handles._paths, self.handles.places
            self.handles.arguments, self.handles._paths, self.handles.places = self.arguments, None, self.places

    def __exit__(self, *exc):
        if self.handles is not None:
            self.handles.arguments, self.handles._paths, self.handles.places = self.saved


def _parts(handles, value, brief, versions, seen, path):
    """(attributes, parameters, buffers, submodules) of an object or module, as encoded lists of
    (name, tree); ``seen`` maps a tensor already written (a tied weight) to its path."""
    prefix = f"{path}." if path else ""

    def tensor(item, key):
        slot = handles.argument_slot(item)
        if slot is not None:
            return slot
        if id(item) in seen:
            return ("same", seen[id(item)])
        seen[id(item)] = prefix + key
        return transcript.encode(item, brief, versions)

    module = isinstance(value, nn.Module)
    attributes = []
    if not isinstance(getattr(value, "__dict__", None), dict):
        raise transcript.Opaque(type(value).__name__)
    for key, item in vars(value).items():
        if module and key in _MODULE_INTERNALS:
            continue
        try:
            attributes.append((key, tensor(item, key) if isinstance(item, torch.Tensor)
                               else transcript.encode(item, brief, versions)))
        except transcript.Opaque:
            pass  # skipped on both sides alike: a function, a generator
    if not module:
        return attributes, [], [], []
    parameters = [(key, ("value", None) if item is None else tensor(item, key))
                  for key, item in value._parameters.items()]
    buffers = [(key, ("value", None) if item is None else tensor(item, key)) for key, item in value._buffers.items()]
    submodules = []
    for key, item in value._modules.items():
        if item is None:
            submodules.append((key, ("value", None)))
        elif handles.argument_slot(item) is not None:
            submodules.append((key, handles.argument_slot(item)))
        elif handles.owns(item):
            submodules.append((key, handles.encode(item, brief, versions, seen, prefix + key)))
        elif transcript._trusted(type(item)) or handles.test_class(type(item)):
            parts = ("torchmodule", type(item).__module__, type(item).__qualname__,
                     *_parts(handles, item, brief, versions, seen, prefix + key))
            place = handles.moved(item, prefix + key)
            submodules.append((key, parts if place is None else ("was", place[0], place[1], parts)))
        else:
            raise transcript.Opaque(type(item).__name__)
    return attributes, parameters, buffers, submodules


# ---------------------------------------------------------------------------
# The verifier's side: the student's objects, their classes swapped for recording subclasses
# ---------------------------------------------------------------------------

class Recorded(Handles):
    """In the verifier: numbers the student's objects, and makes the test's calls of their methods
    recorded calls (``recorder.wrap``)."""

    def __init__(self, recorder, is_student_class):
        super().__init__()
        self.recorder, self.own, self.classes = recorder, is_student_class, {}

    def owns(self, value) -> bool:
        return not isinstance(value, type) and self.own(type(value))

    def describe(self, cls) -> tuple:
        if cls in self.classes.values():
            cls = cls.__mro__[1]  # the student's class under the recording subclass
        return describe(cls, self.own_code)

    def own_code(self, cls) -> bool:
        """A class whose own code is the student's (not the recording subclass)."""
        return cls not in self.classes.values() and self.own(cls)

    def recording_class(self, cls):
        """A subclass of the student's ``cls`` (same name and module) whose construction and
        methods, called by the test, are recorded calls: what the test's namespace binds. The
        class itself (its objects then unrecordable) when no such subclass can be made."""
        if cls in self.classes.values():
            return cls
        if cls not in self.classes:
            try:
                self.classes[cls] = self._subclass(cls)
            except BaseException:  # an unusual class (a metaclass that refuses): left to a person
                return cls
        return self.classes[cls]

    def _subclass(self, cls):
        name, _, members = self.describe(cls)
        wrap = self.recorder.wrap
        construct = wrap(lambda *a, **k: type(cls).__call__(recording, *a, **k), name)
        meta = type(f"Recorded{type(cls).__name__}", (type(cls),), {"__call__": lambda _, *a, **k: construct(*a, **k)})
        body = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
        for kind, key, *_ in members:  # constants are inherited as they are
            if kind == "static":
                body[key] = staticmethod(wrap(getattr(cls, key), f"{name}.{key}"))
            elif kind == "method":
                body[key] = _recorded_method(wrap(getattr(cls, key), f"{name}.{key}"))
            elif kind == "property":
                body[key] = property(_recorded_method(wrap(_in_mro(cls, key).fget, f"{name}.{key}")))
        recording = meta(name, (cls,), body)
        return recording

    def number(self, value) -> int:
        if type(value) not in self.classes.values():
            recording = self.recording_class(type(value))
            try:  # the test's later calls of its methods are recorded
                if recording is type(value):
                    raise TypeError
                value.__class__ = recording
            except (TypeError, AttributeError):
                raise transcript.Opaque(type(value).__name__) from None
        return super().number(value)


def _in_mro(cls, key):
    """What the class of ``cls``'s hierarchy that defines ``key`` holds (a property, not its value)."""
    for klass in cls.__mro__:
        if key in vars(klass):
            return vars(klass)[key]
    raise AttributeError(key)


def _recorded_method(recorded):
    def method(self, *args, **kwargs):
        return recorded(self, *args, **kwargs)
    method.__name__ = recorded.__name__
    return method


# ---------------------------------------------------------------------------
# The judge's side: stand-ins built from the record, whose methods answer from it
# ---------------------------------------------------------------------------

class StandIns(Handles):
    """In the judge: builds, numbers and encodes the stand-ins for the student's objects; their
    methods are ``replay.stub``s of ``Class.method``."""

    def __init__(self, replay):
        super().__init__()
        self.replay, self.classes = replay, {}
        self.namespace: dict = {}  # the test's namespace, where its own classes are found by name

    def owns(self, value) -> bool:
        return getattr(type(value), "_stand_in_of", None) is not None and not isinstance(value, type)

    def place(self, tree):
        """The judge's module that was at a recorded ``("was", path, name, parts)`` place when the
        call started."""
        if self.places is None or len(tree) != 4 or type(tree[1]) not in (list, tuple) or type(tree[2]) is not str:
            raise ValueError("a recorded place of no module")
        for module, place in self.places.values():
            if list(place[0]) == list(tree[1]) and place[1] == tree[2]:
                return module
        raise ValueError("a recorded place of no module")

    def _class(self, module: str, qualname: str):
        """A class of torch's or the course's, or one the test defined (looked up in its namespace)."""
        if module == "__main__" and type(qualname) is str:
            found = self.namespace.get(qualname)
            if isinstance(found, type) and self.test_class(found) and found.__qualname__ == qualname:
                return found
            raise ValueError("not a recorded class")
        return _trusted_class(module, qualname)

    def describe(self, cls) -> tuple:
        return cls._stand_in_of

    def stand_in_class(self, name, base, members):
        """The class of the stand-ins for the student's class ``name`` (a ``describe`` record):
        calling it replays the recorded construction; its methods, properties and static methods
        replay the recorded calls; its constants are the recorded ones."""
        if type(name) is not str or not name.isidentifier() or type(base) is not tuple or len(base) != 2 \
                or type(members) is not list:
            raise ValueError("not a recorded class")
        key = repr((name, base, members))
        if key not in self.classes:
            parent = _trusted_class(*base)
            replay = self.replay
            meta = type("StandInClass", (type(parent),), {"__call__": lambda _, *a, **k: replay.stub(name)(*a, **k)})
            body = {"__module__": "__main__", "__qualname__": name, "_stand_in_of": (name, base, members)}
            for member in members:
                if type(member) is not tuple or len(member) < 2 or type(member[1]) is not str \
                        or not member[1].isidentifier() or (member[1].startswith("_") and member[1] not in _SPECIAL):
                    # Never __getattribute__, __eq__ and the like, through which the judge's own
                    # reading of the stand-in would answer from the record.
                    raise ValueError("not a recorded class")
                kind, attribute = member[:2]
                stub = _replayed_method(replay, f"{name}.{attribute}")
                if kind == "method" and len(member) == 2:
                    body[attribute] = stub
                elif kind == "property" and len(member) == 2:
                    body[attribute] = property(stub)
                elif kind == "static" and len(member) == 2:
                    body[attribute] = staticmethod(replay.stub(f"{name}.{attribute}"))
                elif kind == "constant" and len(member) == 3 and type(member[2]) is tuple \
                        and member[2][:1] == ("value",) and len(member[2]) == 2 \
                        and (member[2][1] is None or type(member[2][1]) in (bool, int, float, str)):
                    body[attribute] = member[2][1]
                else:
                    raise ValueError("not a recorded class")
            self.classes[key] = meta(name, (parent,), body)
        return self.classes[key]

    def decode(self, tree, seen: dict | None = None):
        """The object a ``("handle", ...)`` tree names: the stand-in already built for its number,
        or a new one (the next number) filled from the tree."""
        if len(tree) != 9 or type(tree[1]) is not int:
            raise ValueError("not a recorded object")
        _, number, name, base, members, *parts = tree
        if 0 <= number < len(self.objects):
            return self.objects[number]
        if number != len(self.objects):
            raise ValueError("a recorded object out of order")
        cls = self.stand_in_class(name, base, members)
        value = object.__new__(cls)
        if isinstance(value, nn.Module):
            nn.Module.__init__(value)
        self.number(value)
        self.fill(value, *parts, {} if seen is None else seen, "")
        return value

    def fill(self, value, attributes, parameters, buffers, submodules, seen, path):
        prefix = f"{path}." if path else ""

        def tensor(tree, key):
            if type(tree) is tuple and tree[:1] == ("argument",):
                return self.argument(tree)
            if type(tree) is tuple and tree[:1] == ("same",):
                if len(tree) != 2 or tree[1] not in seen:
                    raise ValueError("a recorded reference to no tensor")
                return seen[tree[1]]
            item = transcript.decode(tree)
            if isinstance(item, torch.Tensor):
                seen[prefix + key] = item
            return item

        for key, tree in _pairs(attributes):
            value.__dict__[key] = tensor(tree, key)
        if not isinstance(value, nn.Module):
            if parameters or buffers or submodules:
                raise ValueError("a recorded object with parameters")
            return
        for key, tree in _pairs(parameters):
            if type(tree) is tuple and tree[:1] in (("same",), ("argument",)):
                value._parameters[key] = tensor(tree, key)
                continue
            item = transcript.decode(tree)
            if item is not None and type(item) is not torch.Tensor:
                raise ValueError("a recorded parameter that is not a tensor")
            if item is not None:
                grad = item.grad
                item = nn.Parameter(item.detach(), requires_grad=item.requires_grad)
                item.grad = grad
                seen[prefix + key] = item
            value._parameters[key] = item
        for key, tree in _pairs(buffers):
            item = tensor(tree, key)
            if item is not None and type(item) is not torch.Tensor:
                raise ValueError("a recorded buffer that is not a tensor")
            value._buffers[key] = item
        for key, tree in _pairs(submodules):
            value._modules[key] = self.submodule(tree, seen, prefix + key)

    def submodule(self, tree, seen, path):
        tag = tree[0] if type(tree) is tuple and tree else None
        if tag == "value" and tree == ("value", None):
            return None
        if tag == "handle":
            return self.decode(tree, seen)
        if tag == "argument":
            return self.argument(tree)
        if tag == "was" and len(tree) == 4:
            module = self.place(tree)  # the judge's own layer, moved as the student's was
            from utils.write_back import write_back_module
            write_back_module(module, tree[3])
            return module
        if tag == "torchmodule" and len(tree) == 7 and type(tree[1]) is str and type(tree[2]) is str \
                and tree[1].split(".")[0] in ("torch", "utils", "__main__"):
            cls = self._class(tree[1], tree[2])
            if issubclass(cls, nn.Module):
                module = cls.__new__(cls)
                nn.Module.__init__(module)
                self.fill(module, *tree[3:], seen, path)
                return module
        raise ValueError("not a recorded submodule")


def _trusted_class(module: str, qualname: str):
    """A class of torch's or the course's (or ``object``), by its recorded name."""
    if type(module) is not str or type(qualname) is not str or module.split(".")[0] not in ("torch", "utils", "builtins"):
        raise ValueError("not a recorded class")
    found = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, type):
        raise ValueError("not a recorded class")
    return found


def _pairs(items):
    if type(items) is not list or any(type(p) is not tuple or len(p) != 2 or type(p[0]) is not str for p in items):
        raise ValueError("not a recorded object")
    return items


def _replayed_method(replay, name):
    def method(self, *args, **kwargs):
        return replay.stub(name)(self, *args, **kwargs)
    method.__name__ = name.rsplit(".", 1)[-1]
    return method
