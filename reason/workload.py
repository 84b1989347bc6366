"""Generated workloads with exact equivalence classes by construction (no downloads).

A *class* is a base problem: a template and its integer constants.  Its *members* are copies of
it under α-renaming (the variable, the ODE's function, symbolic parameters), affine substitution
of the variable (``u -> a*v + b``, integrals and equations), re-ordering of commutative operands,
scaling of equations and moving terms across ``=``.  Every member of a class has the same answer
up to the recorded renaming and substitution, and members of different classes are different
problems, so the class id is the oracle's key.

:func:`stream` draws a query stream: recurring classes (chosen uniformly from a pool) mixed with
one-off problems, each query a fresh random member, sometimes an exact repeat of an earlier text.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterator

VARS = ("x", "t", "s", "v", "w", "z", "r", "y")
PARAMS = ("a", "b", "k", "m", "p", "q", "alpha", "beta", "g", "h")
FUNCS = ("y", "f", "g", "u", "h", "phi")


@dataclasses.dataclass(frozen=True)
class Query:
    cls: str          # the equivalence class (the oracle's key)
    subgoal: dict     # {"kind", "expr", "var"?, "func"?}
    variant: str      # "rename", "affine", "scaled", "repeat", ...


def _sum(terms: list[list[str]], rng: random.Random, shuffle: bool = True) -> str:
    terms = [list(t) for t in terms]
    if shuffle:
        for t in terms:
            rng.shuffle(t)
        rng.shuffle(terms)
    return " + ".join("*".join(t) for t in terms)


# -- base problems: (kind, template id, constants) -> terms as factor lists over {u} and params ---

INTEGRALS = {
    "pow_sin": lambda c: [[str(c[0]), "{u}**%d" % (1 + c[1] % 2), "sin({u})"]],
    "exp_cos": lambda c: [[str(c[0]), "exp({u})", "cos({u})"]],
    "lin_exp": lambda c: [[str(c[0]), "{u}", "exp({u})"]],
    "atan": lambda c: [[str(c[0]), "1/(1 + {u}**2)"]],
    "poly_params": lambda c: [["{p0}", "{u}**%d" % (2 + c[1] % 3)], ["{p1}", "{u}"], [str(c[0])]],
    "sq_exp": lambda c: [[str(c[0]), "{u}**2", "exp({u})"]],
    "log": lambda c: [[str(c[0]), "log({u})"]],
    "sin_cos": lambda c: [[str(c[0]), "sin({u})", "cos({u})**%d" % (1 + c[1] % 2)]],
}
EQUATIONS = {
    "quadratic": lambda c: [["{u}**2"], [str(c[0]), "{u}"], [str(-c[1] - 1)]],
    "cubic_param": lambda c: [["{u}**3"], ["-{p0}**%d" % (1 + c[1] % 2), "{u}"]],
    "product": lambda c: [["({u} - %d)" % c[0], "({u} + %d)" % (c[1] + 1)]],
}
SIMPLIFY = {
    "diff_squares": lambda c: [["({p0}**2 - %d*{p1}**2)/({p0} - %d*{p1})" % (c[0] ** 2, c[0])]],
    "trig": lambda c: [["sin({p0})**2"], ["cos({p0})**2"], [str(c[0]), "{p1}**%d" % (1 + c[1] % 3)]],
    "rational": lambda c: [["({p0}**2 + %d*{p0})/({p0} + %d)" % (c[0], c[0])], ["{p1}"]],
}
ODES = {
    "oscillator": lambda c: ([["{f}''"], [str(c[0] ** 2), "{f}"]], [[str(c[1] + 1), "sin({x})"]]),
    "decay": lambda c: ([["{f}'"], [str(c[0]), "{f}"]], [[str(c[1] + 1), "exp({x})"]]),
    "damped": lambda c: ([["{f}''"], [str(2 * c[0]), "{f}'"], [str(c[0] ** 2), "{f}"]], [["0"]]),
}
FAMILIES = {"integrate": INTEGRALS, "solve": EQUATIONS, "simplify": SIMPLIFY, "dsolve": ODES}


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    pool = [p for p in PARAMS if p not in taken]
    return rng.sample(pool, n)


def member(kind: str, template: str, consts: tuple[int, int], rng: random.Random, *,
           affine: bool | None = None) -> tuple[dict, str]:
    """A random member of the class ``(kind, template, consts)``: ``(subgoal, variant)``."""
    fam = FAMILIES[kind][template]
    if kind == "dsolve":
        var, fn = rng.choice(VARS[:6]), rng.choice(FUNCS)
        while fn == var:
            fn = rng.choice(FUNCS)
        lhs, rhs = fam(consts)
        scale = rng.choice((1, 1, 2, 3))
        if scale != 1:
            lhs = [[str(scale)] + t for t in lhs]
            rhs = [[str(scale)] + t for t in rhs]
        text = f"{_sum(lhs, rng)} = {_sum(rhs, rng)}".replace("{f}", fn).replace("{x}", var)
        return {"kind": kind, "expr": text, "var": var, "func": fn}, "rename+scale" if scale != 1 else "rename"
    var = rng.choice(VARS)
    p = _names(rng, 2, {var})
    use_affine = (kind in ("integrate", "solve")) and (rng.random() < 0.5 if affine is None else affine)
    if use_affine:
        a, b = rng.randint(2, 7), rng.choice([i for i in range(-6, 7) if i])
        u = f"({a}*{var} {'+' if b > 0 else '-'} {abs(b)})"
    else:
        u = var
    terms = fam(consts)
    fill = lambda s: s.replace("{u}", u).replace("{p0}", p[0]).replace("{p1}", p[1])  # noqa: E731
    variant = "affine" if use_affine else "rename"
    if kind == "solve":
        scale = rng.choice((1, 2, 3))
        if scale != 1:
            terms = [[str(scale)] + t for t in terms]
            variant += "+scale"
        moved = [t for t in terms if rng.random() < 0.3 and len(terms) > 1]
        kept = [t for t in terms if t not in moved] or terms[:1]
        moved = [t for t in terms if t not in kept]
        rhs = " + ".join("-" + "*".join(t) for t in moved) if moved else "0"
        return {"kind": kind, "expr": fill(f"{_sum(kept, rng)} = {rhs}"), "var": var}, variant
    expr = fill(_sum(terms, rng))
    return ({"kind": kind, "expr": expr, "var": var} if kind == "integrate" else {"kind": kind, "expr": expr}), variant


def class_id(kind: str, template: str, consts: tuple[int, int]) -> str:
    """The class's identity: its kind and the template's terms filled with the constants (two
    constant pairs that give the same terms are the same class)."""
    return f"{kind}:{FAMILIES[kind][template](consts)!r}"


def classes(rng: random.Random, n: int, kinds: tuple[str, ...] = ("integrate", "solve", "simplify", "dsolve")
            ) -> list[tuple[str, str, tuple[int, int]]]:
    """``n`` distinct classes ``(kind, template, consts)``."""
    out: set[tuple[str, str, tuple[int, int]]] = set()
    while len(out) < n:
        kind = rng.choice(kinds)
        template = rng.choice(sorted(FAMILIES[kind]))
        out.add((kind, template, (rng.randint(2, 9), rng.randint(0, 5))))
    return sorted(out)


def stream(seed: int, n: int, *, pool: int = 40, p_new: float = 0.15, p_repeat: float = 0.1,
           kinds: tuple[str, ...] = ("integrate", "solve", "simplify", "dsolve")) -> Iterator[Query]:
    """``n`` queries: with probability ``p_new`` a one-off problem (its class never recurs), else
    a member of one of ``pool`` recurring classes; with probability ``p_repeat`` a recurring
    query repeats an earlier text of its class exactly."""
    rng = random.Random(seed)
    recurring = classes(rng, pool, kinds)
    seen_text: dict[str, list[dict]] = {}
    for _ in range(n):
        if rng.random() < p_new:
            kind = rng.choice(kinds)
            template = rng.choice(sorted(FAMILIES[kind]))
            consts = (rng.randint(11, 60), rng.randint(6, 60))  # outside the recurring range
            sg, variant = member(kind, template, consts, rng)
            yield Query(class_id(kind, template, consts), sg, "one-off")
            continue
        kind, template, consts = rng.choice(recurring)
        cls = class_id(kind, template, consts)
        earlier = seen_text.get(cls)
        if earlier and rng.random() < p_repeat:
            yield Query(cls, dict(rng.choice(earlier)), "repeat")
            continue
        sg, variant = member(kind, template, consts, rng)
        seen_text.setdefault(cls, []).append(sg)
        yield Query(cls, sg, variant)
