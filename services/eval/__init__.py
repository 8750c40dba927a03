"""Quality yardsticks: does a generated picture show what its prompt says (issue 19).

`ditmesh.eval.yardstick` scores pictures of ditmesh.shapes against their captions; the
names are re-exported here so callers write `from ditmesh.eval import score`.
"""

from ditmesh.eval.yardstick import (
    ATTRIBUTES,
    Detection,
    Found,
    detect,
    evaluate,
    score,
    summarise,
)

__all__ = ["ATTRIBUTES", "Detection", "Found", "detect", "evaluate", "score", "summarise"]
