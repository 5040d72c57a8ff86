"""The recipes' options on the command line: ``hrperc recipes``, and ``hrperc encode --option key=value``.

A recipe declares its options once, in code: its builder hands :func:`hrperc.recipes._common.split_options`
the keyword parameters of its front end's constructor (:func:`~hrperc.recipes._common.options_of`) and the
encoder options it passes through to :class:`~hrperc.HighResEncoder`. :func:`describe_recipe` reads that
declaration instead of keeping a list here: it asks the recipe to build around no backbone and records the
arguments of those two calls as they happen (the recipe refuses the missing backbone right after; nothing
is built). The front end's constructor and ``HighResEncoder``'s give each option its type and default, a
value the recipe sets itself (``layer``, OneVision's ``max_tiles=9``, a module's released settings such as
``inf_llava.CROP``) overrides the constructor's, and a recipe whose front end has no fixed view size
(``FrontEnd.tile_size is None``: Qwen2-VL, Pixtral) is marked *native*: it runs on its model's own vision
tower, which ``--backbone NAME`` does not build.

``--option key=value`` values are parsed by the option's type (:func:`parse_value`): a bool as
``true``/``false`` (``1``/``0``, ``yes``/``no``), an int, a float, a string; ``none`` where the option takes
``None``; a tuple or list as JSON (``[[336, 672], [672, 336]]``) or a comma list (``1,2,3``). The recipe
then checks the values itself, with its own message. An unknown name is refused before anything is built,
listing the recipe's options.

Example::

    >>> info = describe_recipe("internvl")
    >>> [(o.name, o.default) for o in info.options if o.owner == "front end"]
    [('max_tiles', 12), ('min_tiles', 1), ('thumbnail', True), ('downsample', 2), ('dcm', False)]
    >>> info.option("layer").default, info.native
    (-1, False)
    >>> parse_options(info, ["max_tiles=6", "thumbnail=false", "layer=-2"])
    {'max_tiles': 6, 'thumbnail': False, 'layer': -2}
    >>> parse_options(info, ["tiles=6"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: --option tiles=6: recipe 'internvl' has no option 'tiles'; its options: max_tiles, ...
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RecipeOption", "RecipeInfo", "describe_recipe", "parse_value", "parse_options", "run_recipes"]

_EMPTY = inspect.Parameter.empty
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_NONE = ("none", "null")


@dataclass(frozen=True)
class RecipeOption:
    """One option of a recipe: ``name``; ``owner``: ``"front end"`` (its front end's constructor) or
    ``"encoder"`` (passed to :class:`~hrperc.HighResEncoder`); ``annotation``: the constructor's annotation
    as written (``""`` when there is none); ``default``: the recipe's value when it sets one, else the
    constructor's (``inspect.Parameter.empty``: none, the recipe computes it, e.g. from the backbone's tile)."""

    name: str
    owner: str
    annotation: str = ""
    default: Any = _EMPTY

    @property
    def kinds(self) -> tuple[str, ...]:
        """How a value is read, tried in order: ``"bool"``, ``"int"``, ``"float"``, ``"list"``, ``"str"``, or
        ``"any"`` (JSON, a comma list, else the string): from the annotation, else from the type of the default."""
        words = [w.strip() for w in self.annotation.replace("Optional[", "").split("|")]
        found = set()
        for w in words:
            base = w.split("[", 1)[0].strip()
            if base in ("bool", "int", "float", "str"):
                found.add(base)
            elif base in ("tuple", "list", "Sequence", "Tuple", "List"):
                found.add("list")
            elif base == "Literal":
                found.add("str")
            elif base and base != "None":
                found.add("any")  # a name the command line cannot read (an alias, a module): the recipe checks it
        if not found:
            d = self.default
            types = (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", (tuple, list)))
            # no annotation: read as the default's type first, else as anything (the recipe checks it)
            found = {next((kind for kind, t in types if isinstance(d, t)), "any"), "any"}
        return tuple(k for k in ("bool", "int", "float", "list", "str", "any") if k in found)

    @property
    def nullable(self) -> bool:
        """Whether ``None`` is a declared value (the annotation names it, or the default is ``None``)."""
        return "None" in self.annotation or "Optional" in self.annotation or self.default is None

    @property
    def takes_none(self) -> bool:
        """Whether ``none`` reads as ``None``: a nullable option, or one without an annotation (``dem``: a
        module, a path, ``"default"`` or ``None``; the recipe checks it)."""
        return self.nullable or not self.annotation

    def describe(self) -> str:
        """``name: type = default`` for the listing."""
        choices = re.match(r"Literal\[(.*)\]$", self.annotation)
        kinds = [k for k in self.kinds if k != "any"] or ["value"]
        kind = f"one of {choices.group(1)}" if choices else " or ".join(kinds)
        kind += " or none" if self.nullable else ""
        default = "(from the backbone)" if self.default is _EMPTY else _show(self.default)
        return f"{self.name}: {kind} = {default}"


def _show(value) -> str:
    """``value`` as it is written after ``--option key=``: none, true / false, 1,2 or JSON for nested lists."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        flat = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return ",".join(str(v) for v in value) if flat and value else json.dumps(value)
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class RecipeInfo:
    """What ``hrperc recipes`` prints about one recipe: ``name``, ``summary`` (the first line of its module's
    docs), ``front_end`` (the class whose constructor declares its options), ``options`` (front end's, then the
    encoder's), ``native`` (no fixed view size: runs on its model's own tower) and ``declared`` (False when the
    recipe did not declare its options through ``split_options``: then values are read as JSON or strings and
    only the recipe checks the names)."""

    name: str
    summary: str
    front_end: str
    options: tuple[RecipeOption, ...] = field(default_factory=tuple)
    native: bool = False
    declared: bool = True

    def option(self, name: str) -> RecipeOption:
        return next(o for o in self.options if o.name == name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)


