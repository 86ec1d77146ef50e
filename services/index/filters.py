"""The one filter language of filtered search (issue 21's first part): parsed and validated here for the CLI,
gRPC and HTTP alike, normalised for cache keys, and evaluated on metadata columns.

Two spellings, one tree:
* a `--where` expression: `in_stock and category in ("shoes", "bags") and price < 120` — Python's own
  expression grammar, parsed by the standard `ast` module (never evaluated) and restricted to field names,
  literals, comparisons (`== != < <= > >=`, chained `10 <= price < 20`), `in` / `not in` a list, `and`, `or`,
  `not`, parentheses; a bare field is `field == true`;
* a JSON object: `{"in_stock": true, "category": ["shoes", "bags"], "price": {"lt": 120}}` — keys are fields
  (all must hold), a list means "in", an object of operators (`eq ne lt lte gt gte in nin`) compares, and
  `{"and": [...]}`, `{"or": [...]}`, `{"not": {...}}` combine.
Errors are InvalidInput naming the field or the part that is wrong.
"""

from __future__ import annotations

import ast
import json
import operator
from dataclasses import dataclass
from typing import Union

import numpy as np

from services.common.errors import InvalidInput
from services.common.validate import INT64_MAX, INT64_MIN, quote

Value = Union[str, int, float, bool]
OPS = {"eq": "==", "ne": "!=", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
_AST_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
MAX_NODES = 256  # conditions, and/or/not: a filter is a few conditions; a huge one is an attack, not a query
MAX_DEPTH = 32  # and/or/not nested: what the parsers (and every walk of the tree) may recurse through
MAX_LIST = 10_000  # values of one in-list (not counted among the nodes)
SHOWN = 200  # characters of the filter an error may repeat
MAX_FILTER_CHARS = 65_536  # a filter's text: a few conditions, or an in-list of some thousand values


@dataclass(frozen=True)
class Cmp:
    field: str
    op: str  # one of OPS' values
    value: Value


@dataclass(frozen=True)
class In:
    field: str
    values: tuple[Value, ...]
    negate: bool = False


@dataclass(frozen=True)
class All:
    parts: tuple["Node", ...]


@dataclass(frozen=True)
class Any_:
    parts: tuple["Node", ...]


@dataclass(frozen=True)
class Not:
    part: "Node"


Node = Union[Cmp, In, All, Any_, Not]


def parse_where(text: str) -> Node:
    """A `--where` expression -> the filter tree."""
    if not text.strip():
        raise InvalidInput("filter is empty")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise InvalidInput(f"filter is not an expression: {quote(e.msg, SHOWN)} at column {e.offset}") from None
    except (RecursionError, MemoryError, ValueError):  # nested past Python's own limits, or a number too long
        raise InvalidInput(f"filter nests deeper than {MAX_DEPTH} levels or holds a number past 64 bits") from None
    _check_shape(tree)
    return _from_ast(tree)


def _check_shape(tree: ast.AST) -> None:
    """At most MAX_NODES conditions and and/or/not, nested at most MAX_DEPTH deep (an in-list counts once: its
    values are MAX_LIST's), walked without recursion: this runs before anything recurses through the tree."""
    stack, nodes = [(tree, 1)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise InvalidInput(f"filter has more than {MAX_NODES} parts")
        if depth > MAX_DEPTH:
            raise InvalidInput(f"filter nests deeper than {MAX_DEPTH} levels")
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _from_ast(node: ast.AST) -> Node:
    if isinstance(node, ast.BoolOp):
        parts = tuple(_from_ast(v) for v in node.values)
        return All(parts) if isinstance(node.op, ast.And) else Any_(parts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return Not(_from_ast(node.operand))
    if isinstance(node, ast.Name):
        return Cmp(node.id, "==", True)
    if isinstance(node, ast.Compare):
        conditions, left = [], node.left
        for op, right in zip(node.ops, node.comparators):
            conditions.append(_comparison(left, op, right))
            left = right
        return conditions[0] if len(conditions) == 1 else All(tuple(conditions))
    raise InvalidInput(f"filter: {quote(ast.unparse(node), SHOWN)} is not a condition (field, comparison, in, "
                       "and/or/not)")


def _comparison(left: ast.AST, op: ast.cmpop, right: ast.AST) -> Node:
    if isinstance(op, (ast.In, ast.NotIn)):
        if not isinstance(left, ast.Name):
            raise InvalidInput(f"filter: the left of 'in' must be a field, not {quote(ast.unparse(left), SHOWN)}")
        if isinstance(right, ast.Constant):  # `category in ("shoes")`: Python reads a string, a user means a list
            right = ast.Tuple([right])
        if not isinstance(right, (ast.Tuple, ast.List, ast.Set)):
            raise InvalidInput(f"filter: {_cut(left.id)} in ... needs a list such as (\"a\", \"b\")")
        return In(left.id, _values(left.id, right.elts), isinstance(op, ast.NotIn))
    if type(op) not in _AST_OPS:
        raise InvalidInput(f"filter: unsupported comparison {type(op).__name__}")
    symbol = _AST_OPS[type(op)]
    left, right = _literal(left), _literal(right)
    if isinstance(left, ast.Name) and isinstance(right, ast.Constant):
        return Cmp(left.id, symbol, _value(left.id, right))
    if isinstance(left, ast.Constant) and isinstance(right, ast.Name):  # 10 < price: price > 10
        flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}[symbol]
        return Cmp(right.id, flipped, _value(right.id, left))
    raise InvalidInput(f"filter: compare a field with a value, not {quote(ast.unparse(left), SHOWN)} with "
                       f"{quote(ast.unparse(right), SHOWN)}")


def _literal(node: ast.AST) -> ast.AST:
    """JSON's true/false read as Python's True/False; a signed number (-1, +2.5) as the number."""
    if isinstance(node, ast.Name) and node.id in ("true", "false"):
        return ast.Constant(node.id == "true")
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))
            and not isinstance(node.operand.value, bool)):
        return ast.Constant(-node.operand.value if isinstance(node.op, ast.USub) else node.operand.value)
    return node


