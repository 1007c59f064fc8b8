"""How recipe text becomes data (the YAML of recipe files and of ``key=value`` overrides),
and how the schema's complaints about it become one message.

Both are read by :class:`RecipeLoader`, which is ``yaml.safe_load`` (YAML 1.1, what PyYAML
implements) with one YAML 1.2 rule added: a number written with an exponent and no dot
(``1e-3``, ``5E4``) is a float, where plain PyYAML makes it the string ``"1e-3"``.

An override's value is read as YAML would read it after ``key:`` in the file (``"x"`` is the
string x, ``null`` and ``~`` are None, ``none`` is the string "none", ``[a, b]`` a list),
except that a field the schema types as a string keeps the text as written unless it is
quoted or a null word (``run.name=123`` is the name "123", ``data.system_prompt=Answer: A``
the text "Answer: A"). An empty value (``key=``) is refused: write ``key=null`` for no value
or ``key="''"`` (quoted for the shell) for the empty string.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml
from medrl.align.records import UserError


class RecipeError(UserError):
    """Every problem in a recipe, one per line."""


def format_errors(source: str, err) -> str:
    """A pydantic ``ValidationError`` of the recipe ``source`` as one problem per line, each
    with its dotted field path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `medrl schema` lists every key)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif "expected" in (e.get("ctx") or {}):
            msg = f"{msg} (got {e.get('input')!r})"
        elif e["type"] == "value_error":  # our own validators' sentences, without the prefix
            msg = msg.removeprefix("Value error, ")
        else:
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  - {loc}: {msg}")
    return f"{source}: {len(lines)} problem(s) in the recipe:\n" + "\n".join(lines)


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 exponent floats without a dot (``1e-3``)."""


# Only forms that need a dot or an exponent: ``123`` stays an int (the int resolver runs first).
_FLOAT_1_2 = re.compile(r"""^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$""")
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2,
                                   list("-+0123456789."))

NULL_WORDS = ("~", "null", "Null", "NULL")


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` semantics plus YAML 1.2 exponent floats. Raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass: as safe as safe_load


def read_yaml(path: Path) -> dict:
    """The recipe file as a mapping of sections; a :class:`RecipeError` when it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found. Check the path, or start from "
                          "recipes/quickstart.yaml.") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror}).") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start} is not valid UTF-8); save "
                          "the recipe as UTF-8.") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of sections "
                          f"(run, model, data, ...), not a {type(data).__name__}.")
    return data


def parse_override(text: str, schema: type) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value), the value read as described above.

    schema: the pydantic model the dotted path walks (the Recipe), to find string fields.
    """
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.path=value, e.g. "
                          "algorithm.kl.coef=0.01")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise RecipeError(f"override {text!r}: empty part in the key path {key!r}")
    raw = raw.strip()
    if not raw:
        raise RecipeError(f"override {text!r}: the value is empty. Write {key}=null for no "
                          f"value, or \"{key}=''\" (quoted for the shell) for an empty string.")
    literal = raw[0] not in "\"'[{" and raw not in NULL_WORDS
    if literal and is_string_field(schema, path):
        return path, raw
    try:
        return path, load_yaml(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({problem}); "
                          "quote it, e.g. key='text: with a colon'.") from None


def is_string_field(schema: type, path: list[str]) -> bool:
    """Whether ``schema`` types ``path`` as a string (``str`` or ``str | None``)."""
    model: Any = schema
    annotation: Any = None
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields:
            return False
        info = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if info is None:
            return False
        annotation = info.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        model = args[0] if len(args) == 1 else annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation is str or args == [str]


def apply_overrides(data: dict, overrides: list[str], schema: type) -> dict:
    """Set each dotted override in the raw recipe mapping (before validation). A number
    in the path indexes a list: ``rewards.functions.0.kwargs.threshold=0.3``."""
    for text in overrides:
        path, value = parse_override(text, schema)
        node: Any = data
        for i, part in enumerate(path):
            where = ".".join(path[:i])
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise RecipeError(f"override {text!r}: {where} is a list of {len(node)} "
                                      f"entries; {part!r} is not the index of one of them "
                                      f"(0 to {len(node) - 1}).")
                part = int(part)
            elif not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {where} is not a section")
            if i == len(path) - 1:
                node[part] = value
                break
            child = node[part] if isinstance(node, list) else node.get(part)
            if child is None:
                child = node[part] = {}
            node = child
    return data