class _Recorder:
    """A ``sys.setprofile`` hook recording the calls of ``options_of`` and ``split_options`` (their arguments
    as the recipe passes them) and what ``split_options`` returns (the recipe then fills in its own defaults,
    e.g. ``enc.setdefault("layer", -1)``, before it looks at the backbone)."""

    def __init__(self) -> None:
        from ..recipes import _common

        self.codes = {_common.options_of.__code__: "options_of", _common.split_options.__code__: "split_options"}
        self.front_end: type | None = None
        self.split: dict[str, Any] | None = None
        self.returned: tuple[dict, dict] | None = None

    def __call__(self, frame, event, arg) -> None:
        what = self.codes.get(frame.f_code)
        if what is None:
            return
        loc = frame.f_locals
        if event == "call" and what == "options_of" and self.front_end is None:
            self.front_end = loc["cls"]
        elif event == "call" and what == "split_options" and self.split is None:
            self.split = {"own": tuple(loc["own"]), "encoder": tuple(loc["encoder"]), "given": dict(loc["options"])}
        elif event == "return" and what == "split_options" and self.returned is None and isinstance(arg, tuple):
            self.returned = arg


@contextlib.contextmanager
def _profiled(hook):
    old = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(old)


def _signature_defaults(cls) -> dict[str, tuple[str, Any]]:
    """``name -> (annotation text, default)`` of the keyword parameters of ``cls``'s constructor; an alias of a
    ``Literal`` (``Fit``) is written out, so that its choices show."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that names what only type checkers import: keep the text
        hints = {}
    out = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        ann = p.annotation
        text = "" if ann is _EMPTY else ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        if text.isidentifier() and typing.get_origin(hints.get(p.name)) is typing.Literal:
            text = f"Literal{list(typing.get_args(hints[p.name]))}"
        out[p.name] = (text, p.default)
    return out


def _module_settings(module, names) -> dict[str, Any]:
    """A recipe module's released settings: its public dicts whose keys are all option names (``inf_llava``'s
    ``CROP`` and ``ENCODER``: the values it builds with over the constructors' defaults)."""
    out: dict[str, Any] = {}
    for key, value in vars(module).items():
        if key.isupper() and isinstance(value, dict) and value and all(k in names for k in value):
            out.update(value)
    return out


def _is_native(front_end: type | None) -> bool:
    """Whether ``front_end`` has no fixed view size (``tile_size is None`` once built with its defaults around
    a 224 px tile: it sizes each image's view itself); unknown (False) when it cannot be built that way."""
    if front_end is None:
        return False
    try:
        built = front_end((224, 224), (14, 14))
    except Exception:  # a front end that needs more (pinpoints, a DEM): a tiling one, or the recipe will say
        return False
    return getattr(built, "tile_size", (224, 224)) is None


def _summary(doc: str | None) -> str:
    """The first sentence of a recipe module's docs, after its ``name``: head, without reST markup."""
    paragraph = " ".join((doc or "").strip().split("\n\n", 1)[0].split())
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", paragraph.split(":", 1)[-1]).replace("``", "").strip()
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def describe_recipe(name: str, *, flag: str = "--recipe") -> RecipeInfo:
    """The options of recipe ``name`` as it declares them (see the module docs), with types and defaults.

    Raises ``ValueError`` naming ``flag`` and the known recipes for an unknown ``name``."""
    from .. import recipes
    from ..encoder import HighResEncoder

    if name not in recipes.list_recipes():
        raise ValueError(f"{flag} {name!r} is not a recipe; pass one of {', '.join(recipes.list_recipes())}.")
    builder = recipes._RECIPES[name]
    recorder = _Recorder()
    with _profiled(recorder), contextlib.suppress(Exception):  # the recipe refuses the missing backbone
        builder(None)
    module = sys.modules.get(builder.__module__)
    summary = _summary(module.__doc__ if module is not None else None)
    if recorder.split is None:
        return RecipeInfo(name, summary, "", native=_is_native(recorder.front_end), declared=False)
    split, cls = recorder.split, recorder.front_end
    front = _signature_defaults(cls) if cls is not None else {}
    encoder = _signature_defaults(HighResEncoder)
    names = set(split["own"]) | set(split["encoder"])
    own_values = {**(_module_settings(module, names) if module else {}), **split["given"]}
    if recorder.returned is not None:
        for values in recorder.returned:
            own_values.update(values)
    options = []
    for owner, listed, table in (("front end", split["own"], front), ("encoder", split["encoder"], encoder)):
        for key in listed:
            ann, default = table.get(key, ("", _EMPTY))
            options.append(RecipeOption(key, owner, ann, own_values.get(key, default)))
    return RecipeInfo(name, summary, cls.__name__ if cls else "", tuple(options), _is_native(cls))


