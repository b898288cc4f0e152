"""eval.bench records the compute dtype of a case: integer arguments (a decode case's filled length) do not promote
float32 to float64 as numpy's result_type would."""

import jax.numpy as jnp
import numpy as np

from eval import bench


def test_integer_arguments_leave_the_float_dtype():
    q, filled = jnp.ones((1, 4, 2, 8), jnp.float32), jnp.asarray(3, jnp.int32)
    assert str(np.result_type(q.dtype, filled.dtype)) == "float64"  # what the records said before
    record = bench.Bench(warmup=0, repeats=1).measure("scaled", lambda a, n: a * n, q, filled, flops=64.0)
    assert record["status"] == "ok" and record["dtype"] == "float32"
    assert bench.record_dtype([q.astype(jnp.bfloat16), filled]) == "bfloat16"
    assert bench.record_dtype([filled]) == "int32" and bench.record_dtype([]) is None
