"""What a student's call did in place, done to the judge's objects (``utils/replay.py``'s stubs).

The verifier records each argument of a call as it was after the call (``utils/transcript.py``);
the judge's stub hands the test back the recorded result (``result``) and makes its own arguments
what the student's were (``write_back``): tensors changed in place, a module's weights, layers and
modes, an optimizer's state, a generator, a list or dict that grew or shrank, a file a path names,
an object of the student's class (by handle, ``utils/handles.py``). Anything that does not fit what
the judge holds is a ``Mismatch``.
"""

from __future__ import annotations

import pathlib

import torch

from utils import handles as _handles, transcript
from utils.transcript import Iterated, Mismatch, Opaque, decode, encode, module_tensors, same


def result(tree, args, kwargs):
    """The recorded result: the judge's own argument where the student returned an argument."""
    if type(tree) is tuple and tree[:1] == ("argument",):
        try:
            if len(tree) == 2:
                return _handles.at(args, kwargs, tree[1])
        except ValueError:
            pass
        raise Mismatch("the recorded result names an argument the test did not pass")
    return decode(tree)


def write_back(given, tree) -> None:
    """What the student's function did in place to the tensors (and modules' weights) it was
    given, done to the judge's: ``tree`` is the recorded encoding of ``given`` after the call."""
    tag = tree[0] if type(tree) is tuple and tree else None
    if tag == "unchanged":
        return
    if tag == "handle":
        if not _same_handle(given, tree):
            raise Mismatch("an object of the student's class was not recorded as itself")
        _write_back_parts(given, *tree[5:])
    elif tag == "torchmodule" and isinstance(given, torch.nn.Module):
        write_back_module(given, tree)
    elif isinstance(given, torch.nn.Module):
        modules = list(given.modules())
        if tag != "module" or len(tree) != 6 or type(tree[4]) is not list or len(tree[4]) != len(modules) \
                or any(type(flag) is not bool for flag in tree[4]):
            raise Mismatch("a module argument was not recorded as one")
        write_back(module_tensors(given), tree[3])
        for module, training in zip(modules, tree[4]):
            module.training = training  # put in eval mode (or back in training mode) by the call
        _write_back_attributes(given, tree[5])
    elif tag == "stateful" and len(tree) == 4 and callable(getattr(given, "load_state_dict", None)):
        given.load_state_dict(decode(tree[3]))
    elif tag == "object" and len(tree) == 4 and isinstance(getattr(given, "__dict__", None), dict):
        _write_back_attributes(given, tree[3])
    elif isinstance(given, torch.Generator):
        if tag != "generator" or len(tree) != 2 or type(tree[1]) is not torch.Tensor:
            raise Mismatch("a generator argument was not recorded as one")
        given.set_state(tree[1])
    elif isinstance(given, torch.Tensor):
        if tag != "tensor" or len(tree) != 4:
            raise Mismatch("an argument changed type in place")
        after, grad = tree[1], tree[3]
        if type(after) is not torch.Tensor or after.shape != given.shape or after.dtype != given.dtype:
            raise Mismatch("an argument changed shape or type in place")
        if not torch.equal(after, given.detach()):
            with torch.no_grad():
                given.copy_(after)
        if given.is_leaf and type(tree[2]) is bool and tree[2] != given.requires_grad and \
                (given.is_floating_point() or given.is_complex()):
            given.requires_grad_(tree[2])  # a weight frozen (or unfrozen) by the call
        if given.is_leaf and given.requires_grad:
            if grad is None:
                given.grad = None
            elif type(grad) is torch.Tensor and grad.shape == given.shape and \
                    (given.grad is None or not torch.equal(grad, given.grad)):
                given.grad = grad.clone()
    elif isinstance(given, pathlib.PurePath):
        if tag != "path" or len(tree) != 3 or tree[1] != given.name or not (tree[2] is None or type(tree[2]) is bytes):
            raise Mismatch("a path argument was not recorded as one")
        _write_back_file(pathlib.Path(given), tree[2])
    elif type(given) is Iterated and tag == "iterated" and type(tree[1]) is list and len(given) == len(tree[1]):
        for item, item_tree in zip(given, tree[1]):
            write_back(item, item_tree)
    elif isinstance(given, (list, tuple)) and tag in ("list", "tuple") and len(given) == len(tree[1]):
        for index, (item, item_tree) in enumerate(zip(given, tree[1])):
            if _replaceable(item, item_tree):
                if same(_encode_or_none(item), item_tree):
                    continue
                if not isinstance(given, list):
                    raise Mismatch("an item of a tuple changed")
                given[index] = decode(item_tree)  # an item replaced (or a number changed) in a list
            else:
                write_back(item, item_tree)
    elif isinstance(given, list) and tag == "list":  # items appended or removed in place
        given[:] = [given[i] if type(t) is tuple and t[:1] == ("unchanged",) and i < len(given) else decode(t)
                    for i, t in enumerate(tree[1])]
    elif isinstance(given, dict) and tag in ("dict", "odict", "defaultdict"):
        kept = set()
        for key_tree, value_tree in tree[-1]:
            key = decode(key_tree)
            kept.add(key)
            if key in given and not _replaceable(given[key], value_tree):
                write_back(given[key], value_tree)
            else:
                given[key] = decode(value_tree)
        for key in [key for key in given if key not in kept]:  # entries the call removed
            del given[key]


