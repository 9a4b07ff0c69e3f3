"""PA implementations of aten ops, one file per op family, all registered in one table
(:mod:`pamtorch.ops.table`). Importing this package fills the table."""
from . import table
from . import matmul, conv, elementwise, activations, norms, losses, attention, pooling, recurrent, optim  # noqa: F401
from . import reductions  # noqa: F401
from . import scaled  # noqa: F401
from .table import OP_TABLE, PASS_THROUGH, UnsupportedOpError, implements, op_kind, passes_through

__all__ = ["OP_TABLE", "PASS_THROUGH", "UnsupportedOpError", "implements", "op_kind", "passes_through"]
