"""Reading lowered StableHLO text in tests (what the compiler is handed, checked without a GPU)."""
import re

_CONCAT = re.compile(r"(%[\w#]+) = stablehlo\.concatenate ((?:%[\w#]+, )*%[\w#]+), dim = 0 : .*-> tensor<(\d+)x")


def layer_concatenates(text: str, depth: int) -> list[str]:
    """Result names of the concatenates of ``depth`` operands along axis 0 into a leading axis of
    ``depth``: the transposes of an unrolled DiT's per-layer splits (a stacked array assembled
    from its layers), in program order."""
    return [m.group(1) for m in _CONCAT.finditer(text) if int(m.group(3)) == depth and m.group(2).count("%") == depth]


def barrier_operands(text: str) -> set[str]:
    """Names of every value that feeds an optimization barrier."""
    groups = re.findall(r"stablehlo\.optimization_barrier ([^:]*) :", text)
    return {op.strip() for ops in groups for op in ops.split(",")}
