"""The recipes' options on the command line: ``hrperc recipes``, and ``hrperc encode --option key=value``.

A recipe declares its options once, in code, when it registers (:func:`hrperc.recipes.register_recipe`: its
front end's class, the options it sets itself, its own defaults); its builder splits what it is given by that
declaration, and :func:`describe_recipe` reads it through :func:`hrperc.recipes.recipe_options` instead of
keeping a list here. The front end's constructor and ``HighResEncoder``'s give each option its type and
default, a value the recipe declares (``layer``, OneVision's ``max_tiles=9``, Qwen3-VL's budget,
``inf_llava``'s released settings) overrides the constructor's, and a recipe whose front end has no fixed view
size (``FrontEnd.tile_size is None``: Qwen2-VL, Pixtral) is marked *native*: it runs on its model's own vision
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

import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from ..recipes._common import EMPTY, OptionSpec

__all__ = ["RecipeOption", "RecipeInfo", "describe_recipe", "parse_value", "parse_options", "run_recipes"]

_EMPTY = EMPTY
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_NONE = ("none", "null")


@dataclass(frozen=True)
class RecipeOption(OptionSpec):
    """One option of a recipe (:class:`hrperc.recipes.OptionSpec`: ``name``, ``owner``, ``annotation``,
    ``default``, ``note``) as the command line reads and shows it."""

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
        if self.default is _EMPTY:
            default = f"({self.note or 'from the backbone'})"
        else:
            default = _show(self.default) + (f" = {self.note}" if self.note else "")
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
    recipe was registered without ``front_end=``: then values are read as JSON or strings and only the recipe
    checks the names)."""

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
    """The options of recipe ``name`` as it declares them (:func:`hrperc.recipes.recipe_options`), with types
    and defaults.

    Raises ``ValueError`` naming ``flag`` and the known recipes for an unknown ``name``."""
    from .. import recipes

    if name not in recipes.list_recipes():
        raise ValueError(f"{flag} {name!r} is not a recipe; pass one of {', '.join(recipes.list_recipes())}.")
    spec = recipes.recipe_spec(name)
    module = sys.modules.get(spec.builder.__module__)
    summary = _summary(module.__doc__ if module is not None else None)
    if spec.front_end is None:
        return RecipeInfo(name, summary, "", declared=False)
    options = tuple(
        RecipeOption(o.name, o.owner, o.annotation, o.default, o.note) for o in recipes.recipe_options(name).values()
    )
    return RecipeInfo(name, summary, spec.front_end.__name__, options, _is_native(spec.front_end))


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
            print("  options    see its module docs (not declared to register_recipe; the recipe checks them)")
        width = max((len(o.name) for o in info.options), default=0)
        rows = [(o.owner, o.name, *o.describe().split(": ", 1)[1].split(" = ", 1)) for o in info.options]
        kind_width = max((len(r[2]) for r in rows), default=0)
        for owner, head in (("front end", "options"), ("encoder", "encoder")):
            for i, (_, name, kind, default) in enumerate(r for r in rows if r[0] == owner):
                print(f"  {head if i == 0 else '':<9}  {name:<{width}}  {kind:<{kind_width}}  {default}")
        print()
    print("hrperc encode --recipe NAME --option key=value sets them (bools true/false; lists as JSON or 1,2,3).")
    return 0
