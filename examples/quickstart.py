"""Train a tiny Equinox policy by differentiating through a rollout.

The environment and the policy are Equinox modules that carry Python values (a name, a
time step, an activation function) next to their arrays. `filter_scan` rolls them out
with the modules themselves in the carry, and `filter_cond` resets the environment
when the point leaves the track, without computing the untaken branch. Afterwards,
`unstack_pytree` splits a rollout into per-step records, and `stack_pytree` joins a
population of freshly initialised policies so that `eqx.filter_vmap` can score them
all at once.

Run it with `python examples/quickstart.py`; it takes a few seconds on a CPU.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from lerax_utils import filter_cond, filter_scan, stack_pytree, unstack_pytree


class PointMass(eqx.Module):
    """A point on a line, pushed by the action; the goal is to rest at the origin."""

    name: str = eqx.field(static=True, default="point-mass")
    dt: float = eqx.field(static=True, default=0.1)
    track_length: float = eqx.field(static=True, default=3.0)

    def reset(self, key: jax.Array) -> jax.Array:
        return jax.random.uniform(key, (2,), minval=-1.0, maxval=1.0)

    def step(self, state: jax.Array, action: jax.Array) -> jax.Array:
        position, velocity = state
        velocity = velocity + self.dt * action
        return jnp.stack([position + self.dt * velocity, velocity])

    def reward(self, state: jax.Array) -> jax.Array:
        return -(state[0] ** 2) - 0.1 * state[1] ** 2


class Policy(eqx.Module):
    mlp: eqx.nn.MLP
    squash: Callable[[jax.Array], jax.Array]

    def __init__(self, key: jax.Array):
        self.mlp = eqx.nn.MLP(2, 1, width_size=16, depth=2, key=key)
        self.squash = jnp.tanh

    def __call__(self, state: jax.Array) -> jax.Array:
        return 2.0 * self.squash(self.mlp(state)[0])


def rollout(
    policy: Policy, env: PointMass, key: jax.Array, steps: int
) -> dict[str, jax.Array]:
    """Run `policy` in `env` for `steps` steps; the modules ride in the carry."""

    def step(carry, step_key):
        policy, env, state = carry
        action = policy(state)
        next_state = env.step(state, action)
        off_track = jnp.abs(next_state[0]) > env.track_length
        next_state = filter_cond(
            off_track, lambda s: env.reset(step_key), lambda s: s, next_state
        )
        return (policy, env, next_state), {
            "reward": env.reward(next_state),
            "position": next_state[0],
        }

    reset_key, *step_keys = jax.random.split(key, steps + 1)
    init = (policy, env, env.reset(reset_key))
    _, trajectory = filter_scan(step, init, jnp.stack(step_keys))
    return trajectory


@eqx.filter_jit
def mean_reward(policy: Policy, env: PointMass, key: jax.Array) -> jax.Array:
    keys = jax.random.split(key, 16)
    trajectories = jax.vmap(lambda k: rollout(policy, env, k, steps=50))(keys)
    return trajectories["reward"].mean()


@eqx.filter_jit
def train_step(policy: Policy, env: PointMass, key: jax.Array) -> Policy:
    grads = eqx.filter_grad(lambda p: -mean_reward(p, env, key))(policy)
    updates = jax.tree.map(lambda g: -0.1 * g, grads)
    return eqx.apply_updates(policy, updates)


def main() -> None:
    env = PointMass()
    policy = Policy(jax.random.key(0))
    eval_key, train_key = jax.random.split(jax.random.key(1))
    print(f"environment: {env.name}, dt={env.dt}")
    print(f"mean reward before training: {mean_reward(policy, env, eval_key):7.3f}")
    for i, key in enumerate(jax.random.split(train_key, 100)):
        policy = train_step(policy, env, key)
        if (i + 1) % 25 == 0:
            ret = mean_reward(policy, env, eval_key)
            print(f"after {i + 1:3d} updates:         {ret:7.3f}")

    trajectory = eqx.filter_jit(rollout)(policy, env, jax.random.key(2), steps=5)
    print("first steps of a trained rollout:")
    for t, record in enumerate(unstack_pytree(trajectory)):
        print(f"  step {t}: position {record['position']:+.3f}")

    population = stack_pytree([Policy(key) for key in jax.random.split(eval_key, 4)])
    scores = eqx.filter_vmap(lambda p: mean_reward(p, env, eval_key))(population)
    listing = ", ".join(f"{score:.3f}" for score in scores.tolist())
    print(f"mean rewards of 4 untrained policies: {listing}")


if __name__ == "__main__":
    main()
