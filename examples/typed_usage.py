"""Type checkers see through lerax_utils: pyright checks this file in CI.

Each `assert_type` below fails the type check if a public signature stops carrying
the user's types: the carry and outputs of `filter_scan`, the class returned by
`deserialize`, the tree returned by `load_pytree`, and the parameters kept by
`callback_wrapper`. The file also runs,
though `assert_type` checks nothing at run time.
"""

# pyright: reportUnnecessaryTypeIgnoreComment=true
import tempfile
from typing import assert_type

import equinox as eqx
import jax
import jax.numpy as jnp

from lerax_utils import (
    Serializable,
    callback_wrapper,
    filter_cond,
    filter_scan,
    load_pytree,
    save_pytree,
    stack_pytree,
    unstack_pytree,
)


class Model(Serializable):
    weight: jax.Array
    name: str = eqx.field(static=True)


def step(model: Model, x: jax.Array) -> tuple[Model, jax.Array]:
    return Model(model.weight + x, model.name), model.weight


def log_loss(step: int, loss: jax.Array) -> None:
    print(f"step {step}: loss {loss}")


def main() -> None:
    model = Model(jnp.zeros(()), "m")
    assert_type(model, Model)
    final, weights = filter_scan(step, model, jnp.arange(3.0))
    assert_type(final, Model)
    assert_type(weights, jax.Array)

    def keep(model: Model) -> Model:
        return model

    assert_type(filter_cond(True, keep, keep, final), Model)

    models = unstack_pytree(Model(jnp.arange(3.0), "m"))
    assert_type(models, list[Model])
    assert_type(stack_pytree(models), Model)

    logger = callback_wrapper(log_loss)
    logger(1, jnp.float32(0.5))
    # The wrapper keeps `log_loss`'s parameters, so this call is a type error; the
    # file-wide setting above makes pyright fail if the ignore below were not needed.
    logger("one", jnp.float32(0.5))  # type: ignore[arg-type]
    jax.effects_barrier()

    with tempfile.TemporaryDirectory() as folder:
        final.serialize(f"{folder}/model")
        loaded = Model.deserialize(f"{folder}/model", jnp.zeros(()), "m")
        assert_type(loaded, Model)
        assert_type(Model.deserialize(f"{folder}/model"), Model)
        save_pytree(f"{folder}/state", (final, weights.size))  # A model and an int.
        state = load_pytree(f"{folder}/state", (final, weights.size))
        assert_type(state, tuple[Model, int])
    print("types and values check out")


if __name__ == "__main__":
    main()