def _value(field: str, node: ast.AST) -> Value:
    node = _literal(node)
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
        return _checked(field, node.value)
    raise InvalidInput(f"filter: {_cut(field)} is compared with {quote(ast.unparse(node), SHOWN)}, not a "
                       "string, number or true/false")


def _cut(text: str) -> str:
    """Text of the caller's an error may repeat: at most SHOWN characters of it."""
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}… ({len(text)} characters)"


def _checked(field: str, value: Value) -> Value:
    """A number a column can hold: finite, an integer within 64 bits."""
    if isinstance(value, float) and not np.isfinite(value):
        raise InvalidInput(f"filter: {_cut(field)} is compared with a number that is not finite")
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise InvalidInput(f"filter: {_cut(field)} is compared with an integer past 64 bits")
    return value


def _values(field: str, nodes: list[ast.AST]) -> tuple[Value, ...]:
    if not nodes or len(nodes) > MAX_LIST:
        raise InvalidInput(f"filter: {_cut(field)} in ... needs 1 to {MAX_LIST} values")
    return tuple(_value(field, n) for n in nodes)


def parse_json(obj: object, depth: int = 1) -> Node:
    """A JSON filter (already decoded) -> the filter tree."""
    if depth > MAX_DEPTH:
        raise InvalidInput(f"filter nests deeper than {MAX_DEPTH} levels")
    if not isinstance(obj, dict) or not obj:
        raise InvalidInput("filter must be a non-empty JSON object of field conditions")
    if len(obj) > MAX_NODES:
        raise InvalidInput(f"filter has more than {MAX_NODES} parts")
    parts = []
    for key, cond in obj.items():
        if key in ("and", "or"):
            if not isinstance(cond, list) or not cond or len(cond) > MAX_NODES:
                raise InvalidInput(f"filter: {key!r} takes a list of 1 to {MAX_NODES} filters")
            sub = tuple(parse_json(c, depth + 1) for c in cond)
            parts.append(All(sub) if key == "and" else Any_(sub))
        elif key == "not":
            parts.append(Not(parse_json(cond, depth + 1)))
        else:
            parts.append(_field_condition(key, cond))
        if sum(_size(p) for p in parts) > MAX_NODES:  # as it grows: a wide filter stops at the bound
            raise InvalidInput(f"filter has more than {MAX_NODES} parts")
    return parts[0] if len(parts) == 1 else All(tuple(parts))


