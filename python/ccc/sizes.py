"""Size expressions (`SizeExpr` in src/ir/size.rs): small trees over the runtime sizes B (batch), S
(sequence length) and SMs (the GPU's SM count, of which persistent grids are made) that give every
buffer shape and launch grid of a library for one call.

JSON form, externally tagged: {"const": 64}, {"var": "B"}, {"add": [a, b]}, {"mul": [a, b]},
{"ceil_div": [a, 64]}. Evaluation is in unsigned 64-bit arithmetic with overflow reported, as the
Rust runtime does, so that both loaders accept and reject the same calls."""

from .errors import ManifestError

U64_MAX = 2**64 - 1
# Each variable with what it stands for in messages (`SizeVar::meaning`).
SIZE_VARS = {
    "B": "the batch size",
    "S": "the sequence length",
    "SMs": "the device's SM count",
    # A paged KV cache's pool and block-table width (serving; no entry point uses them yet).
    "pages": "the KV cache's pages",
    "blocks": "the block table's pages per sequence",
}


class Unbound(Exception):
    """Raised by `SizeExpr.eval` for a variable the environment does not give (None or absent)."""

    def __init__(self, var):
        super().__init__(var)
        self.var = var

    def __str__(self):
        return f"needs {self.var}, {SIZE_VARS[self.var]}, which is not given"


class SizeExpr:
    """A parsed size expression. `eval(env)` returns the value for env = {"B": .., "S": ..,
    "SMs": ..}, or None when an intermediate value leaves the u64 range, and raises Unbound for a
    variable that env lacks or maps to None; `str()` prints it as the Rust side does
    (`ceil(S/126)*2*B`)."""

    __slots__ = ("op", "args")

    def __init__(self, op, args):
        self.op = op
        self.args = args

    def eval(self, env):
        if self.op == "const":
            return self.args[0]
        if self.op == "var":
            value = env.get(self.args[0])
            if value is None:
                raise Unbound(self.args[0])
            return value
        if self.op == "ceil_div":
            value = self.args[0].eval(env)
            return None if value is None else -(-value // self.args[1])
        left, right = (a.eval(env) for a in self.args)
        if left is None or right is None:
            return None
        value = left + right if self.op == "add" else left * right
        return value if value <= U64_MAX else None

    def uses(self, var):
        if self.op == "var":
            return self.args[0] == var
        return any(isinstance(a, SizeExpr) and a.uses(var) for a in self.args)

    def _precedence(self):
        return {"add": 1, "mul": 2}.get(self.op, 3)

    def __str__(self):
        def child(expr, minimum):
            return f"({expr})" if expr._precedence() < minimum else str(expr)

        if self.op in ("const", "var"):
            return str(self.args[0])
        if self.op == "add":
            return f"{child(self.args[0], 1)} + {child(self.args[1], 2)}"
        if self.op == "mul":
            return f"{child(self.args[0], 2)}*{child(self.args[1], 3)}"
        return f"ceil({self.args[0]}/{self.args[1]})"

    def __repr__(self):
        return f"SizeExpr({self})"

    def __eq__(self, other):
        return isinstance(other, SizeExpr) and self.op == other.op and self.args == other.args

    def __hash__(self):
        return hash((self.op, self.args))


def const(value):
    return SizeExpr("const", (value,))


def _is_u64(value):
    # bool is an int subclass in Python but not a JSON integer.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


def parse_size_expr(value, where):
    """Parses the JSON tree `value`; `where` names the field in error messages."""
    if not isinstance(value, dict) or len(value) != 1:
        raise ManifestError(f"{where}: a size expression is an object with one key "
                            f"(const, var, add, mul, ceil_div), got {value!r}")
    (op, arg), = value.items()
    if op == "const":
        if not _is_u64(arg):
            raise ManifestError(f"{where}: const must be an unsigned integer, got {arg!r}")
        return SizeExpr("const", (arg,))
    if op == "var":
        if arg not in SIZE_VARS:
            raise ManifestError(f"{where}: unknown size variable {arg!r}, expected one of "
                                f"{', '.join(SIZE_VARS)}")
        return SizeExpr("var", (arg,))
    if op in ("add", "mul", "ceil_div"):
        if not isinstance(arg, list) or len(arg) != 2:
            raise ManifestError(f"{where}: {op} takes a list of two items, got {arg!r}")
        left = parse_size_expr(arg[0], where)
        if op == "ceil_div":
            if not _is_u64(arg[1]) or arg[1] == 0:
                raise ManifestError(
                    f"{where}: ceil_div's divisor must be a positive integer, got {arg[1]!r}")
            return SizeExpr(op, (left, arg[1]))
        return SizeExpr(op, (left, parse_size_expr(arg[1], where)))
    raise ManifestError(f"{where}: unknown size expression {op!r}, "
                        "expected const, var, add, mul or ceil_div")


def format_shape(shape):
    """`[B, S, 2048]`: shapes of expressions or integers as they appear in messages."""
    return "[" + ", ".join(str(d) for d in shape) + "]"
