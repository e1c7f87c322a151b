"""What the layer tests share: random inputs and parameters, and the axis-name check."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.layers import axes


def normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def randomize(module, seed=0):
    """Random values for every parameter (biases, norms and gates included), drawn with
    NumPy."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    new = [normal(seed + i, x.shape, 0.5).astype(x.dtype) for i, x in enumerate(leaves)]
    nnx.update(module, jax.tree.unflatten(treedef, new))
    return module


def check_axis_names(factory):
    """Every parameter of ``factory(rngs)`` (built abstractly) names each of its axes
    from the logical vocabulary (:data:`jattn.layers.axes.NAMES`) in its sharding metadata."""
    model = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    params = jax.tree_util.tree_flatten_with_path(
        nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    assert params
    for path, param in params:
        where = jax.tree_util.keystr(path)
        names = param.get_metadata().get("out_sharding")
        assert names is not None and len(names) == param.ndim, (where, names, param.shape)
        assert set(names) <= set(axes.NAMES) | {None}, (where, names)
