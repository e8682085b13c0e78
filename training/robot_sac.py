"""Soft actor-critic in JAX, lean enough for MuJoCo robots on two CPU cores.

Read top to bottom like CleanRL's sac_continuous_action.py; what differs is all for speed on a CPU:
  * one jitted XLA program runs a whole burst of updates (lax.scan), so Python and dispatch cost
    once per burst, not once per gradient step (the env is stepped `burst` times between bursts,
    one update per env step on average, as SB3's train_freq/gradient_steps);
  * the actor and the temperature are updated on every second critic update (TD3's delayed
    policy update): the critic is what needs the steps, and the actor's half costs a third;
  * plain-JAX networks and Adam (no flax/optax), so the checkpoint is a flat list of arrays.

Measured on this project's 2-core AMD EPYC (one core, 256x256 networks, HalfCheetah's sizes):
SB3's SAC about 60 updates/s; this file's first form (an actor update every step) 133/s at batch
256 and 256/s at batch 128. `python -m training robot --screen` measures the shipped form per size.
"""

from __future__ import annotations

import os

# One XLA thread: small matrices, and the second core belongs to the environment (or a second run).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclass(frozen=True)
class Hyper:
    hidden: int = 256
    batch: int = 128
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005


# -- networks: lists of (weight, bias), PyTorch's default uniform initialisation ---------------

def init_mlp(key, sizes):
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / np.sqrt(fan_in)
        layers.append((jax.random.uniform(kw, (fan_in, fan_out), minval=-bound, maxval=bound),
                       jax.random.uniform(kb, (fan_out,), minval=-bound, maxval=bound)))
    return layers


def mlp(layers, x):
    for w, b in layers[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = layers[-1]
    return x @ w + b


def actor_head(actor, obs):
    """Mean and log-std of the Gaussian before tanh squashing (what the ONNX file exports)."""
    mean, log_std = jnp.split(mlp(actor, obs), 2, axis=-1)
    return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


def sample_action(actor, obs, key):
    """tanh(mean + std * noise) and its log-probability (with the tanh change of variables)."""
    mean, log_std = actor_head(actor, obs)
    std = jnp.exp(log_std)
    u = mean + std * jax.random.normal(key, mean.shape)
    log_prob = (-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)
    log_prob -= (2 * (jnp.log(2.0) - u - jax.nn.softplus(-2 * u))).sum(-1)  # log(1 - tanh(u)^2)
    return jnp.tanh(u), log_prob


def q_values(critic, obs, action):
    x = jnp.concatenate([obs, action], axis=-1)
    return mlp(critic[0], x)[:, 0], mlp(critic[1], x)[:, 0]


# -- Adam ----------------------------------------------------------------------------------------

def adam_init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return zeros, jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32)


def adam_step(params, grads, state, lr, b1=0.9, b2=0.999, eps=1e-8):
    m, v, t = state
    t = t + 1
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    params = jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), params, m, v)
    return params, (m, v, t)


# -- the learner ---------------------------------------------------------------------------------

def init_state(key, obs_dim: int, act_dim: int, h: Hyper) -> dict:
    ka, k1, k2 = jax.random.split(key, 3)
    actor = init_mlp(ka, [obs_dim, h.hidden, h.hidden, 2 * act_dim])
    critic = (init_mlp(k1, [obs_dim + act_dim, h.hidden, h.hidden, 1]),
              init_mlp(k2, [obs_dim + act_dim, h.hidden, h.hidden, 1]))
    log_alpha = jnp.zeros(())
    return {"actor": actor, "critic": critic, "target": jax.tree.map(jnp.array, critic), "log_alpha": log_alpha,
            "opt_actor": adam_init(actor), "opt_critic": adam_init(critic), "opt_alpha": adam_init(log_alpha),
            "key": key}


