"""The MuSc settings a scorer is built from (docs/design.md section 16)."""

from __future__ import annotations

from dataclasses import dataclass, field

from filo.errors import FiloError

MIN_SET = 5  # below it the interval average is over int(0.3 (N-1)) = 0 images (NaN maps)
DEFAULT_R = (1, 3, 5)
DEFAULT_RATIO = 0.3
K_LISTS = {"visa": (1, 8, 9)}  # RsCIN k lists by dataset; every other dataset: (1, 2, 3)
DEFAULT_K = (1, 2, 3)


def k_list_for(dataset: str | None) -> tuple[int, ...]:
    """The original's RsCIN k list of ``dataset``."""
    return K_LISTS.get(dataset or "", DEFAULT_K)


def default_layers(depth: int) -> tuple[int, ...]:
    """0-based tapped blocks: the original's (5, 11, 17, 23) for 24 blocks and (2, 5, 8, 11)
    for 12, the same quarter pattern for any depth >= 4."""
    q = depth // 4
    if q < 1:
        raise FiloError(f"MuSc needs a CLIP vision tower of at least 4 blocks, this one has {depth}")
    return tuple(q * i - 1 for i in range(1, 5))


def parse_ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    """``"1,3,5"`` -> (1, 3, 5); None stays None; anything else is one error line."""
    if text is None:
        return None
    try:
        out = tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise FiloError(f"--{flag} {text!r}: give comma-separated integers such as 1,3,5") from None
    if not out:
        raise FiloError(f"--{flag} {text!r}: give at least one integer")
    return out


@dataclass
class MuscSettings:
    """What changes MuSc's maps and scores (the block size changes rounding only)."""

    image_size: int = 518
    layers: tuple[int, ...] | None = None  # 0-based blocks; None: default_layers(depth)
    r_list: tuple[int, ...] = DEFAULT_R
    k_list: tuple[int, ...] = DEFAULT_K  # (0,) disables RsCIN
    ratio: float = DEFAULT_RATIO
    divide: int = 1  # number of mutual-scoring subsets per class
    block: int = 0  # patch rows per side of a distance block (0: msm.BLOCK_ROWS); memory only
    seed: int = 42  # random.seed of the subset split (divide > 1)
    extra: dict = field(default_factory=dict)

    def validate(self, depth: int | None = None) -> None:
        bad = [r for r in self.r_list if r < 1 or r % 2 == 0]
        if bad:
            raise FiloError(f"--musc_r {','.join(map(str, self.r_list))}: the degrees must be "
                            f"odd and >= 1 (an even r shifts the grid)")
        if depth is not None:
            layers = self.layers or default_layers(depth)
            if any(not 0 <= b < depth for b in layers):
                raise FiloError(f"--musc_layers {','.join(map(str, layers))}: 0-based blocks of "
                                f"a {depth}-block tower must be in 0..{depth - 1}")
        if any(k < 0 for k in self.k_list):
            raise FiloError("--musc_k: the RsCIN k values must be >= 0 (0 disables RsCIN)")

    @property
    def rscin(self) -> bool:
        return 0 not in self.k_list

    def min_set(self) -> int:
        """The smallest set the original scores without NaN (or a crash in RsCIN)."""
        return max(MIN_SET, max(self.k_list) if self.rscin else 0)

    def key(self) -> dict:
        return {"image_size": self.image_size, "layers": list(self.layers or ()),
                "r": list(self.r_list), "k": list(self.k_list), "ratio": self.ratio,
                "divide": self.divide, "seed": self.seed}