def _write_back_attributes(given, pairs) -> None:
    """What a call did to the plain attributes of an object of the course's or the test's (a module's
    log of its calls, a tokenizer's vocabulary), done to the judge's."""
    if type(pairs) is not list:
        raise Mismatch("an argument was recorded malformed")
    for pair in pairs:
        if type(pair) is not tuple or len(pair) != 2 or type(pair[0]) is not str:
            raise Mismatch("an argument was recorded malformed")
        key, item_tree = pair
        if key in vars(given) and not _replaceable(vars(given)[key], item_tree):
            write_back(vars(given)[key], item_tree)
        elif not same(_encode_or_none(vars(given).get(key)), item_tree):
            given.__dict__[key] = decode(item_tree)


def _write_back_file(path, content) -> None:
    """What the call left in the file the test named (a checkpoint it saved), left in the judge's.
    The judge's test reads it as it would the student's (``torch.load(weights_only=True)``)."""
    current = path.read_bytes() if path.is_file() else None
    if content == current:
        return
    if content is None:
        if path.is_file():
            path.unlink()  # the call removed the file
        return
    if path.exists() and not path.is_file():
        raise Mismatch("a file recorded where the judge has a folder")
    path.write_bytes(content)


def _same_handle(given, tree) -> bool:
    """Whether ``tree`` records the student's object the judge's stand-in ``given`` stands for."""
    handles = transcript.HANDLES
    return type(tree) is tuple and len(tree) == 9 and tree[0] == "handle" and handles is not None \
        and handles.owns(given) and handles.number(given) == tree[1]


def _write_back_parts(given, attributes, parameters, buffers, submodules, root=None, path="", prune=True) -> None:
    """What a call did to an object of the student's class (its attributes, parameters, buffers and
    submodules, recorded by ``utils/handles.py``), done to the judge's stand-in (or to a module of
    torch's, the course's or the test's, or one inside them). ``root`` is the object the record
    starts from (a tied weight is recorded as ``("same", its path from there)``) and ``path`` the
    way from it to ``given``; ``prune``: attributes the record lacks are removed (a student's object
    whose state stopped being data), not on a module of the test's (an attribute that cannot cross)."""
    _pairs = _handles._pairs
    root = given if root is None else root
    prefix = f"{path}." if path else ""
    recorded = {key for key, _ in _pairs(attributes)}
    for key in [key for key in vars(given) if prune and key not in recorded and not (
            isinstance(given, torch.nn.Module) and key in _handles._MODULE_INTERNALS)]:
        del given.__dict__[key]  # no longer data on the student's side (an optimizer's state by tensor)
    for key, tree in _pairs(attributes):
        if type(tree) is tuple and tree[:1] == ("same",):
            given.__dict__[key] = _at_path(root, tree)  # shared with a tensor written back before
            continue
        if type(tree) is tuple and tree[:1] == ("argument",):
            given.__dict__[key] = transcript.HANDLES.argument(tree)
            continue
        current = vars(given).get(key)
        if key in vars(given) and not _replaceable(current, tree):
            write_back(current, tree)
        elif not same(_encode_or_none(current), tree):
            given.__dict__[key] = decode(tree)
    if not isinstance(given, torch.nn.Module):
        return
    for table, kind in ((given._parameters, "parameter"), (given._buffers, "buffer")):
        for key, tree in _pairs(parameters if kind == "parameter" else buffers):
            if type(tree) is tuple and tree[:1] == ("same",):
                table[key] = _at_path(root, tree)  # a tied weight, tied again (to a new tensor if need be)
                continue
            if type(tree) is tuple and tree[:1] == ("argument",):
                table[key] = transcript.HANDLES.argument(tree)
                continue
            current = table.get(key)
            if current is not None and not _replaceable(current, tree):
                write_back(current, tree)
                continue
            value = decode(tree)
            if value is not None and type(value) is not torch.Tensor:
                raise Mismatch(f"a {kind} recorded as something else than a tensor")
            if value is not None and kind == "parameter":
                grad, value = value.grad, torch.nn.Parameter(value.detach(), requires_grad=value.requires_grad)
                value.grad = grad
            table[key] = value
    for key, tree in _pairs(submodules):
        current = given._modules.get(key)
        tag = tree[0] if type(tree) is tuple and tree else None
        if tag == "handle" and current is not None and _same_handle(current, tree):
            _write_back_parts(current, *tree[5:], root=root, path=prefix + key)
        elif tag == "torchmodule" and len(tree) == 7 and current is not None \
                and (type(current).__module__, type(current).__qualname__) == tree[1:3]:
            _write_back_parts(current, *tree[3:], root=root, path=prefix + key, prune=prune)
        elif tag == "argument" and current is transcript.HANDLES.argument(tree):
            pass
        elif tag == "was" and len(tree) == 4 and type(tree[3]) is tuple and len(tree[3]) == 7:
            try:
                target = transcript.HANDLES.place(tree)  # the judge's own layer, moved here
            except ValueError:
                raise Mismatch("a recorded layer that was nowhere") from None
            given._modules[key] = target
            _write_back_module(target, tree[3], root, prefix + key, prune)
        else:
            try:
                given._modules[key] = transcript.HANDLES.submodule(tree, _Tied(root), prefix + key)
            except (ValueError, AttributeError):
                raise Mismatch("a submodule recorded malformed") from None


