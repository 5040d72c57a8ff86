"""``save_front_end`` / ``load_front_end``: an attached model's front end next to its ``save_pretrained``.

Two files in the model's directory: ``hrperc_front_end.json`` (how to rebuild the front end: recipe,
options, backbone layer and normalization, DEM and projector configuration) and
``hrperc_front_end.safetensors``: the front end's whole state (``front_end.*``: its DEM and any other part
it owns, everything of the encoder but the tower) and a new projector's weights (``projector.*``). Files
written by hrperc 0.x before the front end owned its DEM (version 1, keys ``dem.*``) still load.

Loading trusts nothing in them. The JSON is checked whole -- types, ranges, the DEM's width and heads
against the model's tower, the projector's widths against the encoder and the LLM's hidden size, the
recipe, the options -- and the weight file's names and shapes (read from its header) against the front
end rebuilt with its DEM on the ``meta`` device (the recipe itself refuses a DEM it would not run, or a
missing one it needs), all before a real module is built: a small file cannot make hrperc
allocate more than the model and the weight file hold. Loading is all-or-nothing: any refusal leaves
the model un-attached (and its tower as it was), so a retry with fixed files works. Every error names
the file and the fix.

Example::

    >>> from hrperc.modules.projector import build_projector
    >>> describe_projector(build_projector("mlp2x_gelu", 8, 16))
    {'kind': 'mlp2x_gelu', 'in': 8, 'out': 16}
    >>> describe_projector(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 16)))["layers"][0]
    {'type': 'LayerNorm', 'dim': 8, 'eps': 1e-05, 'affine': True, 'bias': True}
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._errors import public
from ...backbones.base import resolve_layers
from ...modules.dem import DIRECTIONS, PAIRINGS, DualPerspectiveEnhancement
from ...modules.fusion import FUSIONS
from ...modules.projector import build_projector
from ...ops.reduce import REDUCTIONS
from ...recipes import create_encoder, list_recipes
from ._attach import _FrontEndState, attach, projector_widths
from ._model import ModuleState, inner_model, module_reference, projector_of, text_width, tower_of

__all__ = ["save_front_end", "load_front_end", "describe_projector"]

_FRONT_END_FILE, _CONFIG_FILE = "hrperc_front_end.safetensors", "hrperc_front_end.json"
_FORMAT, _VERSION = "hrperc-front-end", 2
_READS = (1, 2)  # version 1 stored the DEM as dem.*, before the front end owned it (now front_end.dem.*)
_DEM_KEYS = (
    "dim",
    "heads",
    "pairing",
    "shared_attention",
    "residual_norm",
    "directions",
    "reduction",
    "skip_unread",
    "fusion",
    "output_size",
)
_MLP = re.compile(r"^mlp(\d+)x_gelu$")
_MAX_MLP_DEPTH = 16
_MAX_WIDTH = 65536  # widths in a custom projector; the weight file's shapes bound the memory further
_MAX_OUTPUT_SIDE = 4096
_REFIX = (
    "Check that the directory holds the two files save_front_end(model, directory) wrote for this model, or "
    "save them again"
)


# --- describing a projector ---------------------------------------------------------------------------------
def _linear(m: nn.Module, bias: bool = True) -> bool:
    return type(m) is nn.Linear and (m.bias is not None) == bias


def _layer_entry(m: Any) -> dict | None:  # Any: the type checks below pick the attributes
    kind = type(m)
    if kind is nn.Linear:
        return {"type": "Linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    if kind is nn.LayerNorm and len(m.normalized_shape) == 1:
        return {
            "type": "LayerNorm",
            "dim": int(m.normalized_shape[0]),
            "eps": float(m.eps),
            "affine": bool(m.elementwise_affine),
            "bias": getattr(m, "bias", None) is not None,
        }
    if kind is nn.GELU:
        return {"type": "GELU", "approximate": m.approximate}
    if kind in (nn.ReLU, nn.SiLU, nn.Tanh, nn.Identity):
        return {"type": kind.__name__}
    if kind is nn.Dropout:
        return {"type": "Dropout", "p": float(m.p)}
    return None


def describe_projector(projector: nn.Module) -> dict:
    """A JSON description :func:`load_front_end` rebuilds ``projector`` from: ``build_projector``'s kind
    (``linear``, ``identity``, ``mlp{n}x_gelu``) with its widths, or ``"sequential"`` with its layers (an
    ``nn.Sequential`` of Linear, LayerNorm, GELU, ReLU, SiLU, Tanh, Dropout, Identity). Anything else is
    refused (``ValueError``) with the fix."""
    if type(projector) is nn.Identity:
        return {"kind": "identity"}
    if _linear(projector):
        return {"kind": "linear", "in": projector.in_features, "out": projector.out_features}
    if type(projector) is nn.Sequential and len(projector) % 2 == 1 and _linear(projector[0]):
        layers = list(projector)
        w_in, w_out = layers[0].in_features, layers[0].out_features
        tail = layers[1:]
        if all(
            type(g) is nn.GELU
            and g.approximate == "none"
            and _linear(lin)
            and lin.in_features == w_out
            and lin.out_features == w_out
            for g, lin in zip(tail[0::2], tail[1::2])
        ):
            return {"kind": f"mlp{len(layers) // 2 + 1}x_gelu", "in": w_in, "out": w_out}
    if type(projector) is nn.Sequential and len(projector) > 0:
        entries = [_layer_entry(m) for m in projector]
        if all(e is not None for e in entries):
            p_in, p_out = projector_widths(projector)
            return {"kind": "sequential", "in": p_in, "out": p_out, "layers": entries}
    raise ValueError(
        f"save_front_end: the projector (model.hrperc_front_end.projector) is a {type(projector).__name__} that hrperc "
        f"cannot describe, so load_front_end could never rebuild it. Build it with hrperc.modules.projector."
        f"build_projector(kind, in, out), or as an nn.Sequential of Linear / LayerNorm / GELU / ReLU / SiLU / Tanh / "
        f"Dropout / Identity layers."
    )


def _build_layer(entry: dict, device) -> nn.Module:
    kind = entry["type"]
    if kind == "Linear":
        return nn.Linear(entry["in"], entry["out"], bias=entry["bias"], device=device)
    if kind == "LayerNorm":
        return nn.LayerNorm(
            entry["dim"], eps=entry["eps"], elementwise_affine=entry["affine"], bias=entry["bias"], device=device
        )
    if kind == "GELU":
        return nn.GELU(approximate=entry["approximate"])
    if kind == "Dropout":
        return nn.Dropout(entry["p"])
    return getattr(nn, kind)()


def _build_projector(description: dict, device=None) -> nn.Module:
    kind = description["kind"]
    if kind == "sequential":
        return nn.Sequential(*[_build_layer(e, device) for e in description["layers"]])
    if kind == "identity":
        return nn.Identity()
    return build_projector(kind, description["in"], description["out"], device=device)


# --- save ---------------------------------------------------------------------------------------------------
def _dem_config(dem) -> dict | None:
    if dem is None:
        return None
    if type(dem) is not DualPerspectiveEnhancement:
        raise ValueError(
            f"save_front_end: the encoder's DEM is a {type(dem).__name__}, not a DualPerspectiveEnhancement, so its "
            f"configuration cannot be written for load_front_end. Use a hrperc.DualPerspectiveEnhancement."
        )
    config = {k: getattr(dem, k) for k in _DEM_KEYS if k not in ("fusion", "output_size")}
    config["fusion"] = dem.fusion.mode
    config["output_size"] = list(dem.output_size) if dem.output_size is not None else None
    return config


def _jsonable(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        try:
            text = json.dumps(v)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"save_front_end: the recipe option {k}={v!r} cannot be written to JSON; build the encoder with "
                f"plain options (ints, floats, strings, lists) to save it."
            ) from e
        out[k] = json.loads(text)
    return out


@public
def save_front_end(model, directory) -> Path:
    """Write the attached front end next to ``model.save_pretrained(directory)``'s output: its weights
    (``hrperc_front_end.safetensors``: the front end's whole state and a new projector) and how to rebuild it
    (``hrperc_front_end.json``). Returns the directory. :func:`load_front_end` restores the attached model.

    Refused before anything is written: a model with nothing attached, an encoder not built by
    ``create_encoder`` / ``encoder_from_model`` (no recipe to rebuild it from), a foreign tower
    (``attach(..., foreign_tower=True)``: the model's own tower is what a restore would use), a DEM that is
    not a ``DualPerspectiveEnhancement`` and a projector that :func:`describe_projector` cannot describe."""
    from safetensors.torch import save_file

    inner, family = inner_model(model)
    attachment = getattr(inner, "_hrperc_attachment", None)
    if attachment is None:
        raise ValueError("the model has no hrperc encoder attached; call attach(model, ...) first.")
    encoder = attachment.encoder
    if encoder.recipe is None:
        raise ValueError(
            "the attached encoder was not built by hrperc.create_encoder (or encoder_from_model), so there is "
            "no recipe to rebuild it from. Build it with create_encoder(recipe, tower, ...)."
        )
    if attachment.foreign:
        raise ValueError(
            "the attached encoder runs another tower than the model's own (attach(..., foreign_tower=True)); "
            "load_front_end rebuilds the front end around the model's tower, so the restored model would differ. "
            "Use the model's own tower, or save that tower yourself."
        )
    if not isinstance(encoder.backbone, family.backbone):
        name = family.backbone.__name__
        raise ValueError(
            f"the attached encoder's backbone is a {type(encoder.backbone).__name__}, not a {name} around "
            f"the model's vision tower; load_front_end could not rebuild it. Build the encoder around "
            f"{name}(model.model.{family.tower})."
        )
    state = attachment.state
    config = {
        "format": _FORMAT,
        "version": _VERSION,
        "family": family.key,
        "recipe": encoder.recipe,
        "options": _jsonable(encoder.recipe_options),
        "backbone": {"layer": encoder.layer, "mean": list(encoder.backbone.mean), "std": list(encoder.backbone.std)},
        "dem": _dem_config(encoder.dem),
        "projector": None if state.projector is None else describe_projector(state.projector),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.state_dict().items()}
    save_file(tensors, str(directory / _FRONT_END_FILE))
    (directory / _CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return directory


# --- load: validation ---------------------------------------------------------------------------------------
class _Bad(ValueError):
    pass


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Bad(what)


def _check_keys(value, keys, where: str, optional=()) -> None:
    _need(isinstance(value, dict), f"{where} is a {type(value).__name__}, not a JSON object")
    missing = [k for k in keys if k not in value]
    extra = sorted(set(value) - set(keys) - set(optional))
    _need(not missing, f"{where} lacks the key(s) {missing}")
    _need(not extra, f"{where} has unknown key(s) {extra}")


def _check_dem(dem: dict, width: int) -> dict:
    _check_keys(dem, _DEM_KEYS, '"dem"')
    dim, heads = dem["dim"], dem["heads"]
    _need(
        _is_int(dim) and dim == width,
        f"\"dem.dim\" is {dim!r} but the model's vision tower has width {width} (the DEM enhances the tower's tokens)",
    )
    _need(
        _is_int(heads) and 1 <= heads <= dim and dim % heads == 0,
        f'"dem.heads" is {heads!r}; it must be an int >= 1 dividing dim={dim}',
    )
    for key, choices in (
        ("pairing", PAIRINGS),
        ("directions", DIRECTIONS),
        ("fusion", FUSIONS),
        ("reduction", REDUCTIONS),
    ):
        _need(isinstance(dem[key], str) and dem[key] in choices, f'"dem.{key}" is {dem[key]!r}, not one of {choices}')
    for key in ("shared_attention", "residual_norm", "skip_unread"):
        _need(isinstance(dem[key], bool), f'"dem.{key}" is {dem[key]!r}, not true / false')
    size = dem["output_size"]
    if size is not None:
        ok = isinstance(size, list) and len(size) == 2 and all(_is_int(s) and 1 <= s <= _MAX_OUTPUT_SIDE for s in size)
        _need(ok, f'"dem.output_size" is {size!r}; it must be null or two ints in 1..{_MAX_OUTPUT_SIDE}')
        _need(dem["reduction"] != "none", '"dem.output_size" is set with "dem.reduction" "none"')
    kw = {k: dem[k] for k in _DEM_KEYS if k not in ("dim", "heads")}
    kw["output_size"] = tuple(size) if size is not None else None
    return kw


def _check_projector(proj, out_width: int, legacy: bool) -> dict:
    if legacy and isinstance(proj, dict) and set(proj) == {"width", "out"}:
        proj = {"kind": "mlp2x_gelu", "in": proj["width"], "out": proj["out"]}
    _need(
        isinstance(proj, dict) and isinstance(proj.get("kind"), str),
        f'"projector" is {proj!r}, not an object with a "kind"',
    )
    kind = proj["kind"]
    if kind == "identity":
        _check_keys(proj, ("kind",), '"projector"')
        return proj
    if kind == "sequential":
        _check_keys(proj, ("kind", "in", "out", "layers"), '"projector"')
    else:
        _check_keys(proj, ("kind", "in", "out"), '"projector"')
        match = _MLP.match(kind)
        _need(
            kind == "linear" or (match is not None and 1 <= int(match.group(1)) <= _MAX_MLP_DEPTH),
            f'"projector.kind" is {kind!r}; one of "linear", "identity", "mlp{{n}}x_gelu" (n in 1..{_MAX_MLP_DEPTH}) '
            f'or "sequential"',
        )
    for key in ("in", "out"):
        _need(
            _is_int(proj[key]) and 1 <= proj[key] <= _MAX_WIDTH,
            f'"projector.{key}" is {proj[key]!r}; it must be an int in 1..{_MAX_WIDTH}',
        )
    _need(
        proj["out"] == out_width,
        f'"projector.out" is {proj["out"]} but the LLM\'s hidden size is {out_width}; the '
        f"projector's tokens go into the LLM",
    )
    if kind == "sequential":
        _check_layers(proj["layers"], proj["in"], proj["out"])
    return proj


def _check_layers(layers, w_in: int, w_out: int) -> None:
    _need(isinstance(layers, list) and 0 < len(layers) <= 64, '"projector.layers" must be a list of 1..64 layers')
    width = w_in
    for i, e in enumerate(layers):
        where = f'"projector.layers[{i}]"'
        _need(isinstance(e, dict) and isinstance(e.get("type"), str), f"{where} is {e!r}, not an object with a type")
        kind = e["type"]
        if kind == "Linear":
            _check_keys(e, ("type", "in", "out", "bias"), where)
            _need(_is_int(e["in"]) and e["in"] == width, f"{where} takes {e['in']!r} channels but gets {width}")
            _need(_is_int(e["out"]) and 1 <= e["out"] <= _MAX_WIDTH, f"{where} has out={e['out']!r}")
            _need(isinstance(e["bias"], bool), f"{where} has bias={e['bias']!r}, not true / false")
            width = e["out"]
        elif kind == "LayerNorm":
            _check_keys(e, ("type", "dim", "eps", "affine", "bias"), where)
            _need(_is_int(e["dim"]) and e["dim"] == width, f"{where} normalizes {e['dim']!r} channels but gets {width}")
            _need(_is_number(e["eps"]) and e["eps"] > 0, f"{where} has eps={e['eps']!r}")
            _need(isinstance(e["affine"], bool) and isinstance(e["bias"], bool), f"{where}: affine / bias not booleans")
        elif kind == "GELU":
            _check_keys(e, ("type", "approximate"), where)
            _need(e["approximate"] in ("none", "tanh"), f"{where} has approximate={e['approximate']!r}")
        elif kind == "Dropout":
            _check_keys(e, ("type", "p"), where)
            _need(_is_number(e["p"]) and 0 <= e["p"] < 1, f"{where} has p={e['p']!r}")
        else:
            _need(kind in ("ReLU", "SiLU", "Tanh", "Identity"), f"{where} has the unknown type {kind!r}")
            _check_keys(e, ("type",), where)
    _need(width == w_out, f'"projector.layers" end with width {width}, not "projector.out" {w_out}')


def _check_options(options) -> dict:
    _need(isinstance(options, dict), f'"options" is a {type(options).__name__}, not a JSON object')

    def plain(v) -> bool:
        if v is None or isinstance(v, (bool, str)) or _is_number(v):
            return True
        return isinstance(v, list) and len(v) <= 1024 and all(plain(x) for x in v)

    for k, v in options.items():
        _need(k != "dem", '"options" holds "dem"; the DEM is described under "dem"')
        _need(plain(v), f'"options.{k}" is {v!r}; options are numbers, strings, booleans, null or lists of them')

    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    return {k: tuples(v) for k, v in options.items()}


def _validate(config, model, inner, family) -> dict:
    """The checked plan to rebuild the front end from ``config``, or ``_Bad`` with the reason."""
    _need(isinstance(config, dict), f"the JSON is a {type(config).__name__}, not an object")
    legacy = "format" not in config  # written before the format was versioned: the same keys, an older projector
    keys = ("family", "recipe", "options", "backbone", "dem", "projector")
    if legacy:
        _check_keys(config, keys, "the JSON")
    else:
        _check_keys(config, ("format", "version", *keys), "the JSON")
        _need(config["format"] == _FORMAT, f'"format" is {config["format"]!r}, not {_FORMAT!r}')
        _need(
            _is_int(config["version"]) and config["version"] in _READS,
            f'"version" is {config["version"]!r}; this hrperc reads versions {list(_READS)}',
        )
    _need(
        config["family"] == family.key,
        f"the front end was saved from a {config['family']!r} model, not {family.key!r}",
    )
    recipe = config["recipe"]
    _need(isinstance(recipe, str) and recipe in list_recipes(), f'"recipe" is {recipe!r}, not one of {list_recipes()}')
    options = _check_options(config["options"])
    bb = config["backbone"]
    _check_keys(bb, ("layer", "mean", "std"), '"backbone"')
    tower = family.backbone(tower_of(inner, family), layer=-1)  # a wrapper only: no weights are made
    layer = bb["layer"]
    several = isinstance(layer, list) and 0 < len(layer) <= 1024 and all(_is_int(v) for v in layer)
    _need(_is_int(layer) or several, f'"backbone.layer" is {layer!r}, not an int or a list of ints')
    try:
        width = tower.hidden_size * len(resolve_layers(layer, tower.num_layers))
    except (TypeError, ValueError):
        raise _Bad(f'"backbone.layer" is {layer}; the tower has {tower.num_layers} layers, each read once') from None
    for key in ("mean", "std"):
        v = bb[key]
        ok = isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v) and (key == "mean" or min(v) > 0)
        _need(ok, f'"backbone.{key}" is {v!r}; it must be three finite numbers' + (" > 0" if key == "std" else ""))
    # A null "dem" becomes dem=None, never a fresh random DEM in place of saved weights: the recipe refuses
    # dem=None where it runs one (and a DEM where it runs none) when the front end is rebuilt.
    dem = config["dem"]
    dem_kw = None if dem is None else _check_dem(dem, width)
    proj = config["projector"]
    proj = None if proj is None else _check_projector(proj, text_width(model), legacy)
    return {
        "legacy_keys": legacy or config["version"] == 1,
        "recipe": recipe,
        "options": options,
        "layer": layer,
        "mean": bb["mean"],
        "std": bb["std"],
        "dem": None if dem is None else (dem["dim"], dem["heads"], dem_kw),
        "projector": proj,
    }


def _weight_shapes(path: Path) -> dict:
    """``name -> (shape, dtype)`` from a safetensors file's header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        out = {}
        for k in f.keys():
            part = f.get_slice(k)
            out[k] = (tuple(part.get_shape()), part.get_dtype())
        return out


def _rebuild(plan: dict, inner, family, device, bad, config_path) -> tuple:
    """The encoder around the model's tower, its DEM built on ``device`` (``"meta"``: no memory), and the
    projector; the recipe's refusal of these options (a DEM it does not run, none where it needs one) is
    the config's fault."""
    dem = None
    if plan["dem"] is not None:
        dim, heads, kw = plan["dem"]
        dem = DualPerspectiveEnhancement(dim, heads, device=device, **kw)
    projector = None if plan["projector"] is None else _build_projector(plan["projector"], device)
    try:
        backbone = family.backbone(tower_of(inner, family), layer=plan["layer"], mean=plan["mean"], std=plan["std"])
        encoder = create_encoder(plan["recipe"], backbone, **dict(plan["options"], dem=dem))
    except (TypeError, ValueError) as e:
        raise bad(
            config_path, f'recipe {plan["recipe"]!r} refuses "options" {plan["options"]} with this "dem": {e}'
        ) from None
    if encoder.dem is not dem:
        raise bad(config_path, f"recipe {plan['recipe']!r} with these options does not run the saved DEM")
    return encoder, projector


def _renamed(names, legacy_keys: bool):
    """Version-1 names (``dem.*``) as today's (``front_end.dem.*``)."""
    return {(f"front_end.{k}" if legacy_keys and k.startswith("dem.") else k): k for k in names}


# --- load ---------------------------------------------------------------------------------------------------
@public
def load_front_end(model, processor, directory):
    """Rebuild the front end :func:`save_front_end` wrote in ``directory`` around ``model`` (the model loaded
    with ``from_pretrained(directory)``), load its weights and attach it; returns ``(model, processor)``
    as :func:`attach` does.

    Everything is checked before a module is built (see the module docs); any refusal (``ValueError``,
    ``FileNotFoundError``) names the file and the fix and leaves ``model`` un-attached.

    Example::

        >>> model = LlavaForConditionalGeneration.from_pretrained(d)                  # doctest: +SKIP
        >>> model, proc = load_front_end(model, AutoProcessor.from_pretrained(d), d)   # doctest: +SKIP
    """
    directory = Path(directory)
    config_path, weights_path = directory / _CONFIG_FILE, directory / _FRONT_END_FILE
    inner, family = inner_model(model)
    if getattr(inner, "_hrperc_attachment", None) is not None:
        raise ValueError("the model already has an hrperc encoder attached; load into a fresh model.")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"no {path.name} in {str(directory)!r}; save the attached model with save_front_end(model, dir) "
                f"(next to model.save_pretrained(dir))."
            )

    def bad(path, what: str) -> ValueError:
        return ValueError(f"{str(path)!r}: {what}. {_REFIX}.")

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(config_path, f"not valid JSON ({e})") from None
    try:
        plan = _validate(config, model, inner, family)
    except _Bad as e:
        raise bad(config_path, str(e)) from None
    # The weight file's names and shapes against modules built on the meta device (no memory).
    try:
        found = _weight_shapes(weights_path)
    except Exception as e:  # safetensors raises its own error types for a malformed header
        raise bad(weights_path, f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    snapshot = ModuleState(tower_of(inner, family))  # building an encoder freezes the tower: undone on a refusal
    try:
        meta_encoder, meta_projector = _rebuild(plan, inner, family, "meta", bad, config_path)
        meta_state = _FrontEndState(meta_encoder.front_end, meta_projector).state_dict()
        expected = {k: tuple(v.shape) for k, v in meta_state.items()}
        _check_header(
            {new: found[old] for new, old in _renamed(found, plan["legacy_keys"]).items()}, expected, weights_path, bad
        )
        # Checked: build the real parts, load them, and attach (which changes the model only once all is well).
        return _build_and_attach(model, processor, inner, family, plan, weights_path, config_path, bad)
    except BaseException:
        snapshot.restore()
        raise


def _check_header(found: dict, expected: dict, weights_path: Path, bad) -> None:
    """The weight file's names, shapes and dtypes (``found``, from its header) against the rebuilt front
    end's and projector's (``expected``)."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise bad(
            weights_path,
            f"its tensors do not match {_CONFIG_FILE}: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}",
        )
    shapes = [(k, found[k][0], expected[k]) for k in expected if found[k][0] != expected[k]]
    if shapes:
        k, got, want = shapes[0]
        raise bad(
            weights_path,
            f"{k} has shape {list(got)} but {_CONFIG_FILE} describes {list(want)} ({len(shapes)} mismatched)",
        )
    not_float = [k for k, (_, dtype) in found.items() if dtype not in ("F16", "BF16", "F32", "F64")]
    if not_float:
        raise bad(weights_path, f"{not_float[:5]} are not floating-point tensors")


def _build_and_attach(model, processor, inner, family, plan, weights_path, config_path, bad):
    from safetensors.torch import load_file

    encoder, projector = _rebuild(plan, inner, family, None, bad, config_path)
    model_projector = projector_of(inner, family)
    width = encoder.token_width
    expected = projector_widths(model_projector)[0] if model_projector is not None else text_width(model)
    if projector is None and expected is not None and expected != width:
        taker = "projector" if model_projector is not None else "LLM"
        raise bad(
            config_path,
            f"\"projector\" is null but the encoder's tokens have width {width} and the model's "
            f"{taker} takes {expected}",
        )
    if projector is not None and plan["projector"].get("in", width) != width:
        raise bad(
            config_path, f'"projector.in" is {plan["projector"]["in"]} but the encoder\'s tokens have width {width}'
        )
    loaded = load_file(str(weights_path))
    weights = {new: loaded[old] for new, old in _renamed(loaded, plan["legacy_keys"]).items()}
    bad_values = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
    if bad_values:
        raise bad(weights_path, f"{bad_values[:5]} hold NaN or inf values")
    _FrontEndState(encoder.front_end, projector).load_state_dict(weights, strict=True)
    model, attached = attach(model, processor, encoder, projector=projector)
    ref = module_reference(inner, family)
    inner._hrperc_attachment.state.to(device=ref.device, dtype=ref.dtype)
    return model, attached