def _field_condition(field: str, cond: object) -> Node:
    if isinstance(cond, list):
        return In(field, _json_values(field, cond))
    if isinstance(cond, dict):
        if not cond:
            raise InvalidInput(f"filter: {_cut(field)} has an empty condition")
        parts: list[Node] = []
        for op, value in cond.items():
            if op in ("in", "nin"):
                if not isinstance(value, list):
                    raise InvalidInput(f"filter: {_cut(field)}.{op} takes a list")
                parts.append(In(field, _json_values(field, value), op == "nin"))
            elif op in OPS:
                parts.append(Cmp(field, OPS[op], _json_value(field, value)))
            else:
                known = ", ".join([*OPS, "in", "nin"])
                raise InvalidInput(f"filter: {_cut(field)} has unknown operator {quote(op, SHOWN)} (use "
                                   f"{known})")
        return parts[0] if len(parts) == 1 else All(tuple(parts))
    return Cmp(field, "==", _json_value(field, cond))


def _json_value(field: str, value: object) -> Value:
    if isinstance(value, (str, bool, int, float)):
        return _checked(field, value)
    kind = "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else "null"
    raise InvalidInput(f"filter: {_cut(field)} is compared with {kind}, not a string, number or true/false")


def _json_values(field: str, values: list) -> tuple[Value, ...]:
    if not values or len(values) > MAX_LIST:
        raise InvalidInput(f"filter: {_cut(field)} in ... needs 1 to {MAX_LIST} values")
    return tuple(_json_value(field, v) for v in values)


def _size(node: Node) -> int:
    if isinstance(node, (All, Any_)):
        return 1 + sum(_size(p) for p in node.parts)
    if isinstance(node, Not):
        return 1 + _size(node.part)
    return 1


def fields_of(node: Node) -> set[str]:
    return {leaf.field for leaf in _leaves(node)}


def check_fields(node: Node, kinds: dict[str, str]) -> None:
    """Every field is declared filterable, and compared with values of its kind (str | int | float | bool)."""
    for leaf in _leaves(node):
        if leaf.field not in kinds:
            known = ", ".join(sorted(kinds)) or "none"
            raise InvalidInput(f"filter: unknown field {quote(leaf.field, SHOWN)} (filterable: {known})")
        kind = kinds[leaf.field]
        values = leaf.values if isinstance(leaf, In) else (leaf.value,)
        for v in values:
            if not _fits(v, kind):
                raise InvalidInput(f"filter: {_cut(leaf.field)} holds {kind} values, not "
                                   f"{_cut(json.dumps(v))}")
        if isinstance(leaf, Cmp) and leaf.op not in ("==", "!=") and kind in ("str", "bool"):
            raise InvalidInput(f"filter: {_cut(leaf.field)} holds {kind} values: compare it with == or in, "
                               f"not {leaf.op}")