def write_back_module(module, tree) -> None:
    """What a call did to a module of torch's, the course's or the test's, recorded by its parts
    (``("torchmodule", ...)``), done to the judge's."""
    _write_back_module(module, tree, None, "", False)


def _write_back_module(module, tree, root, path, prune) -> None:
    if type(tree) is not tuple or len(tree) != 7 or tree[0] != "torchmodule" \
            or (type(module).__module__, type(module).__qualname__) != tree[1:3]:
        raise Mismatch("a module was not recorded as one")
    _write_back_parts(module, *tree[3:], root=root, path=path, prune=prune)


def _at_path(root, tree):
    """The judge's tensor a recorded ``("same", "a.b.weight")`` names: through ``root``'s submodules
    to a parameter, buffer or attribute."""
    if type(tree) is not tuple or len(tree) != 2 or type(tree[1]) is not str:
        raise Mismatch("a recorded reference to no tensor")
    *modules, name = tree[1].split(".")
    owner = root
    for part in modules:
        owner = getattr(owner, "_modules", {}).get(part)
        if owner is None:
            raise Mismatch("a recorded reference to no tensor")
    for table in (getattr(owner, "_parameters", {}), getattr(owner, "_buffers", {}), vars(owner)):
        if isinstance(table.get(name), torch.Tensor):
            return table[name]
    raise Mismatch("a recorded reference to no tensor")


class _Tied(dict):
    """The tensors a new submodule may share, by path from ``root`` (``StandIns.fill``'s ``seen``):
    the judge's own, already written back."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __contains__(self, path):
        try:
            self[path]
        except Mismatch:
            return False
        return True

    def __missing__(self, path):
        return _at_path(self.root, ("same", path))


def _replaceable(item, tree) -> bool:
    """Whether the recorded ``tree`` is not ``item`` changed in place but another value put in its
    place (a number in a list, a tensor of another shape in a dict)."""
    tag = tree[0] if type(tree) is tuple and tree else None
    if tag in ("unchanged", "callback"):
        return False
    if tag == "path" and isinstance(item, pathlib.PurePath):
        return False  # the file it names was written back
    if tag == "handle":
        return not _same_handle(item, tree)
    if tag == "argument":
        return True  # the judge's own argument, put in its place
    if isinstance(item, torch.Tensor):
        return tag != "tensor" or type(tree[1]) is not torch.Tensor or tree[1].shape != item.shape \
            or tree[1].dtype != item.dtype
    if isinstance(item, dict) and tag not in ("dict", "odict", "defaultdict"):
        return True
    if isinstance(item, (list, dict, torch.nn.Module, torch.Generator)) or tag in ("stateful", "object", "module",
                                                                                  "torchmodule"):
        return False
    if isinstance(item, tuple) and tag in ("list", "tuple") and len(tree[1]) == len(item):
        return False  # its items were written back (a tuple of tensors changed in place)
    return True  # immutable: only replaced


def _encode_or_none(value):
    try:
        return encode(value)
    except Opaque:
        return None