def parse_value(option: RecipeOption, text: str, *, flag: str = "--option"):
    """``text`` as a value of ``option`` (see the module docs): each of its :attr:`~RecipeOption.kinds` is tried in
    turn; a value none of them reads is a ``ValueError`` naming the option, the value, the types and an example."""
    low = text.strip().lower()
    if low in _NONE and option.takes_none:
        return None
    kinds = option.kinds
    for kind in kinds:
        if kind == "bool" and (low in _TRUE or low in _FALSE):
            return low in _TRUE
        if kind in ("int", "float"):
            try:
                return int(text) if kind == "int" else float(text)
            except ValueError:
                continue
        if kind in ("list", "any"):
            value = _json_or_list(text)
            if kind == "any" or isinstance(value, tuple):
                return value
        if kind == "str":
            return text
    if kinds == ("bool",):
        fix = (
            f"pass true or false (or 1 / 0), e.g. {flag} {option.name}={'false' if option.default is True else 'true'}"
        )
    else:
        example = "" if option.default is _EMPTY else f", e.g. {flag} {option.name}={_show(option.default)}"
        forms = {"bool": "true / false", "int": "a whole number", "float": "a number", "list": "a JSON list or 1,2,3"}
        fix = f"pass {' or '.join(forms[k] for k in kinds if k in forms)}{' or none' * option.nullable}{example}"
    described = " or ".join(kinds) + " or none" * option.nullable
    raise ValueError(f"{flag} {option.name}={text!r}: {option.name} is {_article(described)} {described}; {fix}.")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _json_or_list(text: str):
    """JSON (lists as tuples), else a comma list of JSON values (``1,2,3``), else ``text`` itself."""
    try:
        return _tuples(json.loads(text))
    except ValueError:
        pass
    if "," in text:
        try:
            return tuple(json.loads(v) for v in text.split(",") if v.strip())
        except ValueError:
            pass
    return text


def _tuples(value):
    """JSON lists as tuples (the recipes' defaults are tuples), nested too."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def parse_options(info: RecipeInfo, pairs) -> dict[str, Any]:
    """``--option key=value`` strings as the recipe's options (see :func:`parse_value`); a malformed pair,
    a name given twice or a name the recipe does not have is a ``ValueError`` naming it."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, eq, text = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--option {pair!r} is not key=value; pass e.g. --option {_first(info)}.")
        if key in out:
            raise ValueError(f"--option {key} is given twice ({key}={out[key]!r} and {pair!r}); pass it once.")
        if not info.declared:
            out[key] = parse_value(RecipeOption(key, "front end"), text)
            continue
        if key not in info.names:
            raise ValueError(
                f"--option {pair}: recipe {info.name!r} has no option {key!r}; its options: "
                f"{', '.join(info.names)}. Pass one of them (hrperc recipes lists their types and defaults)."
            )
        out[key] = parse_value(info.option(key), text)
    return out


def _first(info: RecipeInfo) -> str:
    if not info.options:
        return "name=value"
    o = info.options[0]
    return f"{o.name}={'value' if o.default is _EMPTY else _show(o.default)}"


def run_recipes(args) -> int:
    """``hrperc recipes [NAME ...]``: each recipe, what it is, and its options with types and defaults."""
    from .. import recipes

    names = args.names or recipes.list_recipes()
    infos = [describe_recipe(name, flag="NAME") for name in names]  # an unknown name: before any output
    for info in infos:
        print(f"{info.name}: {info.summary}")
        if info.front_end:
            print(f"  front end  {info.front_end} (hrperc.recipes.{info.name}: its docs say what each option does)")
        if info.native:
            print(
                "  backbone   its model's own vision tower (native resolution), which hrperc encode does not build; "
                "in Python: create_encoder(name, tower) or encoder_from_model(model, processor)"
            )
        if not info.declared:
            print("  options    see its module docs (not declared to split_options; the recipe checks them)")
        width = max((len(o.name) for o in info.options), default=0)
        rows = [(o.owner, o.name, *o.describe().split(": ", 1)[1].split(" = ", 1)) for o in info.options]
        kind_width = max((len(r[2]) for r in rows), default=0)
        for owner, head in (("front end", "options"), ("encoder", "encoder")):
            for i, (_, name, kind, default) in enumerate(r for r in rows if r[0] == owner):
                print(f"  {head if i == 0 else '':<9}  {name:<{width}}  {kind:<{kind_width}}  {default}")
        if info.native:
            print("  note       defaults are the front end's; the recipe sets some from its tower (see its docs)")
        print()
    print("hrperc encode --recipe NAME --option key=value sets them (bools true/false; lists as JSON or 1,2,3).")
    return 0