def _critic_update(s, batch, h: Hyper):
    obs, act, rew, nxt, done = batch
    key, k = jax.random.split(s["key"])
    alpha = jnp.exp(s["log_alpha"])
    next_act, next_logp = sample_action(s["actor"], nxt, k)
    tq1, tq2 = q_values(s["target"], nxt, next_act)
    target = jax.lax.stop_gradient(rew + h.gamma * (1 - done) * (jnp.minimum(tq1, tq2) - alpha * next_logp))

    def loss(critic):
        q1, q2 = q_values(critic, obs, act)
        return ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()

    critic, opt = adam_step(s["critic"], jax.grad(loss)(s["critic"]), s["opt_critic"], h.critic_lr)
    tgt = jax.tree.map(lambda t, c: (1 - h.tau) * t + h.tau * c, s["target"], critic)
    return {**s, "critic": critic, "opt_critic": opt, "target": tgt, "key": key}


def _actor_update(s, obs, target_entropy: float, h: Hyper):
    key, k = jax.random.split(s["key"])
    alpha = jnp.exp(s["log_alpha"])

    def loss(actor):
        act, logp = sample_action(actor, obs, k)
        q1, q2 = q_values(s["critic"], obs, act)
        return (alpha * logp - jnp.minimum(q1, q2)).mean(), logp

    (actor_loss, logp), grads = jax.value_and_grad(loss, has_aux=True)(s["actor"])
    actor, opt_actor = adam_step(s["actor"], grads, s["opt_actor"], h.actor_lr)
    entropy_gap = jax.lax.stop_gradient(-logp.mean() - target_entropy)
    # d/d(log_alpha) of log_alpha * (entropy - target): alpha grows when entropy falls below target.
    log_alpha, opt_alpha = adam_step(s["log_alpha"], entropy_gap, s["opt_alpha"], h.actor_lr)
    return {**s, "actor": actor, "opt_actor": opt_actor, "log_alpha": log_alpha, "opt_alpha": opt_alpha,
            "key": key}, (actor_loss, alpha, -logp.mean())


@partial(jax.jit, static_argnums=(2, 3), donate_argnums=0)
def update_burst(state, batches, target_entropy: float, h: Hyper):
    """len(batches) critic updates (pairs: critic, critic, actor+alpha), one XLA program."""

    def pair(s, pair_batch):
        first = jax.tree.map(lambda x: x[0], pair_batch)
        second = jax.tree.map(lambda x: x[1], pair_batch)
        s = _critic_update(s, first, h)
        s = _critic_update(s, second, h)
        return _actor_update(s, second[0], target_entropy, h)

    paired = jax.tree.map(lambda x: x.reshape(x.shape[0] // 2, 2, *x.shape[1:]), batches)
    state, stats = jax.lax.scan(pair, state, paired)
    return state, jax.tree.map(lambda x: x[-1], stats)


@jax.jit
def explore(actor, obs, key):
    key, k = jax.random.split(key)
    action, _ = sample_action(actor, obs, k)
    return action, key


@jax.jit
def deterministic(actor, obs):
    mean, _ = actor_head(actor, obs)
    return jnp.tanh(mean)


# -- replay buffer -------------------------------------------------------------------------------

class Replay:
    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next = np.zeros((capacity, obs_dim), np.float32)
        self.act = np.zeros((capacity, act_dim), np.float32)
        self.rew = np.zeros(capacity, np.float32)
        self.done = np.zeros(capacity, np.float32)
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, obs, act, rew, nxt, done):
        i = self.pos
        self.obs[i], self.act[i], self.rew[i], self.next[i], self.done[i] = obs, act, rew, nxt, done
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, updates: int, batch: int):
        idx = rng.integers(0, self.size, size=(updates, batch))
        return (self.obs[idx], self.act[idx], self.rew[idx], self.next[idx], self.done[idx])

    def arrays(self) -> dict:
        n = self.size
        return {"obs": self.obs[:n], "next": self.next[:n], "act": self.act[:n], "rew": self.rew[:n],
                "done": self.done[:n], "pos": np.int64(self.pos)}

    def restore(self, saved) -> None:
        n = len(saved["rew"])
        for field in ("obs", "next", "act", "rew", "done"):
            getattr(self, field)[:n] = saved[field]
        self.size, self.pos = n, int(saved["pos"])


def state_leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def state_from_leaves(template, leaves):
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])
