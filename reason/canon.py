"""Canonical forms of subgoals, so that renamed, re-ordered and affinely substituted copies of one
problem get one key, and an answer stored under the key translates back to each query exactly.

A *subgoal* is a map ``{"kind", "expr", "var"?, "func"?}``:

========== ==================================================================================
kind       meaning
========== ==================================================================================
integrate  an antiderivative of ``expr`` in ``var``
solve      the solutions for ``var`` of ``expr`` (``"lhs = rhs"`` or an expression ``= 0``)
simplify   a simpler expression equal to ``expr`` (every symbol is a parameter)
dsolve     the general solution ``func(var)`` of the ODE ``expr`` (``y'' + 4*y = sin(x)``)
========== ==================================================================================

The canonical form, in order:

1. **Bounded parse.**  The text is checked against the accepted language (digits, operators,
   parentheses, a fixed set of function names, symbol names) and parsed unevaluated; size bounds
   (characters, nodes, depth, integer digits, literal exponents, expanded-term count, symbols) are
   checked before anything is evaluated, and the whole canonicalisation runs under a time limit.
2. **Affine substitution** (``integrate``, ``solve``): the variable is replaced by ``u`` through
   each affine map ``u = a*var + b`` that occurs in the query as a maximal linear sub-expression
   (``a``, ``b`` free of ``var``; ``var`` itself when it also occurs outside them), and the map
   giving the least canonical form is kept; ``∫ f(a x + b) dx`` is keyed as ``∫ f(u) du`` with ``(a, b)`` recorded, and
   the answer maps back as ``F(x) = G(a x + b) / a`` (for ``solve``: ``x = (u* - b) / a``).
3. **Normal form**: expanded, with rational functions cancelled to ``p/q`` (expanded ``p``,
   ``q``); commutative operands are ordered by SymPy's canonical argument order.  ``solve``
   equations polynomial in the variable are made monic; ODEs are divided by the coefficient of the
   highest derivative.
4. **α-renaming**: the variable becomes ``x``, the unknown function ``f``, the parameters
   ``c0, c1, ...``, choosing among parameter orders the one whose printed normal form is least;
   the order is exhaustive up to :data:`MAX_ORDERINGS` candidates (beyond that, symbols are ordered
   by a renaming-invariant signature and the key may differ between equivalent inputs: a miss,
   never a wrong hit).

The key is a BLAKE2b hash of the kind and the canonical form's ``srepr``.  :class:`Canon` keeps the
mapping, so :meth:`Canon.to_query` translates a canonical answer into the query's own symbols and
:meth:`Canon.to_canonical` the other way.

Everything here is pure: no I/O, no global state except SymPy's own caches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import keyword
import math
import re
import signal
import threading
import time
from typing import Any, Iterator

import sympy as sp
from sympy.parsing.sympy_parser import convert_xor, parse_expr, standard_transformations

from reason.errors import ParseError, TimeLimit, TooLarge, Unsupported, VerifierRejected

# -- bounds ---------------------------------------------------------------------------------------

#: Longest accepted expression text, characters.
MAX_CHARS = 2000
#: Most nodes of the parsed (unevaluated) expression tree.
MAX_NODES = 600
#: Deepest nesting of the parsed tree.
MAX_DEPTH = 40
#: Most decimal digits of an integer literal.
MAX_INT_DIGITS = 40
#: Largest absolute value of a literal integer exponent.
MAX_EXPONENT = 64
#: Most terms the expanded normal form may have (bounded before expanding).
MAX_TERMS = 2000
#: Most distinct symbols in one subgoal.
MAX_SYMBOLS = 8
#: Most parameter orders tried for the α-renaming.
MAX_ORDERINGS = 120
#: Wall-time bound of one canonicalisation, seconds (enforced in the main thread).  A service runs
#: it on its event-loop thread, so it stays below the kernel's default liveness window (3 s).
CANON_SECONDS = 1.0

KINDS = ("integrate", "solve", "simplify", "dsolve")

#: Functions accepted in queries.
QUERY_FUNCTIONS = ("sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh",
                   "tanh", "asinh", "acosh", "atanh", "exp", "log", "sqrt", "Abs")
#: Further names an answer (an artifact) may contain.
ARTIFACT_FUNCTIONS = ("erf", "erfc", "erfi", "Si", "Ci", "Shi", "Chi", "Ei", "li", "gamma",
                      "uppergamma", "lowergamma", "polylog", "LambertW", "atan2", "sign", "Piecewise",
                      "Ne", "Eq", "And", "Or", "Not", "re", "im", "arg", "Heaviside", "fresnels",
                      "fresnelc", "besselj", "bessely", "hyper", "exp_polar", "meijerg", "Integral")
CONSTANTS = {"pi": sp.pi, "E": sp.E, "I": sp.I, "oo": sp.oo}
_LITERALS = ("True", "False")

_QUERY_CHARS = re.compile(r"[A-Za-z0-9\s+\-*/^().,=']*")
_ARTIFACT_CHARS = re.compile(r"[A-Za-z0-9_\s+\-*/^().,=<>!]*")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYMBOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,15}")
_PRIMES = re.compile(r"([A-Za-z][A-Za-z0-9]*)('+)")
_CONSTANT_NAME = re.compile(r"C[0-9]+")

_TRANSFORMS = standard_transformations + (convert_xor,)
_GLOBALS: dict[str, Any] = {"Integer": sp.Integer, "Float": sp.Float, "Rational": sp.Rational,
                            "Symbol": sp.Symbol, "Function": sp.Function, "Add": sp.Add, "Mul": sp.Mul,
                            "Pow": sp.Pow, "Tuple": sp.Tuple}
for _name in QUERY_FUNCTIONS + ARTIFACT_FUNCTIONS:
    _GLOBALS[_name] = getattr(sp, _name)

#: Canonical names.
VAR = sp.Symbol("x")
FUNC = sp.Function("f")
_U = sp.Dummy("u")  # the affine variable; never equal to a query symbol


def param(i: int) -> sp.Symbol:
    return sp.Symbol(f"c{i}")


# -- time bound -----------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float, what: str = "canonicalisation") -> Iterator[None]:
    """Raise :class:`TimeLimit` in the block after ``seconds`` of this process's **CPU time**.

    Uses ``SIGPROF`` (``setitimer(ITIMER_PROF)``: user and system time of the process), so it
    bounds pure-Python work such as SymPy's by the work done, not by how busy the machine is --
    on a loaded machine a wall-clock bound turned provable answers into refusals, and tests into
    luck (issue 25).  Past the deadline it raises again every quarter of the bound (at least 5 ms)
    until the block is left, so a handler that swallows one TimeLimit does not lift the bound.  It
    applies only in the main thread (elsewhere the size bounds alone hold).  Nested limits keep the
    earlier deadline."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_left = signal.getitimer(signal.ITIMER_PROF)[0]
    if previous_left and previous_left <= seconds:
        yield  # an outer limit fires first
        return

    def expire(signum, frame):  # noqa: ARG001
        raise TimeLimit(f"{what} exceeded {seconds:g} s")

    old = signal.signal(signal.SIGPROF, expire)
    started = time.process_time()
    # repeating: SymPy swallows exceptions in places (``except Exception``), and a one-shot timer
    # whose TimeLimit was caught there never fired again -- the work then ran unbounded (a burner
    # run of the suite caught a 20 ms bound not raising at all)
    signal.setitimer(signal.ITIMER_PROF, seconds, max(0.005, seconds / 4))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)
        if previous_left:
            signal.setitimer(signal.ITIMER_PROF, max(1e-3, previous_left - (time.process_time() - started)))