def _fits(value: Value, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _leaves(node: Node):
    if isinstance(node, (All, Any_)):
        for p in node.parts:
            yield from _leaves(p)
    elif isinstance(node, Not):
        yield from _leaves(node.part)
    else:
        yield node


def canonical(node: Node) -> str:
    """One string per meaning of the spelling: the same filter written two ways (order of and-ed parts, of
    an in-list, JSON or --where) gives one cache key."""
    return json.dumps(_canon(node), separators=(",", ":"), sort_keys=True)


def _canon(node: Node):
    if isinstance(node, Cmp):
        return [node.field, node.op, node.value]
    if isinstance(node, In):
        return [node.field, "not in" if node.negate else "in", sorted(set(node.values), key=json.dumps)]
    if isinstance(node, Not):
        return ["not", _canon(node.part)]
    parts = sorted((_canon(p) for p in node.parts), key=json.dumps)
    return ["and" if isinstance(node, All) else "or", parts]


@dataclass
class Column:
    """One filterable field of a shard's rows, compact: numbers as int64/float64, booleans as bool, strings as
    int32 codes into a dictionary (a category repeated a million times is stored once); `present` is False
    where a row has no value."""
    kind: str  # str | int | float | bool
    values: np.ndarray
    present: np.ndarray
    dictionary: np.ndarray | None = None  # str: the distinct strings, sorted; values are positions in it

    def __len__(self) -> int:
        return len(self.values)

    def take(self, rows: np.ndarray) -> "Column":
        return Column(self.kind, self.values[rows], self.present[rows], self.dictionary)

    def python(self) -> list:
        """The values as Python objects (None where absent), e.g. to write them or to join two columns."""
        if self.kind == "str":
            out = self.dictionary[self.values] if len(self.dictionary) else np.full(len(self), None, object)
        else:
            out = self.values.astype(object)
        return [v if p else None for v, p in zip(out.tolist(), self.present.tolist())]


_NUMPY = {"int": np.int64, "float": np.float64, "bool": bool}


def column(kind: str, values: list) -> Column:
    """A Column of Python values (None: no value), of a kind kind_of gave."""
    present = np.array([v is not None for v in values], bool)
    if kind == "str":
        dictionary = np.array(sorted({v for v in values if v is not None}), dtype=object)
        codes = np.searchsorted(dictionary, np.array([v if v is not None else "" for v in values], dtype=object)) \
            if len(dictionary) else np.zeros(len(values), np.int64)
        return Column(kind, np.where(present, codes, 0).astype(np.int32), present, dictionary)
    fill = False if kind == "bool" else 0
    return Column(kind, np.array([fill if v is None else v for v in values], dtype=_NUMPY[kind]), present)


def kind_of(values: list) -> str | None:
    """The kind of a field's values (None ignored): bool, int, float (ints and floats mixed), str; None when
    the values are of no single kind (a number here, a string there, a list...)."""
    return kind_of_kinds({value_kind(v) for v in values if v is not None})


def value_kind(value) -> str | None:
    """bool, int, float or str; None for a value of no scalar kind (a list, a dict...)."""
    return _KIND.get(type(value))


def kind_of_kinds(kinds: set) -> str | None:
    """kind_of from the set of its values' value_kind (so it can be gathered a batch of rows at a time)."""
    if kinds == {"int", "float"}:
        return "float"
    if len(kinds) != 1 or None in kinds:
        return None
    return next(iter(kinds))


_KIND = {bool: "bool", int: "int", float: "float", str: "str"}


def matches(node: Node, columns: dict[str, Column]) -> np.ndarray:
    """The rows (a bool mask) of metadata columns that satisfy the filter; a row without the field satisfies no
    comparison on it (and `not` of that comparison)."""
    if isinstance(node, All):
        return np.logical_and.reduce([matches(p, columns) for p in node.parts])
    if isinstance(node, Any_):
        return np.logical_or.reduce([matches(p, columns) for p in node.parts])
    if isinstance(node, Not):
        return ~matches(node.part, columns)
    col = columns[node.field]
    if isinstance(node, In):
        hit = np.isin(col.values, _encoded(col, node.values))
        return col.present & (~hit if node.negate else hit)
    if col.kind == "str":  # == / != on codes (check_fields refuses ordering of strings)
        codes = _encoded(col, (node.value,))
        hit = np.isin(col.values, codes)
        return col.present & (~hit if node.op == "!=" else hit)
    return col.present & _COMPARE[node.op](col.values, node.value)


def _encoded(col: Column, values: tuple) -> np.ndarray:
    """values as col stores them: codes of the strings its dictionary holds (others match no row)."""
    if col.kind != "str":
        return np.array(values, dtype=col.values.dtype if col.kind != "float" else np.float64)
    pos = np.searchsorted(col.dictionary, np.array(values, dtype=object)) if len(col.dictionary) else np.zeros(0)
    return np.array([p for p, v in zip(np.atleast_1d(pos).tolist(), values)
                     if p < len(col.dictionary) and col.dictionary[p] == v], np.int32)


def to_json(node: Node) -> dict:
    """The filter in the JSON language (parse_json reads it back to the same tree): what a router sends its
    shards."""
    if isinstance(node, Cmp):
        return {node.field: {_OP_NAMES[node.op]: node.value}}
    if isinstance(node, In):
        return {node.field: {"nin" if node.negate else "in": list(node.values)}}
    if isinstance(node, Not):
        return {"not": to_json(node.part)}
    return {"and" if isinstance(node, All) else "or": [to_json(p) for p in node.parts]}


_OP_NAMES = {symbol: name for name, symbol in OPS.items()}


def to_wire(node: Node | None) -> str:
    """A parsed filter as a router sends it to its shards: the JSON language, compact ("" for none)."""
    return "" if node is None else json.dumps(to_json(node), separators=(",", ":"))


def parse_filter(text: str) -> Node:
    """A filter as text, either spelling: a JSON object (`{"in_stock": true}`) or a --where expression."""
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidInput(f"filter of {len(text)} characters; the limit is {MAX_FILTER_CHARS}")
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"filter is not valid JSON: {e.msg} at column {e.colno}") from None
        except (RecursionError, ValueError):  # nested past the decoder's limit, or a number too long to read
            raise InvalidInput(f"filter nests deeper than {MAX_DEPTH} levels or holds a number past 64 bits") \
                from None
        return parse_json(obj)
    return parse_where(text)


_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
            ">=": operator.ge}
