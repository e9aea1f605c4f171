"""Irreducible representations of O(3) and direct sums of them ("irreps strings").

An irrep is ``(l, p)``: rotation order ``l >= 0`` (dimension ``2l+1``) and parity ``p = +1``
("e", even) or ``-1`` ("o", odd) under inversion. A feature vector of irreps
``"16x0e + 8x1o"`` is stored flat, block after block, each block ``mul`` copies of the irrep laid
out mul-major: ``[..., mul, 2l+1]`` flattened (the e3nn layout, so features compare directly).

The irreps string is the one contract between layers: every module states the irreps it takes and
gives, and a mismatch fails when the model is built.
"""
from typing import Iterator, List, NamedTuple, Tuple, Union


class Irrep(NamedTuple):
    l: int
    p: int  # +1 even, -1 odd

    @staticmethod
    def parse(s: str) -> "Irrep":
        s = s.strip()
        if len(s) < 2 or s[-1] not in "eo" or not s[:-1].isdigit():
            raise ValueError(f"cannot parse irrep '{s}': expected e.g. '0e', '1o', '2e'")
        return Irrep(int(s[:-1]), 1 if s[-1] == "e" else -1)

    @property
    def dim(self) -> int:
        return 2 * self.l + 1

    def __str__(self) -> str:
        return f"{self.l}{'e' if self.p == 1 else 'o'}"

    def __mul__(self, other: "Irrep") -> Iterator["Irrep"]:  # type: ignore[override]
        """Irreps in the tensor product: l from |l1-l2| to l1+l2, parity p1*p2."""
        for l in range(abs(self.l - other.l), self.l + other.l + 1):
            yield Irrep(l, self.p * other.p)


class MulIrrep(NamedTuple):
    mul: int
    ir: Irrep

    @property
    def dim(self) -> int:
        return self.mul * self.ir.dim

    def __str__(self) -> str:
        return f"{self.mul}x{self.ir}"


class Irreps(tuple):
    """An immutable sequence of :class:`MulIrrep`, parsed from e.g. ``"32x0e + 16x1o + 8x2e"``."""

    def __new__(cls, value: Union[str, "Irreps", List[Tuple[int, Tuple[int, int]]]] = ()):
        if isinstance(value, Irreps):
            return super().__new__(cls, value)
        items: List[MulIrrep] = []
        if isinstance(value, str):
            for term in (t for t in value.split("+") if t.strip()):
                term = term.strip()
                if "x" in term:
                    mul_s, ir_s = term.split("x", 1)
                    if not mul_s.strip().isdigit():
                        raise ValueError(f"cannot parse multiplicity in '{term}'")
                    mul = int(mul_s)
                else:
                    mul, ir_s = 1, term
                items.append(MulIrrep(mul, Irrep.parse(ir_s)))
        else:
            for mul, ir in value:
                items.append(MulIrrep(int(mul), Irrep(*ir)))
        for m in items:
            if m.mul < 0 or m.ir.l < 0 or m.ir.p not in (1, -1):
                raise ValueError(f"invalid irrep block {m}")
        return super().__new__(cls, items)

    @property
    def dim(self) -> int:
        return sum(m.dim for m in self)

    @property
    def num_irreps(self) -> int:
        return sum(m.mul for m in self)

    @property
    def lmax(self) -> int:
        return max((m.ir.l for m in self), default=-1)

    def slices(self) -> List[Tuple[int, int]]:
        """``(start, stop)`` of each block in the flat feature vector."""
        out, start = [], 0
        for m in self:
            out.append((start, start + m.dim))
            start += m.dim
        return out

    def count(self, ir: Irrep) -> int:  # type: ignore[override]
        return sum(m.mul for m in self if m.ir == ir)

    def simplify(self) -> "Irreps":
        """Merge neighbouring blocks of the same irrep and drop empty ones."""
        out: List[Tuple[int, Tuple[int, int]]] = []
        for m in self:
            if m.mul == 0:
                continue
            if out and out[-1][1] == tuple(m.ir):
                out[-1] = (out[-1][0] + m.mul, out[-1][1])
            else:
                out.append((m.mul, tuple(m.ir)))
        return Irreps(out)

    def __add__(self, other) -> "Irreps":
        return Irreps(list(self) + list(Irreps(other)))

    def __str__(self) -> str:
        return " + ".join(str(m) for m in self)

    def __repr__(self) -> str:
        return f"Irreps('{self}')"


def spherical_harmonics_irreps(lmax: int, parity: bool = True) -> Irreps:
    """``1x0e + 1x1o + 1x2e + ...``; with ``parity=False`` (SE(3) mode) every irrep is marked even."""
    return Irreps([(1, (l, (-1) ** l if parity else 1)) for l in range(lmax + 1)])
