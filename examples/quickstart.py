"""Train a tiny Equinox policy by differentiating through a rollout.

The environment and the policy are Equinox modules that carry Python values (a name, a
time step, an activation function) next to their arrays. `filter_scan` rolls them out
with the modules themselves in the carry, and `filter_cond` resets the environment
when the point leaves the track, without computing the untaken branch. Afterwards,
`unstack_pytree` splits a rollout into per-step records, and `stack_pytree` joins a
population of freshly initialised policies so that `eqx.filter_vmap` can score them
all at once. The training loop is itself a jitted `filter_scan`, which logs through
`print_callback` and a metrics logger made with `callback_with_list_wrapper`.
`filter_while_loop` then runs the trained policy until the point comes to rest. The
policy is a `Serializable`, so it saves itself to a checkpoint and loads back.

Run it with `python examples/quickstart.py`; it takes a few seconds on a CPU.
"""

import pathlib
import tempfile
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from lerax_utils import (
    Serializable,
    callback_with_list_wrapper,
    filter_cond,
    filter_scan,
    filter_while_loop,
    print_callback,
    stack_pytree,
    unstack_pytree,
)


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


class Policy(Serializable):
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


# Metrics go to the host from inside the jitted training loop. `step` arrives as an
# int and `reward` as a float, ready for any logger.
history: list[dict[str, float]] = []
record_metrics = callback_with_list_wrapper(
    lambda step, reward: history.append({"step": step, "reward": reward}), ordered=True
)


@eqx.filter_jit
def train(policy: Policy, env: PointMass, key: jax.Array, updates: int) -> Policy:
    """Gradient ascent on the mean reward, as one jitted `filter_scan` over updates,
    with a progress bar on stderr."""

    def update(policy, step_and_key):
        step, key = step_and_key
        reward, grads = eqx.filter_value_and_grad(mean_reward)(policy, env, key)
        policy = eqx.apply_updates(policy, jax.tree.map(lambda g: 0.1 * g, grads))
        record_metrics(step + 1, reward)
        filter_cond(
            (step + 1) % 25 == 0,
            lambda: print_callback("  update", step + 1, "reward", reward),
            lambda: None,
        )
        return policy, None

    steps_and_keys = (jnp.arange(updates), jax.random.split(key, updates))
    policy, _ = filter_scan(update, policy, steps_and_keys, progress="training")
    return policy


@eqx.filter_jit
def steps_to_rest(policy: Policy, env: PointMass, state: jax.Array) -> jax.Array | int:
    """Run until the point rests near the origin (or 500 steps): an episode of
    unknown length, with the modules and a Python step counter in the carry."""

    def moving(carry):
        _, _, state, steps = carry
        return (jnp.max(jnp.abs(state)) > 0.05) & (steps < 500)

    def step(carry):
        policy, env, state, steps = carry
        return policy, env, env.step(state, policy(state)), steps + 1

    *_, steps = filter_while_loop(moving, step, (policy, env, state, 0))
    return steps


def main() -> None:
    env = PointMass()
    policy = Policy(jax.random.key(0))
    eval_key, train_key = jax.random.split(jax.random.key(1))
    print(f"environment: {env.name}, dt={env.dt}")
    print(f"mean reward before training: {mean_reward(policy, env, eval_key):7.3f}")
    print("training (printed from inside the jitted loop):")
    policy = train(policy, env, train_key, updates=100)
    jax.effects_barrier()  # Wait for the callbacks before reading `history`.
    best = max(record["reward"] for record in history)
    print(f"logged {len(history)} updates; best reward {best:.3f}")
    print(f"mean reward after training:  {mean_reward(policy, env, eval_key):7.3f}")

    trajectory = eqx.filter_jit(rollout)(policy, env, jax.random.key(2), steps=5)
    steps = steps_to_rest(policy, env, jnp.array([0.8, 0.0]))
    print(f"steps to bring the point to rest from 0.8: {steps}")
    print("first steps of a trained rollout:")
    for t, record in enumerate(unstack_pytree(trajectory)):
        print(f"  step {t}: position {record['position']:+.3f}")

    with tempfile.TemporaryDirectory() as folder:
        policy.serialize(pathlib.Path(folder) / "policy")  # Writes policy.eqx.
        restored = Policy.deserialize(
            pathlib.Path(folder) / "policy", jax.random.key(7)
        )
        reward = mean_reward(restored, env, eval_key)
        print(f"reloaded from a checkpoint:  {reward:7.3f}")

    population = stack_pytree([Policy(key) for key in jax.random.split(eval_key, 4)])
    scores = eqx.filter_vmap(lambda p: mean_reward(p, env, eval_key))(population)
    listing = ", ".join(f"{score:.3f}" for score in scores.tolist())
    print(f"mean rewards of 4 untrained policies: {listing}")


if __name__ == "__main__":
    main()