# -- bounded parsing ------------------------------------------------------------------------------


def _check_tree(expr: sp.Basic) -> None:
    """Node, depth, digit and exponent bounds on an unevaluated tree."""
    nodes = 0
    stack: list[tuple[sp.Basic, int]] = [(expr, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise TooLarge(f"expression has more than {MAX_NODES} nodes")
        if depth > MAX_DEPTH:
            raise TooLarge(f"expression nests deeper than {MAX_DEPTH}")
        if isinstance(node, sp.Rational):
            if max(len(str(abs(node.p))), len(str(node.q))) > MAX_INT_DIGITS:
                raise TooLarge(f"integer literal longer than {MAX_INT_DIGITS} digits")
        elif isinstance(node, sp.Pow):
            exp = node.args[1]
            if not exp.free_symbols:
                # rational arithmetic (``1/2``, ``-3/4``: a division is a power -1) is a literal;
                # any other power inside a numeric exponent is a tower
                if any(isinstance(a, sp.Pow) and a.args[1] != -1 for a in sp.preorder_traversal(exp)):
                    raise TooLarge("a numeric exponent must be a literal, not a power tower")
                for num in (a for a in sp.preorder_traversal(exp) if isinstance(a, sp.Rational)):
                    if abs(num) > MAX_EXPONENT:
                        raise TooLarge(f"exponent {num} past the bound {MAX_EXPONENT}")
        if hasattr(node, "args"):
            stack.extend((a, depth + 1) for a in node.args)


def _terms_bound(expr: sp.Basic) -> int:
    """An upper bound on the number of terms of ``expand(expr)`` (computed without expanding)."""
    if isinstance(expr, sp.Add):
        return sum(_terms_bound(a) for a in expr.args)
    if isinstance(expr, sp.Mul):
        out = 1
        for a in expr.args:
            out *= _terms_bound(a)
            if out > MAX_TERMS:
                return out
        return out
    if isinstance(expr, sp.Pow) and isinstance(expr.args[1], sp.Integer) and expr.args[1] > 0:
        t = _terms_bound(expr.args[0])
        n = int(expr.args[1])
        return math.comb(n + t - 1, t - 1) if t > 1 else 1
    if isinstance(expr, sp.Pow) and isinstance(expr.args[1], sp.Integer) and expr.args[1] < 0:
        return _terms_bound(sp.Pow(expr.args[0], -expr.args[1], evaluate=False))
    return 1


def _parse_expr(text: str, local: dict[str, Any], *, evaluate: bool) -> sp.Basic:
    """SymPy's parser over the bound names only; any failure is :class:`ParseError`."""
    try:
        out = parse_expr(text, local_dict=local, global_dict=dict(_GLOBALS), transformations=_TRANSFORMS,
                         evaluate=evaluate)
    except TimeLimit:
        raise
    except (SyntaxError, TypeError, ValueError, AttributeError, NameError, ZeroDivisionError, TokenError_,
            RecursionError) as exc:
        raise ParseError(f"cannot {'evaluate' if evaluate else 'parse'} {text[:60]!r}: {type(exc).__name__}") from None
    if not isinstance(out, sp.Basic):
        raise ParseError(f"{text[:60]!r} is not a single expression")
    return out


def parse(text: Any, *, names: dict[str, Any] | None = None, artifact: bool = False, raw: list | None = None) -> sp.Expr:
    """Parse ``text`` of the accepted language, with every bound checked before evaluation.

    ``names`` maps identifiers to prepared objects (the ODE's function); other identifiers
    become plain symbols.  ``artifact=True`` accepts the larger vocabulary of answers."""
    if not isinstance(text, str):
        raise ParseError(f"an expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise TooLarge(f"expression longer than {MAX_CHARS} characters")
    if not text.strip():
        raise ParseError("empty expression")
    if not (_ARTIFACT_CHARS if artifact else _QUERY_CHARS).fullmatch(text):
        bad = next(ch for ch in text if not (_ARTIFACT_CHARS if artifact else _QUERY_CHARS).fullmatch(ch))
        raise ParseError(f"character {bad!r} is not accepted")
    if "**" in text.replace(" ", "") and re.search(r"\*\*\s*\*", text):
        raise ParseError("malformed power")
    allowed_functions = QUERY_FUNCTIONS + (ARTIFACT_FUNCTIONS if artifact else ())
    local: dict[str, Any] = {}
    for ident in set(_IDENT.findall(text)):
        if names and ident in names:
            local[ident] = names[ident]
        elif ident in allowed_functions:
            local[ident] = getattr(sp, ident)
        elif ident in CONSTANTS:
            local[ident] = CONSTANTS[ident]
        elif artifact and ident in _LITERALS:
            continue
        elif keyword.iskeyword(ident) or ident.startswith("_") or not _SYMBOL_NAME.fullmatch(ident):
            raise ParseError(f"name {ident!r} is not accepted")
        elif ident in _GLOBALS or hasattr(sp, ident) and ident[0].isupper() and not _CONSTANT_NAME.fullmatch(ident):
            raise ParseError(f"name {ident!r} is reserved")
        else:
            local[ident] = sp.Symbol(ident)
    unevaluated = _parse_expr(text, local, evaluate=False)
    _check_tree(unevaluated)
    if raw is not None:
        raw.append(unevaluated)
    expr = _parse_expr(text, local, evaluate=True)
    if expr.has(sp.zoo, sp.nan):
        raise ParseError(f"{text[:60]!r} is undefined (division by zero)")
    return expr


try:  # tokenize's error type, raised by parse_expr for unbalanced input
    from tokenize import TokenError as TokenError_
except ImportError:  # pragma: no cover
    TokenError_ = SyntaxError  # type: ignore[misc,assignment]


# -- normal form ----------------------------------------------------------------------------------


def normal_form(expr: sp.Expr) -> sp.Expr:
    """Expanded; a rational function as ``expand(p) / expand(q)`` with common factors cancelled."""
    if _terms_bound(expr) > MAX_TERMS:
        raise TooLarge(f"the expanded form would have more than {MAX_TERMS} terms")
    together = sp.together(expr)
    num, den = sp.fraction(together)
    if den.free_symbols:
        num, den = sp.fraction(sp.cancel(together))
        return sp.expand(num) / sp.expand(den)
    return sp.expand(expr)


# -- affine substitution --------------------------------------------------------------------------


def affine_candidates(expr: sp.Expr, x: sp.Symbol) -> list[tuple[sp.Expr, sp.Expr]]:
    """The distinct affine maps ``(a, b)`` of ``x`` that appear in ``expr`` as written: sums
    ``a*x + b`` (``a``, ``b`` free of ``x``; not ``x`` itself) that are an operand of a product, a
    power or a function (not a summand, not the whole), plus ``x`` itself when it also occurs
    outside them.  Empty when there is no such sum (nothing to normalise)."""
    found: set[tuple[sp.Expr, sp.Expr]] = set()
    bare = False
    stack: list[tuple[sp.Expr, bool]] = [(expr, False)]
    while stack:
        node, grouped = stack.pop()
        if node == x:
            bare = True
            continue
        if not node.has(x):
            continue
        if grouped and isinstance(node, sp.Add) and node.is_polynomial(x) and sp.degree(node, x) == 1:
            a, b = sp.Poly(node, x).all_coeffs()
            if not a.has(x) and not b.has(x) and a != 0 and (a, b) != (1, 0):
                found.add((a, b))
                continue
        stack.extend((arg, not isinstance(node, sp.Add)) for arg in node.args)
    if not found:
        return []
    if bare:
        found.add((sp.Integer(1), sp.Integer(0)))
    return sorted(found, key=sp.default_sort_key)


# -- the canonical form ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Canon:
    """A subgoal's canonical form and the way back to the query.

    ``form``: the canonical expression (canonical symbols); ``rename``: canonical symbol name ->
    the query's expression (a symbol, or the query's function for ``f``); ``affine``: ``(a, b)``
    in the query's symbols when the variable was substituted, else ``None``."""

    kind: str
    key: str
    form: sp.Expr
    rename: dict[str, sp.Basic]
    affine: tuple[sp.Expr, sp.Expr] | None
    var: sp.Symbol | None
    query: sp.Expr
    #: ``1/g`` and ``log(g)`` for every denominator and logarithm ``g`` of the query as written
    #: (before SymPy's evaluation cancelled any): a solution where one is undefined is none.
    domain: tuple[sp.Expr, ...] = ()

    @property
    def text(self) -> str:
        return sp.sstr(self.form)

    def _to_query_syms(self, expr: sp.Expr) -> sp.Expr:
        subs = {sp.Symbol(k): v for k, v in self.rename.items() if k != "f"}
        return expr.xreplace(subs)

    def _to_canon_syms(self, expr: sp.Expr) -> sp.Expr:
        subs = {v: sp.Symbol(k) for k, v in self.rename.items() if k != "f" and isinstance(v, sp.Symbol)}
        return expr.xreplace(subs)

    def to_query(self, answer: Any) -> Any:
        """The canonical ``answer`` (an expression, or a list of solutions) in the query's symbols."""
        if self.kind == "solve":
            return [self._sol_to_query(s) for s in answer]
        if self.kind == "integrate" and self.affine is not None:
            a, b = self.affine
            x = self.var
            g = answer.xreplace({VAR: _U})
            g = self._to_query_syms(g)
            return g.xreplace({_U: a * x + b}) / a
        return self._to_query_syms(answer)

    def form_in_query(self) -> sp.Expr:
        """The canonical form in the query's symbols (the affine map applied): equal to the
        query's expression wherever that is defined (``integrate``: ``f(x) = F(a x + b)``)."""
        form = self._to_query_syms(self.form.xreplace({VAR: _U}))
        if self.affine is not None:
            a, b = self.affine
            return form.xreplace({_U: a * self.var + b})
        return form.xreplace({_U: self.var}) if self.var is not None else form

    def _sol_to_query(self, sol: sp.Expr) -> sp.Expr:
        if self.affine is None:
            return self._to_query_syms(sol)
        a, b = self.affine
        s = self._to_query_syms(sol.xreplace({VAR: _U}))
        return (s - b) / a

    def query_symbols(self) -> set[sp.Symbol]:
        """The symbols a query-side answer may use: the query's own (and, for an ODE, its
        integration constants ``C1, C2, ...``)."""
        return set(self.query.free_symbols) | ({self.var} if self.var is not None else set())

    def check_symbols(self, answer: Any) -> None:
        """Refuse an answer that uses a symbol the query does not have: renaming it into
        canonical symbols could capture it (an answer in ``c0`` for a query without ``c0``)."""
        exprs = list(answer) if isinstance(answer, (list, tuple)) else [answer]
        allowed = self.query_symbols()
        extra = set().union(*(e.free_symbols for e in exprs)) - allowed if exprs else set()
        if self.kind == "dsolve":
            extra = {s for s in extra if not _CONSTANT_NAME.fullmatch(s.name)}
        if extra:
            names = ", ".join(sorted(s.name for s in extra))
            raise VerifierRejected(f"the answer uses symbol(s) {names} that the subgoal does not have")

    def to_canonical(self, answer: Any) -> Any:
        """A query-side ``answer`` in canonical symbols (the inverse of :meth:`to_query`); refuses
        an answer with symbols the query does not have (:meth:`check_symbols`)."""
        self.check_symbols(answer)
        if self.kind == "solve":
            out = []
            for s in answer:
                if self.affine is not None:
                    a, b = self.affine
                    s = a * s + b
                out.append(self._to_canon_syms(s))
            return out
        if self.kind == "integrate" and self.affine is not None:
            a, b = self.affine
            x = self.var
            # F(x) = G(a x + b) / a  =>  G(u) = a F((u - b) / a)
            g = (a * answer).xreplace({x: (_U - b) / a})
            return self._to_canon_syms(g).xreplace({_U: VAR})
        return self._to_canon_syms(answer)


def _key(kind: str, form: sp.Expr) -> str:
    return hashlib.blake2b(f"{kind}|{sp.srepr(form)}".encode(), digest_size=16).hexdigest()


def _signature(expr: sp.Expr, s: sp.Symbol) -> tuple:
    """A renaming-invariant signature of symbol ``s`` in ``expr`` (to order symbols when the
    exhaustive search is too large)."""
    terms = sp.Add.make_args(sp.numer(expr))
    degs = sorted(sp.degree(t, s) if t.is_polynomial(s) else -1 for t in terms if t.has(s))
    return (len(degs), tuple(degs), sp.count_ops(expr.diff(s)) if len(terms) < 50 else 0)


def _orderings(expr: sp.Expr, params: list[sp.Symbol]) -> Iterator[tuple[sp.Symbol, ...]]:
    if math.factorial(len(params)) <= MAX_ORDERINGS:
        yield from itertools.permutations(params)
        return
    sig = {p: _signature(expr, p) for p in params}
    ordered = sorted(params, key=lambda p: (sig[p], p.name))
    groups = [list(g) for _, g in itertools.groupby(ordered, key=lambda p: sig[p])]
    count = math.prod(math.factorial(len(g)) for g in groups)
    if count > MAX_ORDERINGS:
        yield tuple(ordered)  # not exhaustive: equivalent inputs may get different keys (a miss)
        return
    for combo in itertools.product(*(itertools.permutations(g) for g in groups)):
        yield tuple(itertools.chain.from_iterable(combo))


def _rename(expr: sp.Expr, var: sp.Symbol | None, extra: dict[sp.Basic, sp.Basic]) -> tuple[sp.Expr, dict[str, sp.Basic]]:
    """The α-renaming with the least printed form; returns it and canonical name -> query symbol."""
    params = sorted((s for s in expr.free_symbols if s != var and isinstance(s, sp.Symbol)), key=lambda s: s.name)
    if len(params) + (var is not None) > MAX_SYMBOLS:
        raise TooLarge(f"more than {MAX_SYMBOLS} symbols")
    best: tuple[int, str, sp.Expr, dict[str, sp.Basic]] | None = None
    for order in _orderings(expr, params):
        mapping: dict[sp.Basic, sp.Basic] = dict(extra)
        if var is not None:
            mapping[var] = VAR
        mapping.update({p: param(i) for i, p in enumerate(order)})
        form = expr.xreplace(mapping)
        printed = sp.srepr(form)
        if best is None or (len(printed), printed) < best[:2]:
            back = {str(v) if isinstance(v, sp.Symbol) else "f": k for k, v in mapping.items()}
            best = (len(printed), printed, form, back)
    assert best is not None
    return best[2], best[3]


def _subgoal_fields(subgoal: Any) -> tuple[str, str, str | None, str | None]:
    if not isinstance(subgoal, dict):
        raise ParseError("a subgoal is a map {kind, expr, var?, func?}")
    kind = subgoal.get("kind")
    if kind not in KINDS:
        raise Unsupported(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    expr = subgoal.get("expr")
    if not isinstance(expr, str):
        raise ParseError("expr must be a string")
    var = subgoal.get("var")
    func = subgoal.get("func")
    if kind == "simplify":
        var = None
    else:
        var = "x" if var is None else var
        if not isinstance(var, str) or not _SYMBOL_NAME.fullmatch(var) or var in QUERY_FUNCTIONS or var in CONSTANTS:
            raise ParseError(f"var must be a symbol name, got {var!r}")
    if kind == "dsolve":
        func = "y" if func is None else func
        if not isinstance(func, str) or not _SYMBOL_NAME.fullmatch(func) or func == var or func in QUERY_FUNCTIONS:
            raise ParseError(f"func must be a name other than the variable, got {func!r}")
    return kind, expr, var, func


def _equation(text: str, names: dict[str, Any] | None = None, raw: list | None = None) -> sp.Expr:
    if text.count("=") > 1:
        raise ParseError("at most one '=' in an equation")
    if "=" in text:
        lhs, rhs = text.split("=")
        return parse(lhs, names=names, raw=raw) - parse(rhs, names=names, raw=raw)
    return parse(text, names=names, raw=raw)


def parse_subgoal(subgoal: Any, raw: list | None = None) -> tuple[str, sp.Expr, sp.Symbol | None, Any]:
    """``(kind, expression, variable, function)`` of a subgoal in the query's own symbols; for
    ``dsolve`` the expression holds ``func(var)`` and its derivatives.  ``raw`` collects the
    unevaluated trees as written."""
    kind, text, var_name, func_name = _subgoal_fields(subgoal)
    var = sp.Symbol(var_name) if var_name else None
    if kind == "dsolve":
        fn = sp.Function(func_name)
        names: dict[str, Any] = {func_name: fn(var), var_name: var}

        def prime(m: re.Match) -> str:
            if m.group(1) != func_name:
                raise ParseError(f"primes only follow the function {func_name!r}")
            name = f"D{len(m.group(2))}{func_name}"
            names[name] = sp.Derivative(fn(var), (var, len(m.group(2))))
            return name

        if _CONSTANT_NAME.search(text):
            raise ParseError("names C1, C2, ... are the ODE's integration constants")
        rewritten = _PRIMES.sub(prime, text)
        if "'" in rewritten:
            raise ParseError("a prime must follow the function name")
        expr = _equation(rewritten, names)
        if not expr.has(sp.Derivative):
            raise Unsupported("an ODE needs a derivative of the function")
        return kind, expr, var, fn
    if "'" in text:
        raise ParseError("primes are only accepted in ODEs")
    if kind == "solve":
        expr = _equation(text, raw=raw)
        if var not in expr.free_symbols:
            raise Unsupported(f"the equation does not contain {var_name!r}")
        return kind, expr, var, None
    if "=" in text:
        raise ParseError(f"{kind} takes an expression, not an equation")
    return kind, parse(text, raw=raw), var, None


def canonicalise(subgoal: Any, *, seconds: float = CANON_SECONDS) -> Canon:
    """The canonical form of ``subgoal``; raises :class:`ParseError`, :class:`TooLarge`,
    :class:`TimeLimit` or :class:`Unsupported` (all :class:`reason.errors.ReasonError`)."""
    with time_limit(seconds):
        try:
            return _canonicalise(subgoal)
        except RecursionError:
            raise TooLarge("expression too deep to canonicalise") from None


def _canonicalise(subgoal: Any) -> Canon:
    written: list[sp.Expr] = []
    kind, expr, var, fn = parse_subgoal(subgoal, written)
    query = expr
    extra: dict[sp.Basic, sp.Basic] = {}
    if kind == "dsolve":
        orders = [d.derivative_count for d in expr.atoms(sp.Derivative)]
        top = sp.Derivative(fn(var), (var, max(orders)))
        lead = sp.expand(expr).coeff(top)
        if lead == 0 or lead.has(fn(var)) or lead.has(sp.Derivative):
            raise Unsupported("the highest derivative must appear linearly")
        expr = normal_form(expr / lead)
        extra[fn(var)] = FUNC(VAR)
        form, back = _rename(expr, var, extra)
        return Canon(kind, _key(kind, form), form, back, None, var, query)
    if kind == "simplify":
        form, back = _rename(normal_form(expr), None, extra)
        return Canon(kind, _key(kind, form), form, back, None, var, query)
    # integrate, solve: the least form over the affine maps of the variable found in the query
    # (the identity when the variable only occurs bare)
    best: tuple[int, str, sp.Expr, dict, tuple | None] | None = None
    # candidates come from the tree as written (evaluation distributes numeric factors over sums)
    candidates = sorted(set().union(*(affine_candidates(w, var) for w in written)), key=sp.default_sort_key)
    for a, b in candidates or [(sp.Integer(1), sp.Integer(0))]:
        substituted = expr.xreplace({var: (_U - b) / a}) if (a, b) != (1, 0) else expr.xreplace({var: _U})
        if len(substituted.free_symbols) > MAX_SYMBOLS:
            raise TooLarge(f"more than {MAX_SYMBOLS} symbols")
        nf = normal_form(substituted)
        for scaled in (_equation_forms(nf, _U) if kind == "solve" else [nf]):
            form, back = _rename(scaled, _U, {})
            printed = sp.srepr(form)
            if best is None or (len(printed), printed) < best[:2]:
                best = (len(printed), printed, form, back, None if (a, b) == (1, 0) else (a, b))
    assert best is not None
    _, _, form, back, affine = best
    back["x"] = var
    domain = [1 / n.base if isinstance(n, sp.Pow) else sp.log(n.args[0]) for w in written for n in sp.preorder_traversal(w)
              if (isinstance(n, sp.Pow) and n.exp.is_negative and n.base.has(var)) or (isinstance(n, sp.log) and n.args[0].has(var))]
    return Canon(kind, _key(kind, form), form, back, affine, var, query, tuple(dict.fromkeys(domain)))


def _monic(expr: sp.Expr, x: sp.Symbol) -> sp.Expr:
    """``expr = 0`` with the same solutions and a leading coefficient 1 in ``x`` (polynomials:
    the numerator made monic; others unchanged)."""
    num, den = sp.fraction(expr)
    if den.has(x) or not num.is_polynomial(x) or not num.has(x):
        return expr
    lead = sp.Poly(num, x).LC()
    if lead == 0 or lead == 1:
        return num
    return sp.expand(num / lead)


#: Most terms of an equation whose scalings are tried (one candidate per term).
MAX_SCALINGS = 12


def _equation_forms(expr: sp.Expr, x: sp.Symbol) -> list[sp.Expr]:
    """The forms of ``expr = 0`` among which the least is the key: a polynomial equation made
    monic; any other equation divided by the numeric coefficient of each of its numerator's terms
    in turn (a set of forms that is the same for every non-zero numeric multiple of the equation,
    so ``2*exp(x) = 10``, ``exp(x) = 5`` and ``5 = exp(x)`` share a key)."""
    monic = _monic(expr, x)
    if monic is not expr:
        return [monic]
    num, den = sp.fraction(expr)
    terms = sp.Add.make_args(sp.expand(num))
    if len(terms) > MAX_SCALINGS:
        return [expr]
    coefs = {t.as_coeff_Mul()[0] for t in terms}
    return [sp.expand(num / c) / den for c in sorted(coefs, key=sp.default_sort_key) if c != 0] or [expr]


def key_of(subgoal: Any) -> str:
    return canonicalise(subgoal).key


def to_text(expr: Any) -> Any:
    """Printed form of an answer (an expression or a list of them), parseable by :func:`parse`
    with ``artifact=True``."""
    if isinstance(expr, (list, tuple)):
        return [sp.sstr(e) for e in expr]
    return sp.sstr(expr)


def artifact_from_text(kind: str, text: Any, canon: Canon | None = None) -> Any:
    """Parse a printed answer; ``solve`` answers are lists of expressions.  With ``canon`` the
    query's own symbol names resolve to the same symbols (ODE constants stay ``C1, C2, ...``)."""
    if kind == "solve":
        if not isinstance(text, (list, tuple)) or len(text) > 64:
            raise ParseError("a solve answer is a list of at most 64 expressions")
        return [parse(t, artifact=True) for t in text]
    return parse(text, artifact=True)
